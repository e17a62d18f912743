"""`qwen-mlx serve`: an OpenAI-compatible server with continuous batching (see app, batching)."""
