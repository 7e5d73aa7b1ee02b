"""Growing a train state to a larger model (MSG): every old tensor goes into the leading block of
the new one, and the Adam moments with it.

The new model's sizes are all "more of the same axis" (hidden dimensions, MLP neurons, heads, layers
on top, streams), so along every axis the old entries come first: new weights are fresh (seeded)
wherever the old tensor does not reach, new moments zero, the optimizer's step count kept. The
masks of growth.py make the new entries contribute nothing at first, whatever their values.
The aggregator's input (`stream_embed`, stream-major p·D + d) is the one flattened axis: it is
grown as `[P, D]`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from parscale_jax.model import param_info
from parscale_jax.model.config import ModelConfig
from parscale_jax.layout import keys_of


def _unflattened(shape: tuple[int, ...], axes: tuple[str, ...], cfg: ModelConfig) -> tuple[int, ...]:
    sizes = []
    for size, axis in zip(shape, axes):
        sizes += [cfg.parscale_n, cfg.hidden_size] if axis == "stream_embed" else [size]
    return tuple(sizes)


def embed(old: jax.Array, new: jax.Array, axes: tuple[str, ...], old_cfg: ModelConfig,
          new_cfg: ModelConfig) -> jax.Array:
    """`new` with `old` written over its leading block."""
    old_x = old.reshape(_unflattened(old.shape, axes, old_cfg)).astype(new.dtype)
    new_x = new.reshape(_unflattened(new.shape, axes, new_cfg))
    return jax.lax.dynamic_update_slice(new_x, old_x, (0,) * new_x.ndim).reshape(new.shape)


def grow_tree(old_tree: Any, new_tree: Any, old_cfg: ModelConfig, new_cfg: ModelConfig) -> Any:
    """`new_tree` (parameters, or a train or optimizer state of the new model) with every leaf of
    `old_tree` at the same path written into it: parameter-shaped leaves (found by the parameter path
    their dict keys spell) over their leading block, the rest (step counts) as they are. A leaf the
    old model lacks (the aggregator when P grows from 1) keeps its new value."""
    axes_of = {keys_of(path): info.axes for path, info in jax.tree_util.tree_leaves_with_path(param_info(new_cfg))}
    old_leaves = dict(jax.tree_util.tree_leaves_with_path(old_tree))

    def grow(path, new):
        old = old_leaves.get(path)
        if old is None:
            return new
        axes = axes_of.get(keys_of(path))
        if axes is None or old.ndim == 0:
            return jnp.asarray(old, new.dtype)
        return embed(old, new, axes, old_cfg, new_cfg)

    return jax.tree_util.tree_map_with_path(grow, new_tree)


def grow_state(state: dict, new_state: dict, old_cfg: ModelConfig, new_cfg: ModelConfig) -> dict:
    """A train state of the new model (`new_state`: freshly created, its parameters seeded) that
    carries `state` on: parameters and moments over their leading blocks, the counts as they were."""
    return {name: grow_tree(state[name], new_state[name], old_cfg, new_cfg) for name in new_state}
