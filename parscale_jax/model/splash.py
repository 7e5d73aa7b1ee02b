"""Pallas splash attention (TPU; interpreted elsewhere) over the tokens, with the ParScale prefix.

Splash attention masks by a static pattern (causal here) and by equal segment ids, which cannot say
"every query sees the T prefix slots". So the tokens go through the splash kernel and the prefix,
T slots only, is attended to directly; the two halves are joined by their log-sum-exps, as one
softmax over all T + S slots. The backward pass reuses splash's own dq and dkv kernels with the
joined output and log-sum-exp as their residuals: those are exactly the full attention's, so the
kernels return the full attention's gradients for the token keys and values, and the prefix's come
from the same formula written out.

The kernels work on one (row, kv head) at a time: the G query heads of a kv head are splash's
"multi-query" heads. On a mesh each device runs the kernels on its own rows and kv heads
(`jax.shard_map`; the streams are split by the caller's `vmap`). Sequences are padded to whole 128-token blocks, the pad in a segment of its own.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from parscale_jax.sharding import rules_for, spec

# The private functions of jax's splash kernels called below (`_splash_attention_forward`, `_bwd`)
# are those of this release; another may change them without notice.
SPLASH_JAX = "0.10.2"
LANES = 128  # splash blocks are whole multiples of the TPU's 128 lanes
PAD_SEGMENT = -1  # the block-alignment pad: its queries see only the pad, no real query sees it


def unsupported() -> str | None:
    """Why this jax cannot run the kernels below, or None."""
    if jax.__version__ != SPLASH_JAX:
        return (f"'splash' calls private functions of jax {SPLASH_JAX}'s splash attention, and this is jax "
                f"{jax.__version__}: choose blockwise, einsum or dot_product_attention")
    return None


def splash_attention(q_BSNH: jax.Array, k_BCKH: jax.Array, v_BCKH: jax.Array, segment_ids_BS: jax.Array
                     ) -> jax.Array:
    """Attention of each query over the C - S prefix slots and, causally, the tokens of its own
    segment. Padding (segment 0) sees padding, never a document, so every row sees a slot."""
    B, S, N, H = q_BSNH.shape
    K = k_BCKH.shape[2]
    block = 512 if S > 512 else LANES
    S_pad = -(-S // block) * block
    pad = ((0, 0), (0, S_pad - S))
    segments_BS = jnp.pad(segment_ids_BS.astype(jnp.int32), pad, constant_values=PAD_SEGMENT)
    q_BKGSH = jnp.pad(q_BSNH * H**-0.5, (*pad, (0, 0), (0, 0))).reshape(B, S_pad, K, N // K, H).transpose(0, 2, 3, 1, 4)
    k_BKCH, v_BKCH = (jnp.pad(x, (*pad, (0, 0), (0, 0))).transpose(0, 2, 1, 3) for x in (k_BCKH, v_BCKH))

    def run(interpret: bool, *args):
        # The kernel's mask tables are made while tracing, as constants of the program.
        kernel = splash.make_splash_mqa_single_device(
            splash_mask.MultiHeadMask([splash_mask.CausalMask((S_pad, S_pad))] * (N // K)),
            block_sizes=splash.BlockSizes(*(block,) * 8), interpret=interpret)
        per_head = jax.vmap(_attend, in_axes=(None, 0, 0, 0, None))
        return jax.vmap(per_head, in_axes=(None, 0, 0, 0, 0))(kernel, *args)

    # Compiled for a TPU (also from another host, as `plan` does) the kernels are Mosaic's;
    # anywhere else the same kernels run interpreted.
    def attend(*args):
        return jax.lax.platform_dependent(*args, tpu=functools.partial(run, False),
                                          default=functools.partial(run, True))

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:  # a Mosaic kernel cannot be partitioned by XLA: each device runs its own part
        rules = rules_for(K, mesh.shape, fsdp=False)
        q_spec = spec(("batch", "kv_heads", None, None, None), rules)
        attend = jax.shard_map(attend, in_specs=(q_spec, spec(("batch", "kv_heads", None, None), rules),
                                                 spec(("batch", "kv_heads", None, None), rules),
                                                 spec(("batch", None), rules)), out_specs=q_spec,
                               check_vma=False)
    out_BKGSH = attend(q_BKGSH, k_BKCH, v_BKCH, segments_BS)
    return out_BKGSH.transpose(0, 3, 1, 2, 4).reshape(B, S_pad, N, H)[:, :S].astype(q_BSNH.dtype)


def _tokens_forward(kernel, q_GSH, k_SH, v_SH, segments_S):
    """Splash over the tokens alone: (output [G, S, H], log-sum-exp [G, S])."""
    options = kernel.kwargs
    out_GSH, (lse_GS,) = splash._splash_attention_forward(
        kernel.fwd_mask_info, q_GSH, k_SH, v_SH, splash.SegmentIds(segments_S, segments_S), None,
        options["mask_value"], True, options["block_sizes"], None, True, options["mask_function"],
        interpret=options["interpret"])
    return out_GSH, lse_GS


def _tokens_backward(kernel, q_GSH, k_SH, v_SH, segments_S, out_GSH, lse_GS, dout_GSH):
    """Splash's dq and dkv kernels, given the output and log-sum-exp they are to differentiate."""
    options = kernel.kwargs
    residuals = (q_GSH, k_SH, v_SH, splash.SegmentIds(segments_S, segments_S), None, out_GSH, lse_GS,
                 kernel.dq_mask_info, kernel.dkv_mask_info)
    grads = splash._splash_attention_bwd(False, options["mask_value"], True, options["block_sizes"], None,
                                         options["mask_function"], None, options["interpret"], residuals, dout_GSH)
    return grads[3:6]  # dq, dk, dv


