"""Sparse upcycling (Komatsuzaki et al., 2022): a Mixture-of-Experts run made from a dense one.

Every expert starts as a copy of the dense MLP (each copy, with `noise` R > 0, plus Gaussian noise
of R times that weight's RMS, so the experts can part ways); the router is new (normal with
model.init_std, seeded by train.seed). With `model.moe_every` = m > 1 only every m-th layer's MLP
(layer i when (i + 1) % m == 0) becomes experts; the others stay dense. Everything else, the
ParScale prefixes and aggregator included, is copied. With renormalized top-k and no dropped
tokens (`model.moe_renormalize=true`, `model.moe_capacity_factor=0`) and no noise, every token's k
weights sum to 1 over identical experts, so the new model computes exactly what the dense one did.
The new run records its lineage and trains with a fresh optimizer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np

from parscale_jax.config import MOE_FIELDS, load_config, to_dict
from parscale_jax.errors import ConfigError
from parscale_jax.layout import Layout
from parscale_jax.model.config import ModelConfig
from parscale_jax.model.lm import mlp_stacks
from parscale_jax.runs import Run, check_new, initial_weights, read_source


def _same_apart_from_moe(new: ModelConfig, old: ModelConfig) -> bool:
    defaults = ModelConfig()
    plain = {name: getattr(defaults, name) for name in MOE_FIELDS}
    return dataclasses.replace(new, ffn=old.ffn, **plain) == old


def experts_from(mlps: list[dict], m: ModelConfig, rng: np.random.Generator, noise: float = 0.0) -> dict[str, Any]:
    """A MoE stack whose expert j is `mlps[j]`, a stack of l dense MLPs: the [l, I, O] kernels become
    [l, E, I, O], with a new router [l, D, E] (normal with init_std). `noise` > 0 perturbs the experts
    by that fraction of their root-mean-square, so that copies of one MLP can part."""
    count, dtype = np.shape(mlps[0]["gate_proj"]["kernel"])[0], np.asarray(mlps[0]["gate_proj"]["kernel"]).dtype
    router_lDE = m.init_std * rng.standard_normal((count, m.hidden_size, len(mlps)))
    experts: dict[str, Any] = {"router": {"kernel": router_lDE.astype(dtype)}}
    for name in ("gate_proj", "up_proj", "down_proj"):
        weights_lEIO = np.stack([np.asarray(mlp[name]["kernel"]) for mlp in mlps], axis=1)
        if noise:
            rms = float(np.sqrt(np.mean(np.square(weights_lEIO, dtype=np.float64))))
            weights_lEIO = weights_lEIO + (noise * rms * rng.standard_normal(weights_lEIO.shape)).astype(dtype)
        experts[name] = weights_lEIO
    return experts


def upcycle(source: str | Path, out: str | Path, overrides: list[str] | None = None, noise: float = 0.0
            ) -> dict[str, Any]:
    """Write the upcycled run `out` (its config: the source's with `model.ffn=moe`, then
    `overrides`); returns a summary."""
    out = Path(out)
    check_new(out)
    if noise < 0:
        raise ConfigError("--noise", f"must be >= 0, got {noise}")
    source = read_source(source, "upcycle")
    config, params = source.config, source.params
    if config.model.ffn == "moe":
        raise ConfigError("--from", f"{source.parent['path']} is already a Mixture-of-Experts model (model.ffn=moe)")
    if config.model.ffn != "swiglu":
        raise ConfigError("--from", f"upcycling copies a SwiGLU MLP into the experts, not model.ffn={config.model.ffn}")
    values = to_dict(config)
    values["model"]["ffn"] = "moe"
    new = load_config(base=values, overrides=list(overrides or ()))
    m = new.model
    if m.ffn != "moe" or not _same_apart_from_moe(m, config.model):
        raise ConfigError("overrides", "upcycle keeps the model's shape; only Mixture-of-Experts options "
                          f"({', '.join('model.' + name for name in MOE_FIELDS)}) may be given")
    if m.moe_intermediate_size not in (0, m.intermediate_size):
        raise ConfigError("model.moe_intermediate_size", f"the experts are copies of the {m.intermediate_size}-wide "
                          f"MLP, got {m.moe_intermediate_size}")
    if m.moe_shared_expert_size:
        raise ConfigError("model.moe_shared_expert_size", "upcycling makes routed experts only; leave it 0")

    rng = np.random.default_rng(new.train.seed)
    layers = dict(params["layers"])
    dense = layers.pop("mlp")
    if m.moe_every == 1:
        params = dict(params, layers=dict(layers, mlp=experts_from([dense] * m.num_experts, m, rng, noise)))
    else:  # only the routed layers' MLPs become experts; the others stay as they are
        stacks = {stack: jax.tree.map(lambda x, held=held: np.asarray(x)[held], dense)
                  for (stack,), (_, held) in mlp_stacks(m).items()}
        params = dict(params, layers=layers, dense_mlp=stacks["dense_mlp"],
                      moe_mlp=experts_from([stacks["moe_mlp"]] * m.num_experts, m, rng, noise))
    layout = Layout.create(new)
    with jax.set_mesh(layout.mesh):
        initial = initial_weights(layout, params, m, np.dtype(m.param_dtype))
        Run.create(out, new, initial, "upcycle", [source.parent], num_experts=m.num_experts,
                   experts_per_token=m.experts_per_token, noise=noise)
    return {"run_dir": str(out.absolute()), "num_experts": m.num_experts, "experts_per_token": m.experts_per_token,
            "noise": noise, "function_preserving": noise == 0 and m.moe_renormalize and m.moe_capacity_factor == 0}
