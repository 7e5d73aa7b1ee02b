"""Grouped-query attention with ParScale prefixes: one path for training, prefill and decoding.

Each query attends over C key/value slots: this stream's T prefix slots, then the tokens. In training
(and any full recomputation) those are the prefix parameters followed by the S tokens' own keys and
values; while generating they are a `KVCache` that holds the prefix in slots [0, T) and every token so
far after it, into which the S new tokens are written first. An `AttentionMask` says which slots
each query sees: from the segment ids in training (built block by block where a kernel asks), or
as the dense `[B, S, C]` array inference/generate.py gives while decoding.

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
from parscale_jax.model.layers import Linear, RMSNorm, apply_rope, normal
from parscale_jax.model.params import ParScaleParam, declare
from parscale_jax.model.splash import splash_attention
from parscale_jax.sharding import RULES


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Which of the C key slots each of the S queries sees, `[B, S, C]` bool, made only where asked.

    In training, from `segment_ids_BS`: every query sees the T prefix slots, then the tokens
    causally within its own packed segment, never padding (segment 0). While decoding,
    `visible_BSC` as given. `rows` makes the part for a block of queries only, so that a blockwise
    kernel never holds the whole `[S, C]`.
    """

    segment_ids_BS: jax.Array | None = None
    visible_BSC: jax.Array | None = None
    prefix_slots: int = dataclasses.field(default=0, metadata={"static": True})

    @property
    def num_queries(self) -> int:
        return (self.segment_ids_BS if self.visible_BSC is None else self.visible_BSC).shape[1]

    def full(self) -> jax.Array:
        return self.rows(0, self.num_queries)

    def rows(self, start, size: int) -> jax.Array:
        """`[B, size, C]` for queries start .. start + size (those past the last query see nothing)."""
        if self.visible_BSC is not None:
            padded_BSC = jnp.pad(self.visible_BSC, ((0, 0), (0, size), (0, 0)))
            return jax.lax.dynamic_slice_in_dim(padded_BSC, start, size, axis=1)
        segments_BS = self.segment_ids_BS
        B, S = segments_BS.shape
        query_segments_Bs = jax.lax.dynamic_slice_in_dim(jnp.pad(segments_BS, ((0, 0), (0, size))), start, size, 1)
        causal_sS = jnp.arange(S)[None, :] <= (start + jnp.arange(size))[:, None]
        tokens_BsS = (causal_sS[None] & (query_segments_Bs[:, :, None] == segments_BS[:, None, :])
                      & (segments_BS[:, None, :] != 0))
        return jnp.concatenate([jnp.ones((B, size, self.prefix_slots), dtype=bool), tokens_BsS], axis=2)


def einsum_attention(q_BSNH: jax.Array, k_BCKH: jax.Array, v_BCKH: jax.Array, mask: AttentionMask) -> jax.Array:
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
    scores_BKGSC = scores_BKGSC + jnp.where(mask.full(), 0.0, jnp.finfo(jnp.float32).min)[:, None, None]
    probs_BKQC = jax.nn.softmax(scores_BKGSC, axis=-1).astype(q_BSNH.dtype).reshape(B, K, G * S, C)
    out_BKQH = jnp.einsum("bkqc,bkch->bkqh", probs_BKQC, v_BKCH)
    return out_BKQH.reshape(B, K, G, S, H).transpose(0, 3, 1, 2, 4).reshape(B, S, N, H)


