"""Shared test setup: a persistent XLA compilation cache, so identical programs compile once per run."""

import tempfile

import jax

_CACHE_DIR = tempfile.mkdtemp(prefix="parscale-jax-xla-cache-")
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
