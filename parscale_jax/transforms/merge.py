"""`parscale-jax merge`: one run made from several (Branch-Train-Merge's combinations of experts).

- average: a weighted average of every parameter (model soups; meaningful only for runs that share
  an ancestor, which stay in one basin: runs from different initializations get a warning).
- moe (Branch-Train-MiX): run j's MLP becomes expert j of a Mixture-of-Experts layer, every other
  parameter is averaged, and the router is new (normal with model.init_std, seeded by train.seed),
  to be trained on the mixture.

The sources are runs (each at its newest settled checkpoint) or Hugging Face directories of the
same shape; the new run names them all as parents in its lineage and trains with a fresh optimizer.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from parscale_jax.config import load_config, to_dict
from parscale_jax.errors import ConfigError
from parscale_jax.layout import Layout
from parscale_jax.runs import Run, Source, check_new, check_same_shapes, initial_weights, read_source
from parscale_jax.transforms.upcycle import experts_from

METHODS = ("average", "moe")


def ancestry(parent: dict[str, Any]) -> set[str]:
    """What a source descends from, itself included: every run and checkpoint in its lineage."""
    names = {f"{parent.get('kind')}:{parent.get('path')}"}
    for grandparent in (parent.get("lineage") or {}).get("parents", []):
        names |= ancestry(grandparent)
    return names


def merge_weights(weights: tuple[float, ...] | None, count: int) -> np.ndarray:
    """The sources' weights, summing to 1 (uniform when not given)."""
    if weights is None:
        return np.full(count, 1.0 / count)
    if len(weights) != count:
        raise ConfigError("--weights", f"{len(weights)} weights for {count} runs")
    if any(w <= 0 for w in weights):
        raise ConfigError("--weights", f"must be positive, got {','.join(f'{w:g}' for w in weights)}")
    return np.asarray(weights, np.float64) / sum(weights)


def averaged(trees: list[dict], weights: np.ndarray) -> dict:
    """The weighted average of parameter trees, summed in float64, in the first tree's dtypes."""
    return jax.tree.map(lambda *leaves: sum(w * np.asarray(x, np.float64) for w, x in zip(weights, leaves))
                        .astype(np.asarray(leaves[0]).dtype), *trees)


def _btx(sources: list[Source], weights: np.ndarray, overrides: list[str]) -> tuple[Any, dict]:
    """(config, parameters) of the Mixture-of-Experts whose expert j is source j's MLP."""
    first = sources[0].config
    if first.model.ffn != "swiglu":
        raise ConfigError("--moe", f"the experts are the runs' SwiGLU MLPs, not model.ffn={first.model.ffn}")
    values = to_dict(first)
    values["model"].update(ffn="moe", num_experts=len(sources), experts_per_token=min(2, len(sources)))
    config = load_config(base=values, overrides=overrides)
    m = config.model
    if (m.num_experts, m.moe_intermediate_size, m.moe_shared_expert_size, m.moe_every) != (
            len(sources), 0, 0, 1):
        raise ConfigError("overrides", f"merge --moe makes {len(sources)} experts of the runs' MLPs in every layer: "
                          "model.num_experts, moe_intermediate_size, moe_shared_expert_size and moe_every are fixed")
    mlps = [s.params["layers"]["mlp"] for s in sources]
    others = averaged([{**s.params, "layers": {k: v for k, v in s.params["layers"].items() if k != "mlp"}}
                       for s in sources], weights)
    experts = experts_from(mlps, m, np.random.default_rng(config.train.seed))
    return config, {**others, "layers": {**others["layers"], "mlp": experts}}


def merge(paths: list[str | Path], out: str | Path, method: str, weights: tuple[float, ...] | None = None,
          overrides: list[str] | None = None) -> dict[str, Any]:
    """Write the merged run `out`; returns a summary."""
    out = Path(out)
    check_new(out)
    if method not in METHODS:
        raise ConfigError("--method", f"must be one of {METHODS}, got '{method}'")
    if len(paths) < 2:
        raise ConfigError("RUNS", f"merging needs two runs or more, got {len(paths)}")
    shares = merge_weights(weights, len(paths))
    sources = [read_source(path, "merge", key="RUNS") for path in paths]
    check_same_shapes({str(path): source.config.model for path, source in zip(paths, sources)}, "RUNS")
    shared = set.intersection(*(ancestry(source.parent) for source in sources))
    if not shared:
        print("merge: warning: the runs share no ancestor (different initializations); an average of their "
              "weights is not expected to work: branch them from one seed run", file=sys.stderr)
    if method == "average":
        values = to_dict(sources[0].config)
        config = load_config(base=values, overrides=list(overrides or ()))
        if config.model != sources[0].config.model:
            raise ConfigError("overrides", "merge --average keeps the runs' model; only data/train settings may change")
        params = averaged([s.params for s in sources], shares)
    else:
        config, params = _btx(sources, shares, list(overrides or ()))
    layout = Layout.create(config)
    with jax.set_mesh(layout.mesh):
        initial = initial_weights(layout, params, config.model, np.dtype(config.model.param_dtype))
        Run.create(out, config, initial, "merge", [s.parent for s in sources], method=method,
                   weights=[float(w) for w in shares])
    return {"run_dir": str(out.absolute()), "method": method, "runs": len(sources),
            "weights": [float(w) for w in shares], "shared_ancestor": bool(shared)}
