"""Transforms that make a new run from an existing model: depth up-scaling (upscale.py)."""
