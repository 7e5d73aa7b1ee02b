"""`parscale-jax import`: a run made from a Hugging Face checkpoint (Qwen2, Llama or qwen2_parscale,
a directory) or a GGUF file (Llama or Qwen2, dequantized to float32).

The run's starting weights are the checkpoint's: its backbone, and its own prefix+aggregator set
if it has streams. It can be evaluated, sampled and exported at once; `parscale-jax train --run-dir
RUN` continues from those weights. When P was raised (the paper's stage 2), the new stream set is
chosen (recycle.py) and, with `--calibrate N`, calibrated here, and saved as the run's own.
A GGUF file's tokenizer is written into the run as `tokenizer.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from parscale_jax.checkpoint import save_params
from parscale_jax.config import Config, require_trainable
from parscale_jax.errors import ConfigError
from parscale_jax.interop import hf
from parscale_jax.interop.gguf import GGUFFile
from parscale_jax.layout import Layout
from parscale_jax.model import split_params
from parscale_jax.model.config import ModelConfig
from parscale_jax.recycle import new_stream_set
from parscale_jax.transforms.calibrate import CALIBRATION_LR
from parscale_jax.transforms.calibrate import calibrate as calibrate_streams
from parscale_jax.runs import (Run, checkpoint_run_config, check_new, fresh_params, hf_run_config, initial_weights,
                               read_source)


def _read(path: Path, run_dir: Path, overrides: list[str], base: dict[str, Any] | None
          ) -> tuple[Config, ModelConfig, dict, dict[str, Any], dict[str, str]]:
    """The new run's config, the checkpoint's model and parameters, its lineage entry, and the files
    the run carries (a GGUF file's tokenizer). The config is checked before the tensors are read."""
    if not path.exists():
        raise ConfigError("--hf", f"{path} does not exist")
    if path.is_dir():
        config = hf_run_config(path, overrides, base)
        require_trainable(config)
        source = read_source(path, "import", key="--hf")
        return config, source.config.model, source.params, source.parent, {}
    file = GGUFFile(path)
    checkpoint = hf.config_from_hf(file.hf_config)
    files = {} if file.tokenizer_json is None else {"tokenizer.json": file.tokenizer_json}
    config = checkpoint_run_config(checkpoint, run_dir / "tokenizer.json" if files else None, overrides, base)
    require_trainable(config)
    params = hf.checked_params_from_hf(file.tensors(), checkpoint, path, "GGUF metadata")
    return config, checkpoint, params, {"kind": "gguf", "path": str(path.absolute())}, files


def import_checkpoint(hf_path: str | Path, run_dir: str | Path, overrides: list[str],
                      base: dict[str, Any] | None = None, calibrate: int = 0,
                      calibrate_lr: float | None = None) -> dict[str, Any]:
    """Turn a Hugging Face checkpoint (directory or GGUF file) into a run directory (under the `base`
    config's data and training settings, then `overrides`); returns a summary. New streams start
    from the backbone's keys and values of contexts (recycle.py) and, with `calibrate` > 0, are
    then trained alone for that many steps to give the backbone's distribution (calibrate.py)."""
    hf_path, run_dir = Path(hf_path), Path(run_dir)
    check_new(run_dir)  # before reading anything
    if calibrate < 0:
        raise ConfigError("--calibrate", f"must be a number of steps >= 0, got {calibrate}")
    config, checkpoint, params, parent, files = _read(hf_path, run_dir, overrides, base)
    model = config.model
    new_streams = model.parscale_n > 1 and (checkpoint.parscale_n, checkpoint.parscale_n_tokens) != (
        model.parscale_n, model.parscale_n_tokens)
    if calibrate and not new_streams:
        raise ConfigError("--calibrate", "there are no new streams to calibrate: raise model.parscale_n above "
                          f"the checkpoint's {checkpoint.parscale_n}")
    layout = Layout.create(config)
    summary = {"run_dir": str(run_dir.absolute()), "parameters": int(sum(x.size for x in jax.tree.leaves(params))),
               "checkpoint_streams": checkpoint.parscale_n, "streams": model.parscale_n, "new_streams": new_streams,
               "trainable": config.train.trainable}
    with jax.set_mesh(layout.mesh):
        initial = initial_weights(layout, params, checkpoint, np.dtype(model.param_dtype))
        run = Run.create(run_dir, config, initial, "import", [parent], files=files,
                         checkpoint_streams=checkpoint.parscale_n, new_streams=new_streams,
                         calibration_steps=calibrate)
        if new_streams:  # chosen once here (recycle.py), not again by every reader of step 0
            fresh, _ = split_params(fresh_params(config, layout), model)
            streams = new_stream_set(fresh, initial["backbone"], config)
            if calibrate:
                streams, divergences = calibrate_streams(config, layout, streams, initial["backbone"], calibrate,
                                                         calibrate_lr or CALIBRATION_LR)
                summary["calibration_kl"] = {"first": divergences[0], "last": divergences[-1]}
            save_params(run.initial_dir / f"parscale_p{model.parscale_n}", streams)
    return summary