def blockwise_attention(q_BSNH: jax.Array, k_BCKH: jax.Array, v_BCKH: jax.Array, mask: AttentionMask,
                        block: int = 128) -> jax.Array:
    """The same attention, `block` queries at a time, forward and backward (as flash attention
    does): the only scores and mask that exist at once are one block's `[block, C]`, and the
    backward pass recomputes them from the saved outputs and log-sum-exps, so the memory grows
    linearly in the sequence length, and on a CPU the scores stay in cache."""
    B, S, N, H = q_BSNH.shape
    if S <= block:  # one block (decoding, short prompts)
        return einsum_attention(q_BSNH, k_BCKH, v_BCKH, mask)
    blocks = -(-S // block)
    q_nBbNH = jnp.pad(q_BSNH, ((0, 0), (0, blocks * block - S), (0, 0), (0, 0)))
    q_nBbNH = q_nBbNH.reshape(B, blocks, block, N, H).swapaxes(0, 1)
    out_nBbNH = _blockwise(q_nBbNH, k_BCKH.transpose(0, 2, 1, 3), v_BCKH.transpose(0, 2, 1, 3), mask)
    return out_nBbNH.swapaxes(0, 1).reshape(B, blocks * block, N, H)[:, :S]


def _block_logits(q_BbNH, k_BKCH, mask: AttentionMask, start):
    """(scaled scores `[B, K, G·b, C]` in float32, hidden slots at the float32 minimum; the block's
    scaled queries `[B, K, G·b, H]`) of the b queries from `start`."""
    B, b, N, H = q_BbNH.shape
    K, C = k_BKCH.shape[1], k_BKCH.shape[2]
    q_BKQH = (q_BbNH * H**-0.5).reshape(B, b, K, N // K, H).transpose(0, 2, 3, 1, 4).reshape(B, K, -1, H)
    scores_BKGbC = jnp.einsum("bkqh,bkch->bkqc", q_BKQH, k_BKCH, preferred_element_type=jnp.float32)
    bias_BbC = jnp.where(mask.rows(start, b), 0.0, jnp.finfo(jnp.float32).min)
    return (scores_BKGbC.reshape(B, K, N // K, b, C) + bias_BbC[:, None, None]).reshape(B, K, -1, C), q_BKQH


def _heads_last(x_BKQH, b: int):
    B, K, Q, H = x_BKQH.shape
    return x_BKQH.reshape(B, K, Q // b, b, H).transpose(0, 3, 1, 2, 4).reshape(B, b, -1, H)


def _heads_first(x_BbNH, K: int):
    B, b, N, H = x_BbNH.shape
    return x_BbNH.reshape(B, b, K, N // K, H).transpose(0, 2, 3, 1, 4).reshape(B, K, -1, H)


@jax.custom_vjp
def _blockwise(q_nBbNH, k_BKCH, v_BKCH, mask: AttentionMask):
    return _blockwise_forward(q_nBbNH, k_BKCH, v_BKCH, mask)[0]


def _blockwise_forward(q_nBbNH, k_BKCH, v_BKCH, mask: AttentionMask):
    b = q_nBbNH.shape[2]
    starts_n = jnp.arange(q_nBbNH.shape[0]) * b

    def one_block(xs):
        q_BbNH, start = xs
        logits_BKQC, _ = _block_logits(q_BbNH, k_BKCH, mask, start)
        max_BKQ1 = jnp.max(logits_BKQC, axis=-1, keepdims=True)
        exp_BKQC = jnp.exp(logits_BKQC - max_BKQ1)
        sum_BKQ1 = jnp.sum(exp_BKQC, axis=-1, keepdims=True)
        out_BKQH = jnp.einsum("bkqc,bkch->bkqh", (exp_BKQC / sum_BKQ1).astype(v_BKCH.dtype), v_BKCH)
        return _heads_last(out_BKQH, b), max_BKQ1 + jnp.log(sum_BKQ1)

    # A while loop, not a scan: autodiff of an enclosing scan would split a scan here into what does
    # and does not depend on the queries, and keep every block's mask for the backward pass.
    def step(carry):
        i, out_nBbNH, lse_nBKQ1 = carry
        out_BbNH, lse_BKQ1 = one_block((q_nBbNH[i], starts_n[i]))
        return i + 1, out_nBbNH.at[i].set(out_BbNH), lse_nBKQ1.at[i].set(lse_BKQ1)

    n = q_nBbNH.shape[0]
    shapes = jax.eval_shape(one_block, (q_nBbNH[0], starts_n[0]))
    init = (0, *(jnp.zeros((n, *x.shape), x.dtype) for x in shapes))
    _, out_nBbNH, lse_nBKQ1 = jax.lax.while_loop(lambda carry: carry[0] < n, step, init)
    return out_nBbNH, (q_nBbNH, k_BKCH, v_BKCH, mask, out_nBbNH, lse_nBKQ1)


def _blockwise_backward(residuals, dout_nBbNH):
    q_nBbNH, k_BKCH, v_BKCH, mask, out_nBbNH, lse_nBKQ1 = residuals
    b, K, H = q_nBbNH.shape[2], k_BKCH.shape[1], q_nBbNH.shape[-1]
    starts_n = jnp.arange(q_nBbNH.shape[0]) * b

    def one_block(dkv, xs):
        dk_BKCH, dv_BKCH = dkv
        q_BbNH, out_BbNH, dout_BbNH, lse_BKQ1, start = xs
        logits_BKQC, q_BKQH = _block_logits(q_BbNH, k_BKCH, mask, start)
        probs_BKQC = jnp.exp(logits_BKQC - lse_BKQ1)
        dout_BKQH = _heads_first(dout_BbNH, K)
        dv_BKCH += jnp.einsum("bkqc,bkqh->bkch", probs_BKQC.astype(dout_BKQH.dtype), dout_BKQH,
                              preferred_element_type=jnp.float32)
        dprobs_BKQC = jnp.einsum("bkqh,bkch->bkqc", dout_BKQH, v_BKCH, preferred_element_type=jnp.float32)
        rowsum_BKQ1 = jnp.sum(dout_BKQH.astype(jnp.float32) * _heads_first(out_BbNH, K), axis=-1, keepdims=True)
        dlogits_BKQC = (probs_BKQC * (dprobs_BKQC - rowsum_BKQ1)).astype(q_BKQH.dtype)
        dq_BKQH = jnp.einsum("bkqc,bkch->bkqh", dlogits_BKQC, k_BKCH) * H**-0.5
        dk_BKCH += jnp.einsum("bkqc,bkqh->bkch", dlogits_BKQC, q_BKQH, preferred_element_type=jnp.float32)
        return (dk_BKCH, dv_BKCH), _heads_last(dq_BKQH, b)

    zeros = jnp.zeros(k_BKCH.shape, jnp.float32)
    (dk_BKCH, dv_BKCH), dq_nBbNH = jax.lax.scan(
        one_block, (zeros, zeros), (q_nBbNH, out_nBbNH, dout_nBbNH, lse_nBKQ1, starts_n))
    return dq_nBbNH, dk_BKCH.astype(k_BKCH.dtype), dv_BKCH.astype(v_BKCH.dtype), None


_blockwise.defvjp(_blockwise_forward, _blockwise_backward)


def jax_attention(q_BSNH: jax.Array, k_BCKH: jax.Array, v_BCKH: jax.Array, mask: AttentionMask) -> jax.Array:
    """`jax.nn.dot_product_attention`, which takes cuDNN's fused flash attention on NVIDIA GPUs where
    it can (bfloat16 or float16) and XLA's elsewhere."""
    return jax.nn.dot_product_attention(q_BSNH, k_BCKH, v_BCKH, mask=mask.full()[:, None])


def splash(q_BSNH: jax.Array, k_BCKH: jax.Array, v_BCKH: jax.Array, mask: AttentionMask) -> jax.Array:
    """Pallas splash attention (splash.py) where the mask comes from segment ids (training, and any
    recomputation); while decoding, whose mask is given dense, the einsum kernel."""
    if mask.visible_BSC is not None:
        return einsum_attention(q_BSNH, k_BCKH, v_BCKH, mask)
    return splash_attention(q_BSNH, k_BCKH, v_BCKH, mask.segment_ids_BS)


# model.attention -> (queries [B,S,N,H], keys [B,C,K,H], values [B,C,K,H], AttentionMask) -> [B,S,N,H]
KERNELS = {"einsum": einsum_attention, "blockwise": blockwise_attention, "dot_product_attention": jax_attention,
           "splash": splash}


def attention_mask(segment_ids_BS: jax.Array, prefix_slots: int) -> AttentionMask:
    """The training mask: all T prefix slots, then the tokens causally within one packed segment."""
    return AttentionMask(segment_ids_BS=segment_ids_BS, prefix_slots=prefix_slots)


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
    """Grouped-query attention in which stream p's keys and values start with its prefix when P > 1.

    With `model.qk_norm` (Qwen3), each query and key head is RMS-normalized over head_dim before
    RoPE. The prefixes are keys and values as the attention uses them: `prefix_k` is taken as it is
    (neither normalized nor rotated), as a cache holds the tokens' keys after both. So a prefix made
    from the model's own keys (recycle.py reads them from its cache) is already normalized.
    """

    OUTPUT_PROJECTIONS = ("o_proj",)  # what adds to the residual stream (`lm.residual_outputs`)

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg, rngs, D, N * H, ("embed", "heads"), bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg, rngs, D, K * H, ("embed", "kv_heads"), bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg, rngs, D, K * H, ("embed", "kv_heads"), bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg, rngs, N * H, D, ("heads", "embed"))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg, H, "head_dim")
            self.k_norm = RMSNorm(cfg, H, "head_dim")
        if cfg.parscale_n > 1:
            shape = (cfg.parscale_n, K, cfg.parscale_n_tokens, H)
            axes = declare(("stream", "kv_heads", "prefix", "head_dim"), "prefix")
            init = normal(cfg.init_std)
            self.prefix_k = ParScaleParam(init(rngs.params(), shape, jnp.dtype(cfg.param_dtype)), **axes)
            self.prefix_v = ParScaleParam(init(rngs.params(), shape, jnp.dtype(cfg.param_dtype)), **axes)
        self.num_heads, self.num_kv_heads, self.head_dim = N, K, H
        self.dtype = jnp.dtype(cfg.dtype)
        self.kernel = KERNELS[cfg.attention]

    def __call__(self, x_PBSD, cos_BSH, sin_BSH, mask, cache: KVCache | None = None,
                 live_N: jax.Array | None = None):
        """(output `[P, B, S, D]`, the cache with this step's keys and values written, or None).

        The projections see the P streams as more rows (they share the weights); only the keys and
        values differ per stream, by the prefixes `[P, K, T, H]`. `live_N` masks the heads' outputs
        while new heads fade in.
        """
        P, B, S, _ = x_PBSD.shape
        N, K, H = self.num_heads, self.num_kv_heads, self.head_dim
        # Named for the remat policies.
        q_PBSNH = checkpoint_name(self.q_proj(x_PBSD), "query_proj").reshape(P, B, S, N, H)
        k_PBSKH = checkpoint_name(self.k_proj(x_PBSD), "key_proj").reshape(P, B, S, K, H)
        v_PBSKH = checkpoint_name(self.v_proj(x_PBSD), "value_proj").reshape(P, B, S, K, H)
        if hasattr(self, "q_norm"):
            q_PBSNH, k_PBSKH = self.q_norm(q_PBSNH), self.k_norm(k_PBSKH)
        q_PBSNH, k_PBSKH = apply_rope(q_PBSNH, cos_BSH, sin_BSH), apply_rope(k_PBSKH, cos_BSH, sin_BSH)

        if cache is None:  # the prefix (not rotated), then the tokens
            k_PBCKH, v_PBCKH = self._after_prefix(k_PBSKH, "prefix_k"), self._after_prefix(v_PBSKH, "prefix_v")
        else:  # the cache, which already holds the prefix and the earlier tokens
            cache = cache.write(k_PBSKH, v_PBSKH)
            k_PBCKH, v_PBCKH = cache.k.astype(self.dtype), cache.v.astype(self.dtype)
        # The kernel sees one stream at a time (split over the stream devices); every stream has the
        # same mask.
        if P == 1:
            out_PBSNH = self.kernel(q_PBSNH[0], k_PBCKH[0], v_PBCKH[0], mask)[None]
        else:
            out_PBSNH = jax.vmap(self.kernel, in_axes=(0, 0, 0, None), spmd_axis_name=RULES["stream"] or None)(
                q_PBSNH, k_PBCKH, v_PBCKH, mask)
        if live_N is not None:
            out_PBSNH = out_PBSNH * live_N[:, None].astype(out_PBSNH.dtype)
        return self.o_proj(out_PBSNH.reshape(P, B, S, N * H)), cache

    def _after_prefix(self, x_PBSKH: jax.Array, name: str) -> jax.Array:
        if not hasattr(self, name):  # P = 1
            return x_PBSKH
        prefix_PKTH = getattr(self, name)[...].astype(self.dtype)
        (P, B), (_, K, T, H) = x_PBSKH.shape[:2], prefix_PKTH.shape
        prefix_PBTKH = jnp.broadcast_to(prefix_PKTH.transpose(0, 2, 1, 3)[:, None], (P, B, T, K, H))
        return jnp.concatenate([prefix_PBTKH, x_PBSKH], axis=2)
