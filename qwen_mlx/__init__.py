"""qwen-mlx: run the whole Qwen model family locally with MLX."""

__version__ = "0.1.0"

from .config import ModelConfig  # noqa: E402
from .converter import convert  # noqa: E402
from .errors import QwenMLXError  # noqa: E402
from .generation import ChatSession, generate, stream_generate  # noqa: E402
from .loader import load  # noqa: E402
from .model import Model  # noqa: E402

__all__ = ["ChatSession", "Model", "ModelConfig", "QwenMLXError", "__version__", "convert",
           "generate", "load", "stream_generate"]
