"""`parscale-jax import`: a run made from a Hugging Face checkpoint (Qwen2, Llama or qwen2_parscale).

The run's starting weights are the checkpoint's: its backbone, and its own prefix+aggregator set
if it has streams. It can be evaluated, sampled and exported at once; `parscale-jax train --run-dir
RUN` continues from those weights, adding fresh streams when P was raised (the paper's stage 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from parscale_jax.layout import Layout
from parscale_jax.runs import Run, check_new, hf_run_config, initial_weights, read_source


def import_checkpoint(hf_dir: str | Path, run_dir: str | Path, overrides: list[str],
                      base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Turn a Hugging Face checkpoint into a run directory (under the `base` config's data and
    training settings, then `overrides`); returns a summary."""
    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    check_new(run_dir)  # before reading anything
    config = hf_run_config(hf_dir, overrides, base)
    source = read_source(hf_dir, "import", key="--hf")
    checkpoint, model = source.config.model, config.model
    new_streams = model.parscale_n > 1 and (checkpoint.parscale_n, checkpoint.parscale_n_tokens) != (
        model.parscale_n, model.parscale_n_tokens)
    layout = Layout.create(config)
    with jax.set_mesh(layout.mesh):
        initial = initial_weights(layout, source.params, checkpoint, np.dtype(model.param_dtype))
        Run.create(run_dir, config, initial, "import", [source.parent], checkpoint_streams=checkpoint.parscale_n,
                   new_streams=new_streams)
    return {
        "run_dir": str(run_dir.absolute()),
        "parameters": int(sum(x.size for x in jax.tree.leaves(source.params))),
        "checkpoint_streams": checkpoint.parscale_n,
        "streams": model.parscale_n,
        "new_streams": new_streams,
        "trainable": config.train.trainable,
    }
