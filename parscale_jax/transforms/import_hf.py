"""`parscale-jax import` and `export`: between Hugging Face checkpoints and run directories.

Import makes a run whose starting weights are the checkpoint's: its backbone, and its own
prefix+aggregator set if it has streams. The run can be evaluated, sampled and exported at once;
`parscale-jax train --run-dir RUN` continues from those weights, adding fresh streams when P was
raised (the paper's stage 2). Export writes a run's parameters, for the P its config names, as a
Hugging Face checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np

from parscale_jax.interop import hf
from parscale_jax.config import Config, DataConfig, ModelConfig, load_config
from parscale_jax.errors import ConfigError
from parscale_jax.layout import Layout
from parscale_jax.runs import Run, check_new, initial_weights

# What a checkpoint fixes; overrides may change the rest (P, T, ε, dtypes, remat).
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                       "num_kv_heads", "head_dim", "rope_theta", "rms_norm_eps", "qkv_bias", "tie_embeddings")


def import_config(hf_dir: Path, overrides: list[str], base: dict[str, Any] | None = None) -> tuple[Config, ModelConfig]:
    """(the run's config, the checkpoint's model config): the checkpoint's shape under `base`
    (defaults for data and training), then the overrides, which may not change the shape."""
    checkpoint = hf.read_hf_config(hf_dir)
    values = dict(base or {})
    values["model"] = {**values.get("model", {}), **dataclasses.asdict(checkpoint)}
    data = values["data"] = dict(values.get("data", {}))
    if (hf_dir / "tokenizer.json").is_file():
        data["tokenizer"] = str((hf_dir / "tokenizer.json").absolute())
    # Rows no longer than the model's context, unless asked otherwise.
    data.setdefault("seq_len", min(DataConfig().seq_len, checkpoint.max_position_embeddings))
    config = load_config(base=values, overrides=overrides)
    for name in ARCHITECTURE_FIELDS:
        if getattr(config.model, name) != getattr(checkpoint, name):
            raise ConfigError(f"model.{name}", f"is fixed by the checkpoint ({getattr(checkpoint, name)}); "
                              "only parscale_*, dtype, param_dtype, remat and init_std can change")
    return config, checkpoint


def import_checkpoint(hf_dir: str | Path, run_dir: str | Path, overrides: list[str],
                      base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Turn a Hugging Face checkpoint into a run directory; returns a summary."""
    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    check_new(run_dir)  # before reading anything
    config, checkpoint = import_config(hf_dir, overrides, base)
    layout = Layout.create(config)

    _, numpy_params = hf.read_hf_checkpoint(hf_dir)
    dtype = np.dtype(config.model.param_dtype)
    kept = checkpoint.parscale_n == config.model.parscale_n and \
        checkpoint.parscale_n_tokens == config.model.parscale_n_tokens
    lineage = {"made_from": "huggingface", "path": str(hf_dir.absolute()), "checkpoint_streams": checkpoint.parscale_n,
               "new_streams": config.model.parscale_n > 1 and not kept}
    with jax.set_mesh(layout.mesh):
        Run.create(run_dir, config, lineage, initial_weights(layout, numpy_params, checkpoint, dtype))
    return {
        "run_dir": str(run_dir.absolute()),
        "parameters": int(sum(x.size for x in jax.tree.leaves(numpy_params))),
        "checkpoint_streams": checkpoint.parscale_n,
        "streams": config.model.parscale_n,
        "new_streams": lineage["new_streams"],
        "trainable": config.train.trainable,
    }


def export_run(run: Run, out_dir: str | Path, step: int | None = None, dtype: str | None = None,
               max_shard_bytes: int = 5 * 1024**3, overwrite: bool = False) -> dict[str, Any]:
    """Write a run's parameters (latest checkpoint, or `step`; its starting weights if it has not
    trained yet) as a Hugging Face checkpoint."""
    run = run.settled(step, "export")
    config = run.config
    dtype = dtype or config.model.param_dtype
    if dtype not in hf.EXPORT_DTYPES:
        raise ConfigError("--dtype", f"must be one of {tuple(hf.EXPORT_DTYPES)}, got '{dtype}'")
    hf.prepare_output_dir(out_dir, overwrite)  # fail before reading anything
    # One device is enough to hold what is written out tensor by tensor.
    one_device = dataclasses.replace(config, mesh=dataclasses.replace(config.mesh, data=1, stream=1, model=1,
                                                                      fsdp=False, dcn_data=1))
    layout = Layout.create(one_device, jax.devices()[:1])
    with jax.set_mesh(layout.mesh):
        params, step = Run(run.directory, one_device).params(layout, step)
    out = hf.write_hf_checkpoint(out_dir, params, config.model, config.data.tokenizer, dtype,
                                 max_shard_bytes, overwrite)
    return {"out": str(out), "step": step, "streams": config.model.parscale_n, "dtype": dtype,
            "files": sorted(p.name for p in out.iterdir())}
