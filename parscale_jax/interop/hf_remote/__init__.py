"""PyTorch remote code shipped inside exported checkpoints (loaded with `trust_remote_code=True`)."""
