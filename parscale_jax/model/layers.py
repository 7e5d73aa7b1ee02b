"""Building blocks shared by the model's modules: declared linear layers, RMSNorm, rotary embeddings,
and `Aux`, the side outputs (auxiliary losses, statistics) that layers hand up to the training step."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from parscale_jax.model.config import ModelConfig
from parscale_jax.model.params import declare


class Aux(NamedTuple):
    """Scalars a forward pass reports besides its logits, by name.

    `losses` are added to the training objective as they are (each module weighs its own, as a mean
    over tokens); `stats` are only logged. Per-layer values are averaged over layers and streams.
    """

    losses: dict[str, jax.Array]
    stats: dict[str, jax.Array]

    @staticmethod
    def none() -> Aux:
        return Aux({}, {})

    def merge(self, other: Aux) -> Aux:
        return Aux({**self.losses, **other.losses}, {**self.stats, **other.stats})

    def mean(self) -> Aux:
        """Each value averaged over its leading axes (layers, streams), down to a scalar."""
        return jax.tree.map(jnp.mean, self)


class GrowthMasks(NamedTuple):
    """While a grown model's new parts fade in (growth.py): 1 on the old entries, m in [0, 1) on the
    new ones; None where that size did not grow. `depth` is `[L]` for the model and one layer's
    scalar inside a Block."""

    hidden_D: jax.Array | None = None  # the residual stream's dimensions
    mlp_F: jax.Array | None = None  # the MLP's neurons
    heads_N: jax.Array | None = None  # the query heads (new ones come with their own kv heads)
    depth: jax.Array | None = None  # a new layer adds m times its change to the residual stream
    streams_P: jax.Array | None = None  # a new stream's share of the mix


def masked(x: jax.Array, live: jax.Array | None) -> jax.Array:
    """`x` times a mask over its last axis (as is without one)."""
    return x if live is None else x * live.astype(x.dtype)


def normal(std: float):
    return nnx.initializers.normal(stddev=std)


class Linear(nnx.Module):
    """`x @ kernel (+ bias)` over the last axis, with a `[d_in, d_out]` kernel that declares its axes.

    The rows are flattened to one axis first. Autodiff then gives the weight gradient as one
    contraction over the rows (`x_MI^T @ dy_MO`), which XLA:CPU runs as a transposed matrix product;
    over `[B, S]` as two axes it materializes the transpose of `dy`, the slowest op of the step.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, d_in: int, d_out: int, axes: tuple[str, str],
                 bias: bool = False, kind: str = "matrix"):
        param_dtype = jnp.dtype(cfg.param_dtype)
        self.kernel = nnx.Param(normal(cfg.init_std)(rngs.params(), (d_in, d_out), param_dtype), **declare(axes, kind))
        if bias:
            zeros = nnx.initializers.zeros(rngs.params(), (d_out,), param_dtype)  # a key, as nnx.Linear takes one
            self.bias = nnx.Param(zeros, **declare(axes[1:], "bias"))
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        y_MO = x.reshape(-1, x.shape[-1]).astype(self.dtype) @ self.kernel[...].astype(self.dtype)
        if hasattr(self, "bias"):
            y_MO = y_MO + self.bias[...].astype(self.dtype)
        return y_MO.reshape(*x.shape[:-1], y_MO.shape[-1])


class RMSNorm(nnx.Module):
    """Over the hidden size, or over `width` features along logical axis `axis` (a head's, say)."""

    def __init__(self, cfg: ModelConfig, width: int | None = None, axis: str = "norm"):
        width = cfg.hidden_size if width is None else width
        self.weight = nnx.Param(jnp.ones((width,), jnp.dtype(cfg.param_dtype)), **declare((axis,), "norm"))
        self.eps = cfg.rms_norm_eps
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x: jax.Array, live_D: jax.Array | None = None) -> jax.Array:
        """Normalize in float32 (as Qwen2 does), scale in the compute dtype. With a growth mask the
        statistic is over the live dimensions (their mask summed) and the output is masked again."""
        x32 = x.astype(jnp.float32)
        if live_D is None:
            mean_square = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        else:
            mean_square = jnp.sum(x32 * x32, axis=-1, keepdims=True) / jnp.sum(live_D)
        x32 = x32 * jax.lax.rsqrt(mean_square + self.eps)
        return masked(self.weight[...].astype(self.dtype) * x32.astype(self.dtype), live_D)


def rope_tables(positions_BS: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables `[B, S, H]` for rotate-half rotary embeddings (the Qwen2/Llama layout)."""
    inv_freq_h = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles_BSh = positions_BS.astype(jnp.float32)[..., None] * inv_freq_h
    angles_BSH = jnp.concatenate([angles_BSh, angles_BSh], axis=-1)
    return jnp.cos(angles_BSH), jnp.sin(angles_BSH)


def apply_rope(x: jax.Array, cos_BSH: jax.Array, sin_BSH: jax.Array) -> jax.Array:
    """Rotate `x`, queries or keys `[..., B, S, heads, H]` (any leading axes, the streams', say)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos_BSH[..., None, :].astype(x.dtype), sin_BSH[..., None, :].astype(x.dtype)
    return x * cos + rotated * sin
