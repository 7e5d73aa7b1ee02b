"""Other formats: Hugging Face checkpoints (hf.py) and the PyTorch modeling code shipped inside them (hf_remote/)."""
