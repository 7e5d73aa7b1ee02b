"""Using a trained model: generation with a KV cache."""
