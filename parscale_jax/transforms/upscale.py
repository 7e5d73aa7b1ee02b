"""Depth up-scaling: a deeper model made from the layers of a trained one.

- SOLAR (`drop=M`): two copies of the n layers, the first without its last M and the second without
  its first M, stacked: layers 0 .. n-M-1 then M .. n-1, 2(n - M) in all. Not function-preserving;
  continued pretraining recovers the loss.
- Identity blocks (`insert=K`, as LLaMA-Pro): the n layers in K even groups, each followed by a copy
  of its last layer whose output projections (`model.residual_outputs`: attention's `o_proj` and
  the feed-forward type's own) are zero, so that every new block adds nothing to the residual
  stream and the model computes exactly what it did.

Every parameter stacked over the layers follows the layer map, ParScale's per-layer prefixes
included; the embedding, final norm and aggregator are kept. The new run starts from these weights
with a fresh optimizer and records its lineage.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import numpy as np

from parscale_jax.config import load_config, to_dict
from parscale_jax.errors import ConfigError
from parscale_jax.layout import Layout
from parscale_jax.model import residual_outputs
from parscale_jax.runs import Run, check_new, initial_weights, read_source


def solar_layers(num_layers: int, drop: int) -> list[int]:
    if not 0 < drop < num_layers:
        raise ConfigError("--drop", f"must lie in [1, {num_layers - 1}] for a {num_layers}-layer model, got {drop}")
    return list(range(num_layers - drop)) + list(range(drop, num_layers))


def identity_layers(num_layers: int, insert: int) -> tuple[list[int], list[bool]]:
    """(source layer of each new layer, whether it is an inserted identity copy)."""
    if not 0 < insert <= num_layers:
        raise ConfigError("--insert", f"must lie in [1, {num_layers}] for a {num_layers}-layer model, got {insert}")
    bounds = [round(num_layers * (g + 1) / insert) for g in range(insert)]
    layers, inserted, start = [], [], 0
    for end in bounds:
        layers += list(range(start, end)) + [end - 1]
        inserted += [False] * (end - start) + [True]
        start = end
    return layers, inserted


def upscale(source: str | Path, out: str | Path, drop: int | None = None, insert: int | None = None,
            overrides: list[str] | None = None) -> dict[str, Any]:
    """Write the up-scaled run `out`; returns a summary with the layer map."""
    if (drop is None) == (insert is None):
        raise ConfigError("--drop", "choose one: --drop M (SOLAR) or --insert K --identity")
    out = Path(out)
    check_new(out)
    source = read_source(source, "upscale")
    config, params = source.config, source.params
    if config.model.moe_every > 1:  # a layer map would have to keep every m-th layer routed
        raise ConfigError("--from", f"upscale copies whole layers, not model.moe_every={config.model.moe_every} groups")
    n = config.model.num_layers
    if drop is not None:
        layers, inserted, method = solar_layers(n, drop), [False] * (2 * (n - drop)), "solar"
    else:
        (layers, inserted), method = identity_layers(n, insert), "identity"
    identity = [i for i, x in enumerate(inserted) if x]
    params = dict(params, layers=jax.tree.map(lambda x: x[np.asarray(layers)], params["layers"]))  # copies
    for path in residual_outputs(config.model):
        for leaf in jax.tree.leaves(functools.reduce(dict.get, path, params)):
            leaf[identity] = 0

    values = to_dict(config)
    values["model"]["num_layers"] = len(layers)
    new = load_config(base=values, overrides=list(overrides or ()))
    if dataclasses.replace(new.model, num_layers=n) != dataclasses.replace(config.model, num_layers=n):
        raise ConfigError("overrides", "upscale keeps the model's shape apart from its depth")
    layout = Layout.create(new)
    with jax.set_mesh(layout.mesh):
        initial = initial_weights(layout, params, new.model, np.dtype(new.model.param_dtype))
        Run.create(out, new, initial, "upscale", [source.parent], method=method, layer_map=layers,
                   identity_layers=identity)
    return {"run_dir": str(out.absolute()), "method": method, "layers": len(layers), "layer_map": layers,
            "identity_layers": identity}
