"""Grouped-query attention with ParScale prefixes: one path for training, prefill and decoding.

Each query attends over C key/value slots: this stream's T prefix slots, then the tokens. In training
(and any full recomputation) those are the prefix parameters followed by the S tokens' own keys and
values; while generating they are a `KVCache` that holds the prefix in slots [0, T) and every token so
far after it, into which the S new tokens are written first. The mask `[B, S, C]` says which slots
each query sees; `attention_mask` builds it for training and generate.py for decoding.

The attention kernel that turns (queries, keys, values, mask) into outputs is chosen by
`model.attention` from `KERNELS`; a new implementation is a new entry there.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from parscale_jax.model.config import ModelConfig
from parscale_jax.model.layers import Linear, apply_rope, normal
from parscale_jax.model.params import ParScaleParam, declare


def einsum_attention(q_BSNH: jax.Array, k_BCKH: jax.Array, v_BCKH: jax.Array, mask_BSC: jax.Array) -> jax.Array:
    """Softmax attention written out, scores in float32. A query that sees no slot at all
    (left padding when P = 1) gets a uniform distribution instead of NaN, as the reference code does."""
    B, S, N, H = q_BSNH.shape
    K = k_BCKH.shape[2]
    q_BSKGH = q_BSNH.reshape(B, S, K, N // K, H)
    scores_BKGSC = jnp.einsum("bskgh,bckh->bkgsc", q_BSKGH, k_BCKH, preferred_element_type=jnp.float32) * H**-0.5
    scores_BKGSC = jnp.where(mask_BSC[:, None, None], scores_BKGSC, jnp.finfo(jnp.float32).min)
    probs_BKGSC = jax.nn.softmax(scores_BKGSC, axis=-1).astype(q_BSNH.dtype)
    return jnp.einsum("bkgsc,bckh->bskgh", probs_BKGSC, v_BCKH).reshape(B, S, N, H)


# model.attention -> (queries [B,S,N,H], keys [B,C,K,H], values [B,C,K,H], mask [B,S,C]) -> [B,S,N,H]
KERNELS = {"einsum": einsum_attention}


def attention_mask(segment_ids_BS: jax.Array, prefix_slots: int) -> jax.Array:
    """`[B, S, T + S]` bool for training: every query sees all T prefix slots, then the tokens
    causally, within one packed segment, and never padding (segment 0)."""
    B, S = segment_ids_BS.shape
    causal_SS = jnp.tril(jnp.ones((S, S), dtype=bool))
    same_segment_BSS = segment_ids_BS[:, :, None] == segment_ids_BS[:, None, :]
    key_is_real_BS = segment_ids_BS[:, None, :] != 0
    tokens_BSS = causal_SS[None] & same_segment_BSS & key_is_real_BS
    return jnp.concatenate([jnp.ones((B, S, prefix_slots), dtype=bool), tokens_BSS], axis=2)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of C slots per row, `[..., B, C, K, H]`: the prefix in [0, T), then the tokens
    so far. This step's S tokens go to slots [index, index + S); the model moves `index` on after
    the step. Stacked `[L, P, ...]` for the whole model, one layer and stream inside attention."""

    k: jax.Array
    v: jax.Array
    index: jax.Array  # int32 scalar

    def write(self, k_BSKH: jax.Array, v_BSKH: jax.Array) -> KVCache:
        at = (0, self.index, 0, 0)
        return KVCache(jax.lax.dynamic_update_slice(self.k, k_BSKH.astype(self.k.dtype), at),
                       jax.lax.dynamic_update_slice(self.v, v_BSKH.astype(self.v.dtype), at), self.index)


class Attention(nnx.Module):
    """Grouped-query attention whose keys/values start with this stream's prefix when P > 1."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg, rngs, D, N * H, ("embed", "heads"), bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg, rngs, D, K * H, ("embed", "kv_heads"), bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg, rngs, D, K * H, ("embed", "kv_heads"), bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg, rngs, N * H, D, ("heads", "embed"))
        if cfg.parscale_n > 1:
            shape = (cfg.parscale_n, K, cfg.parscale_n_tokens, H)
            axes = declare(("stream", "kv_heads", "prefix", "head_dim"), "prefix")
            init = normal(cfg.init_std)
            self.prefix_k = ParScaleParam(init(rngs.params(), shape, jnp.dtype(cfg.param_dtype)), **axes)
            self.prefix_v = ParScaleParam(init(rngs.params(), shape, jnp.dtype(cfg.param_dtype)), **axes)
        self.num_heads, self.num_kv_heads, self.head_dim = N, K, H
        self.dtype = jnp.dtype(cfg.dtype)
        self.kernel = KERNELS[cfg.attention]

    def __call__(self, x_BSD, cos_BSH, sin_BSH, mask_BSC, cache: KVCache | None = None):
        """(output `[B, S, D]`, the cache with this step's keys and values written, or None).

        Inside the stream vmap the prefixes are this stream's `[K, T, H]`.
        """
        B, S, _ = x_BSD.shape
        N, K, H = self.num_heads, self.num_kv_heads, self.head_dim
        # Named for the remat policies.
        q_BSNH = checkpoint_name(self.q_proj(x_BSD), "query_proj").reshape(B, S, N, H)
        k_BSKH = checkpoint_name(self.k_proj(x_BSD), "key_proj").reshape(B, S, K, H)
        v_BSKH = checkpoint_name(self.v_proj(x_BSD), "value_proj").reshape(B, S, K, H)
        q_BSNH, k_BSKH = apply_rope(q_BSNH, cos_BSH, sin_BSH), apply_rope(k_BSKH, cos_BSH, sin_BSH)

        if cache is None:  # the prefix (not rotated), then the tokens
            k_BCKH, v_BCKH = self._after_prefix(k_BSKH, "prefix_k"), self._after_prefix(v_BSKH, "prefix_v")
        else:  # the cache, which already holds the prefix and the earlier tokens
            cache = cache.write(k_BSKH, v_BSKH)
            k_BCKH, v_BCKH = cache.k.astype(self.dtype), cache.v.astype(self.dtype)
        out_BSNH = self.kernel(q_BSNH, k_BCKH, v_BCKH, mask_BSC)
        return self.o_proj(out_BSNH.reshape(B, S, N * H)), cache

    def _after_prefix(self, x_BSKH: jax.Array, name: str) -> jax.Array:
        if not hasattr(self, name):  # P = 1
            return x_BSKH
        prefix_KTH = getattr(self, name)[...].astype(self.dtype)
        B, (K, T, H) = x_BSKH.shape[0], prefix_KTH.shape
        return jnp.concatenate([jnp.broadcast_to(prefix_KTH.transpose(1, 0, 2), (B, T, K, H)), x_BSKH], axis=1)