@jax.custom_vjp
def _attend(kernel, q_GSH, k_CH, v_CH, segments_S):
    """One (row, kv head): queries [G, S, H] (scaled), keys and values [T + S, H] -> [G, S, H]."""
    return _attend_forward(kernel, q_GSH, k_CH, v_CH, segments_S)[0]


def _attend_forward(kernel, q_GSH, k_CH, v_CH, segments_S):
    T = k_CH.shape[0] - segments_S.shape[0]
    tokens_GSH, lse_tokens_GS = _tokens_forward(kernel, q_GSH, k_CH[T:], v_CH[T:], segments_S)
    scores_GST = jnp.einsum("gsh,th->gst", q_GSH, k_CH[:T], preferred_element_type=jnp.float32)
    lse_GS = jnp.logaddexp(lse_tokens_GS, jax.nn.logsumexp(scores_GST, axis=-1))
    out_GSH = (jnp.exp(lse_tokens_GS - lse_GS)[..., None] * tokens_GSH
               + jnp.einsum("gst,th->gsh", jnp.exp(scores_GST - lse_GS[..., None]), v_CH[:T]))
    out_GSH = out_GSH.astype(q_GSH.dtype)
    return out_GSH, (kernel, q_GSH, k_CH, v_CH, segments_S, out_GSH, lse_GS)


def _attend_backward(residuals, dout_GSH):
    kernel, q_GSH, k_CH, v_CH, segments_S, out_GSH, lse_GS = residuals
    T = k_CH.shape[0] - segments_S.shape[0]
    dq_GSH, dk_SH, dv_SH = _tokens_backward(kernel, q_GSH, k_CH[T:], v_CH[T:], segments_S, out_GSH, lse_GS,
                                            dout_GSH)
    # The prefix slots: the softmax gradient written out (probabilities under the joined lse).
    probs_GST = jnp.exp(jnp.einsum("gsh,th->gst", q_GSH, k_CH[:T], preferred_element_type=jnp.float32)
                        - lse_GS[..., None])
    rowsum_GS = jnp.sum(dout_GSH.astype(jnp.float32) * out_GSH, axis=-1)
    dprobs_GST = jnp.einsum("gsh,th->gst", dout_GSH, v_CH[:T], preferred_element_type=jnp.float32)
    dscores_GST = probs_GST * (dprobs_GST - rowsum_GS[..., None])
    dq_GSH = dq_GSH + jnp.einsum("gst,th->gsh", dscores_GST, k_CH[:T]).astype(dq_GSH.dtype)
    dk_TH = jnp.einsum("gst,gsh->th", dscores_GST, q_GSH)
    dv_TH = jnp.einsum("gst,gsh->th", probs_GST, dout_GSH)
    dk_CH = jnp.concatenate([dk_TH.astype(k_CH.dtype), dk_SH.astype(k_CH.dtype)])
    dv_CH = jnp.concatenate([dv_TH.astype(v_CH.dtype), dv_SH.astype(v_CH.dtype)])
    return None, dq_GSH, dk_CH, dv_CH, None


_attend.defvjp(_attend_forward, _attend_backward)
