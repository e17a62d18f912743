"""qwen-mlx: run the whole Qwen model family locally with MLX."""

__version__ = "0.1.0"

from .model.config import ModelConfig  # noqa: E402
from .checkpoint.converter import convert  # noqa: E402
from .errors import QwenMLXError  # noqa: E402
from .generate.generation import ChatSession, generate, stream_generate  # noqa: E402
from .checkpoint.loader import load  # noqa: E402
from .model.decoder import Model  # noqa: E402

__all__ = ["ChatSession", "Model", "ModelConfig", "QwenMLXError", "__version__", "convert",
           "generate", "load", "stream_generate"]
