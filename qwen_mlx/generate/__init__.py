"""Generation: sampling, the token loop and chat sessions."""
