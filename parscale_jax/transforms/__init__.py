"""New runs (and train states) from existing weights: a Hugging Face checkpoint or GGUF file
imported (import_hf.py, with calibrate.py for its new streams), a deeper model (upscale.py), a
train state grown to a larger model (grow.py)."""
