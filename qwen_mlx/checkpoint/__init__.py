"""Checkpoints on disk: hub downloads, safetensors reading and name mapping, loading, quantization and conversion."""
