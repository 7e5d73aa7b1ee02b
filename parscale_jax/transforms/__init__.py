"""New runs (and train states) from existing weights: a Hugging Face checkpoint imported (import_hf.py), a deeper model (upscale.py), a train state grown to a larger model (grow.py)."""
