"""Models bigger than one machine: tensor and pipeline parallel over `mx.distributed`,
started by `mlx.launch` (see `setup`)."""

from .cli import setup

__all__ = ["setup"]
