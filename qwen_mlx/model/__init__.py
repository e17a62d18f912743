"""The decoder and what it runs on: config normalization, layers, RoPE variants, caches and the CPU core-splitting. Knows nothing of text or generation."""
