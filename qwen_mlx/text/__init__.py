"""Text in and out: the tokenizer, chat templates, streaming detokenizer, reasoning tags and Qwen1's tiktoken vocabulary."""
