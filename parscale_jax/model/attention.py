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
    """Softmax attention written out, scores in float32.

    Heads go first, and the G query heads that share a kv head lie side by side along the queries
    (Q = G·S), so both products are plain batched matrix products over (batch, kv head). Hidden slots
    get the float32 minimum added, which leaves exactly that value: a query that sees no slot at all
    (left padding when P = 1) gets a uniform distribution instead of NaN, as the reference code does.
    """
    B, S, N, H = q_BSNH.shape
    C, K = k_BCKH.shape[1], k_BCKH.shape[2]
    G = N // K
    q_BKQH = (q_BSNH * H**-0.5).reshape(B, S, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * S, H)
    k_BKCH, v_BKCH = k_BCKH.transpose(0, 2, 1, 3), v_BCKH.transpose(0, 2, 1, 3)
    scores_BKGSC = jnp.einsum("bkqh,bkch->bkqc", q_BKQH, k_BKCH,
                              preferred_element_type=jnp.float32).reshape(B, K, G, S, C)
    scores_BKGSC = scores_BKGSC + jnp.where(mask_BSC, 0.0, jnp.finfo(jnp.float32).min)[:, None, None]
    probs_BKQC = jax.nn.softmax(scores_BKGSC, axis=-1).astype(q_BSNH.dtype).reshape(B, K, G * S, C)
    out_BKQH = jnp.einsum("bkqc,bkch->bkqh", probs_BKQC, v_BKCH)
    return out_BKQH.reshape(B, K, G, S, H).transpose(0, 3, 1, 2, 4).reshape(B, S, N, H)


def blockwise_attention(q_BSNH: jax.Array, k_BCKH: jax.Array, v_BCKH: jax.Array, mask_BSC: jax.Array,
                        block: int = 128) -> jax.Array:
    """`einsum_attention` over blocks of `block` queries, one at a time, each recomputed in the
    backward pass: the only scores that exist at once are one block's `[block, C]`, so the memory
    grows linearly in the sequence length (and the scores stay in cache)."""
    B, S, N, H = q_BSNH.shape
    if S <= block:
        return einsum_attention(q_BSNH, k_BCKH, v_BCKH, mask_BSC)
    blocks = -(-S // block)
    pad = blocks * block - S  # padded queries see nothing and are dropped
    q_nBbNH = jnp.pad(q_BSNH, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, blocks, block, N, H).swapaxes(0, 1)
    mask_nBbC = jnp.pad(mask_BSC, ((0, 0), (0, pad), (0, 0))).reshape(B, blocks, block, -1).swapaxes(0, 1)

    @jax.checkpoint
    def one_block(q_BbNH, mask_BbC):
        return einsum_attention(q_BbNH, k_BCKH, v_BCKH, mask_BbC)

    out_nBbNH = jax.lax.map(lambda blocks: one_block(*blocks), (q_nBbNH, mask_nBbC))
    return out_nBbNH.swapaxes(0, 1).reshape(B, blocks * block, N, H)[:, :S]


# model.attention -> (queries [B,S,N,H], keys [B,C,K,H], values [B,C,K,H], mask [B,S,C]) -> [B,S,N,H]
KERNELS = {"einsum": einsum_attention, "blockwise": blockwise_attention}


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
    """Keys and values of C slots per stream and row, `[..., P, B, C, K, H]`: the prefix in [0, T),
    then the tokens so far. This step's S tokens go to slots [index, index + S); the model moves
    `index` on after the step. Stacked `[L, P, ...]` for the whole model, one layer inside attention."""

    k: jax.Array
    v: jax.Array
    index: jax.Array  # int32 scalar

    def write(self, k_PBSKH: jax.Array, v_PBSKH: jax.Array) -> KVCache:
        at = (0, 0, self.index, 0, 0)
        return KVCache(jax.lax.dynamic_update_slice(self.k, k_PBSKH.astype(self.k.dtype), at),
                       jax.lax.dynamic_update_slice(self.v, v_PBSKH.astype(self.v.dtype), at), self.index)


class Attention(nnx.Module):
    """Grouped-query attention in which stream p's keys and values start with its prefix when P > 1."""

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

    def __call__(self, x_PBSD, cos_BSH, sin_BSH, mask_BSC, cache: KVCache | None = None):
        """(output `[P, B, S, D]`, the cache with this step's keys and values written, or None).

        The projections see the P streams as more rows (they share the weights); only the keys and
        values differ per stream, by the prefixes `[P, K, T, H]`.
        """
        P, B, S, _ = x_PBSD.shape
        N, K, H = self.num_heads, self.num_kv_heads, self.head_dim
        # Named for the remat policies.
        q_PBSNH = checkpoint_name(self.q_proj(x_PBSD), "query_proj").reshape(P, B, S, N, H)
        k_PBSKH = checkpoint_name(self.k_proj(x_PBSD), "key_proj").reshape(P, B, S, K, H)
        v_PBSKH = checkpoint_name(self.v_proj(x_PBSD), "value_proj").reshape(P, B, S, K, H)
        q_PBSNH, k_PBSKH = apply_rope(q_PBSNH, cos_BSH, sin_BSH), apply_rope(k_PBSKH, cos_BSH, sin_BSH)

        if cache is None:  # the prefix (not rotated), then the tokens
            k_PBCKH, v_PBCKH = self._after_prefix(k_PBSKH, "prefix_k"), self._after_prefix(v_PBSKH, "prefix_v")
        else:  # the cache, which already holds the prefix and the earlier tokens
            cache = cache.write(k_PBSKH, v_PBSKH)
            k_PBCKH, v_PBCKH = cache.k.astype(self.dtype), cache.v.astype(self.dtype)
        # The kernel sees one stream at a time; every stream has the same mask.
        if P == 1:
            out_PBSNH = self.kernel(q_PBSNH[0], k_PBCKH[0], v_PBCKH[0], mask_BSC)[None]
        else:
            out_PBSNH = jax.vmap(self.kernel, in_axes=(0, 0, 0, None))(q_PBSNH, k_PBCKH, v_PBCKH, mask_BSC)
        return self.o_proj(out_PBSNH.reshape(P, B, S, N * H)), cache

    def _after_prefix(self, x_PBSKH: jax.Array, name: str) -> jax.Array:
        if not hasattr(self, name):  # P = 1
            return x_PBSKH
        prefix_PKTH = getattr(self, name)[...].astype(self.dtype)
        (P, B), (_, K, T, H) = x_PBSKH.shape[:2], prefix_PKTH.shape
        prefix_PBTKH = jnp.broadcast_to(prefix_PKTH.transpose(0, 2, 1, 3)[:, None], (P, B, T, K, H))
        return jnp.concatenate([prefix_PBTKH, x_PBSKH], axis=2)
