"""The ParScale decoder (SPEC §1) in Flax NNX.

A Qwen2/Llama-style backbone runs over P parallel streams of the same input. The streams share
every backbone weight and differ only by a learned per-layer key/value prefix; their final hidden
states are mixed by an input-dependent softmax weighting before the shared LM head.

Module names follow the Hugging Face state-dict names (`embed_tokens`, `layers.self_attn.q_proj`,
...), so conversion is close to an identity. The L layers are stacked (every layer weight has a
leading `[L]` axis) and run under `lax.scan`; the streams are a `jax.vmap` axis over that scan.

Shape suffixes: B batch, S sequence, D hidden, N query heads, K kv heads, G query heads per kv head,
H head_dim, T prefix tokens (+ S keys), P streams, F MLP width, V vocab, L layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from parscale_jax.config import ModelConfig
from parscale_jax.sharding import constrain


class ParScaleParam(nnx.Param):
    """A parameter that exists only for P > 1: the prefixes and the aggregator.

    Its own variable type makes "train only the ParScale parameters" and "swap one set of them"
    a filter on the model state rather than a list of names.
    """


def _normal(std: float):
    return nnx.initializers.normal(stddev=std)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype: jnp.dtype, param_dtype: jnp.dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        # Normalize in float32 (as Qwen2 does), scale in the compute dtype.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * x32.astype(self.dtype)


def rope_tables(positions_BS: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables `[B, S, H]` for rotate-half rotary embeddings (the Qwen2/Llama layout)."""
    inv_freq_h = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles_BSh = positions_BS.astype(jnp.float32)[..., None] * inv_freq_h
    angles_BSH = jnp.concatenate([angles_BSh, angles_BSh], axis=-1)
    return jnp.cos(angles_BSH), jnp.sin(angles_BSH)


def apply_rope(x_BSXH: jax.Array, cos_BSH: jax.Array, sin_BSH: jax.Array) -> jax.Array:
    half = x_BSXH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BSXH[..., half:], x_BSXH[..., :half]], axis=-1)
    cos, sin = cos_BSH[:, :, None, :].astype(x_BSXH.dtype), sin_BSH[:, :, None, :].astype(x_BSXH.dtype)
    return x_BSXH * cos + rotated * sin


def attention_mask(segment_ids_BS: jax.Array) -> jax.Array:
    """`[B, S, S]` bool: causal, within one packed segment, and never onto padding (segment 0)."""
    S = segment_ids_BS.shape[1]
    causal_SS = jnp.tril(jnp.ones((S, S), dtype=bool))
    same_segment_BSS = segment_ids_BS[:, :, None] == segment_ids_BS[:, None, :]
    key_is_real_BS = segment_ids_BS[:, None, :] != 0
    return causal_SS[None] & same_segment_BSS & key_is_real_BS


class Attention(nnx.Module):
    """Grouped-query attention whose keys/values are `[prefix ; tokens]` when P > 1."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        linear = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=_normal(cfg.init_std), rngs=rngs)
        self.q_proj = nnx.Linear(D, N * H, use_bias=cfg.qkv_bias, **linear)
        self.k_proj = nnx.Linear(D, K * H, use_bias=cfg.qkv_bias, **linear)
        self.v_proj = nnx.Linear(D, K * H, use_bias=cfg.qkv_bias, **linear)
        self.o_proj = nnx.Linear(N * H, D, use_bias=False, **linear)
        if cfg.parscale_n > 1:
            shape = (cfg.parscale_n, K, cfg.parscale_n_tokens, H)
            init = _normal(cfg.init_std)
            self.prefix_k = ParScaleParam(init(rngs.params(), shape, param_dtype))
            self.prefix_v = ParScaleParam(init(rngs.params(), shape, param_dtype))
        self.num_heads, self.num_kv_heads, self.head_dim = N, K, H
        self.dtype = dtype

    def __call__(self, x_BSD, cos_BSH, sin_BSH, mask_BSS, prefix_k_KTH=None, prefix_v_KTH=None):
        B, S, _ = x_BSD.shape
        K, H = self.num_kv_heads, self.head_dim
        q_BSNH, k_BSKH, v_BSKH = self._qkv(x_BSD, cos_BSH, sin_BSH)

        if prefix_k_KTH is not None:
            # The prefix is not rotated and every query sees all of it.
            T = prefix_k_KTH.shape[1]
            prefix_k_BTKH = jnp.broadcast_to(prefix_k_KTH.transpose(1, 0, 2).astype(self.dtype), (B, T, K, H))
            prefix_v_BTKH = jnp.broadcast_to(prefix_v_KTH.transpose(1, 0, 2).astype(self.dtype), (B, T, K, H))
            k_BSKH = jnp.concatenate([prefix_k_BTKH, k_BSKH], axis=1)
            v_BSKH = jnp.concatenate([prefix_v_BTKH, v_BSKH], axis=1)
            mask_BSS = jnp.concatenate([jnp.ones((B, S, T), dtype=bool), mask_BSS], axis=2)

        return self._attend(q_BSNH, k_BSKH, v_BSKH, mask_BSS)

    def cached(self, x_BSD, cos_BSH, sin_BSH, cache_k_BCKH, cache_v_BCKH, index, visible_BSC):
        """Attention of S new tokens against a KV cache of C slots, for generation.

        The cache holds this stream's prefix in slots [0, T) and earlier tokens after it; the new
        keys/values are written at slots [index, index + S). `visible_BSC` says which slots each new
        query may see. Returns (output, updated cache_k, updated cache_v).
        """
        q_BSNH, k_BSKH, v_BSKH = self._qkv(x_BSD, cos_BSH, sin_BSH)
        cache_k_BCKH = jax.lax.dynamic_update_slice(cache_k_BCKH, k_BSKH.astype(cache_k_BCKH.dtype), (0, index, 0, 0))
        cache_v_BCKH = jax.lax.dynamic_update_slice(cache_v_BCKH, v_BSKH.astype(cache_v_BCKH.dtype), (0, index, 0, 0))
        out = self._attend(q_BSNH, cache_k_BCKH.astype(self.dtype), cache_v_BCKH.astype(self.dtype), visible_BSC)
        return out, cache_k_BCKH, cache_v_BCKH

    def _qkv(self, x_BSD, cos_BSH, sin_BSH):
        """Queries, keys (both rotated) and values of the tokens; named for the remat policies."""
        B, S, _ = x_BSD.shape
        N, K, H = self.num_heads, self.num_kv_heads, self.head_dim
        q_BSNH = checkpoint_name(self.q_proj(x_BSD), "query_proj").reshape(B, S, N, H)
        k_BSKH = checkpoint_name(self.k_proj(x_BSD), "key_proj").reshape(B, S, K, H)
        v_BSKH = checkpoint_name(self.v_proj(x_BSD), "value_proj").reshape(B, S, K, H)
        return apply_rope(q_BSNH, cos_BSH, sin_BSH), apply_rope(k_BSKH, cos_BSH, sin_BSH), v_BSKH

    def _attend(self, q_BSNH, k_BTKH, v_BTKH, mask_BST):
        # Scores and softmax in float32. A query with no visible key (padding, P = 1) gets a uniform
        # distribution instead of NaN, which is what the reference implementation computes too.
        B, S, N, H = q_BSNH.shape
        K = k_BTKH.shape[2]
        q_BSKGH = q_BSNH.reshape(B, S, K, N // K, H)
        scores_BKGST = jnp.einsum("bskgh,btkh->bkgst", q_BSKGH, k_BTKH,
                                  preferred_element_type=jnp.float32) * H**-0.5
        scores_BKGST = jnp.where(mask_BST[:, None, None], scores_BKGST, jnp.finfo(jnp.float32).min)
        probs_BKGST = jax.nn.softmax(scores_BKGST, axis=-1).astype(self.dtype)
        out_BSKGH = jnp.einsum("bkgst,btkh->bskgh", probs_BKGST, v_BTKH)
        return self.o_proj(out_BSKGH.reshape(B, S, N * H))


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, F = cfg.hidden_size, cfg.intermediate_size
        linear = dict(use_bias=False, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                      kernel_init=_normal(cfg.init_std), rngs=rngs)
        self.gate_proj = nnx.Linear(D, F, **linear)
        self.up_proj = nnx.Linear(D, F, **linear)
        self.down_proj = nnx.Linear(F, D, **linear)

    def __call__(self, x_BSD):
        return self.down_proj(nnx.silu(self.gate_proj(x_BSD)) * self.up_proj(x_BSD))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        norm = dict(eps=cfg.rms_norm_eps, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_BSD, cos_BSH, sin_BSH, mask_BSS, prefix_k_KTH=None, prefix_v_KTH=None):
        x_BSD = x_BSD + self.self_attn(self.input_layernorm(x_BSD), cos_BSH, sin_BSH, mask_BSS,
                                       prefix_k_KTH, prefix_v_KTH)
        return x_BSD + self.mlp(self.post_attention_layernorm(x_BSD))

    def cached(self, x_BSD, cos_BSH, sin_BSH, cache_k_BCKH, cache_v_BCKH, index, visible_BSC):
        attended, cache_k_BCKH, cache_v_BCKH = self.self_attn.cached(
            self.input_layernorm(x_BSD), cos_BSH, sin_BSH, cache_k_BCKH, cache_v_BCKH, index, visible_BSC)
        x_BSD = x_BSD + attended
        return x_BSD + self.mlp(self.post_attention_layernorm(x_BSD)), cache_k_BCKH, cache_v_BCKH


REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole layer
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "qkv_proj": jax.checkpoint_policies.save_only_these_names("query_proj", "key_proj", "value_proj"),
}


def run_layers(layers_def, shared_state, prefix_state, x_BSD, cos_BSH, sin_BSH, mask_BSS,
               remat: str = "none"):
    """One stream through the L stacked layers under `lax.scan`.

    `shared_state` holds the layer weights `[L, ...]`; `prefix_state` this stream's prefixes
    `[L, K, T, H]` (empty when P = 1).
    """

    def layer(x_BSD, layer_states):
        block = nnx.merge(layers_def, *layer_states)
        prefix_k = prefix_v = None
        if len(layer_states[1]) > 0:
            prefix_k, prefix_v = block.self_attn.prefix_k[...], block.self_attn.prefix_v[...]
        x_BSD = block(x_BSD, cos_BSH, sin_BSH, mask_BSS, prefix_k, prefix_v)
        return constrain(x_BSD, ("batch", "length", "act_embed")), None

    if remat != "none":
        layer = jax.checkpoint(layer, policy=REMAT_POLICIES[remat], prevent_cse=False)
    x_BSD, _ = jax.lax.scan(layer, x_BSD, (shared_state, prefix_state))
    return x_BSD


class ParScaleLM(nnx.Module):
    """Embedding → P streams of the shared decoder → aggregation → LM head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.head_dim is None:
            raise ValueError("ModelConfig.head_dim is unset; build configs with parscale_jax.config.validate")
        self.config = cfg
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        D, P = cfg.hidden_size, cfg.parscale_n
        self.embed_tokens = nnx.Embed(cfg.vocab_size, D, dtype=dtype, param_dtype=param_dtype,
                                      embedding_init=_normal(cfg.init_std), rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(D, cfg.rms_norm_eps, dtype, param_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Linear(D, cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                                      kernel_init=_normal(cfg.init_std), rngs=rngs)
        if P > 1:
            # Input features are stream-major (p * D + d); the Hugging Face format interleaves
            # them (d * P + p), which the converter permutes.
            init = _normal(cfg.init_std)
            self.aggregate_in_kernel = ParScaleParam(init(rngs.params(), (P * D, D), param_dtype))
            self.aggregate_in_bias = ParScaleParam(jnp.zeros((D,), param_dtype))
            self.aggregate_out_kernel = ParScaleParam(init(rngs.params(), (D, P), param_dtype))
            self.aggregate_out_bias = ParScaleParam(jnp.zeros((P,), param_dtype))

    def streams(self, x_BSD, positions_BS, segment_ids_BS) -> jax.Array:
        """Final-normed hidden states of every stream, `[P, B, S, D]`."""
        cfg = self.config
        cos_BSH, sin_BSH = rope_tables(positions_BS, cfg.head_dim, cfg.rope_theta)
        mask_BSS = attention_mask(segment_ids_BS)
        layers_def, prefix_state, shared_state = nnx.split(self.layers, ParScaleParam, ...)

        def one_stream(shared_state, prefix_state, x_BSD):
            h_BSD = run_layers(layers_def, shared_state, prefix_state, x_BSD, cos_BSH, sin_BSH,
                               mask_BSS, cfg.remat)
            return self.norm(h_BSD)

        if cfg.parscale_n == 1:
            return one_stream(shared_state, prefix_state, x_BSD)[None]
        # Shared weights broadcast, prefixes `[L, P, ...]` mapped over P. The stream axis is named
        # so that sharding constraints inside can place it on the `stream` mesh axis.
        return jax.vmap(one_stream, in_axes=(None, 1, None), spmd_axis_name="stream")(
            shared_state, prefix_state, x_BSD)

    def decode(self, tokens_BS, positions_BS, cache: dict, index, visible_BSC) -> tuple[jax.Array, dict]:
        """Logits `[B, S, V]` of S new tokens written into the KV cache at slot `index`, and the
        updated cache. `cache` holds "k" and "v", each `[L, P, B, C, K, H]` (see generate.py)."""
        cfg = self.config
        cos_BSH, sin_BSH = rope_tables(positions_BS, cfg.head_dim, cfg.rope_theta)
        layers_def, prefix_state, shared_state = nnx.split(self.layers, ParScaleParam, ...)
        x_BSD = constrain(self.embed_tokens(tokens_BS), ("batch", "length", "act_embed"))

        def one_stream(shared_state, prefix_state, cache_k_LBCKH, cache_v_LBCKH):
            def layer(x_BSD, inputs):
                shared, prefix, cache_k_BCKH, cache_v_BCKH = inputs
                block = nnx.merge(layers_def, shared, prefix)
                x_BSD, cache_k_BCKH, cache_v_BCKH = block.cached(
                    x_BSD, cos_BSH, sin_BSH, cache_k_BCKH, cache_v_BCKH, index, visible_BSC)
                return constrain(x_BSD, ("batch", "length", "act_embed")), (cache_k_BCKH, cache_v_BCKH)

            h_BSD, (cache_k, cache_v) = jax.lax.scan(
                layer, x_BSD, (shared_state, prefix_state, cache_k_LBCKH, cache_v_LBCKH))
            return self.norm(h_BSD), cache_k, cache_v

        # The cache always has a stream axis (of 1 when P = 1), so one vmap serves every P.
        h_PBSD, cache_k, cache_v = jax.vmap(one_stream, in_axes=(None, 1, 1, 1), out_axes=(0, 1, 1),
                                            spmd_axis_name="stream")(shared_state, prefix_state, cache["k"], cache["v"])
        h_BSD, _ = self.aggregate(h_PBSD)
        return self.lm_logits(h_BSD), {"k": cache_k, "v": cache_v}

    def aggregate(self, h_PBSD) -> tuple[jax.Array, jax.Array]:
        """Input-dependent softmax mix of the streams: `(h_BSD, weights_BSP)`, in float32 inside."""
        P, B, S, D = h_PBSD.shape
        if P == 1:
            return h_PBSD[0], jnp.ones((B, S, 1), jnp.float32)
        dtype = jnp.dtype(self.config.dtype)
        x_BSF = jnp.moveaxis(h_PBSD, 0, 2).reshape(B, S, P * D)
        hidden_BSD = nnx.silu(x_BSF @ self.aggregate_in_kernel[...].astype(dtype)
                              + self.aggregate_in_bias[...].astype(dtype))
        logits_BSP = (hidden_BSD @ self.aggregate_out_kernel[...].astype(dtype)
                      + self.aggregate_out_bias[...].astype(dtype))
        weights_BSP = jax.nn.softmax(logits_BSP.astype(jnp.float32), axis=-1)
        eps = self.config.parscale_attn_smooth
        weights_BSP = weights_BSP * (1.0 - eps) + eps / P
        h_BSD = jnp.einsum("bsp,pbsd->bsd", weights_BSP, h_PBSD.astype(jnp.float32))
        return h_BSD.astype(h_PBSD.dtype), weights_BSP

    def lm_logits(self, h_BSD) -> jax.Array:
        if self.config.tie_embeddings:
            return self.embed_tokens.attend(h_BSD)
        return self.lm_head(h_BSD)

    def __call__(self, tokens_BS, positions_BS=None, segment_ids_BS=None) -> jax.Array:
        """Logits `[B, S, V]`. Positions default to 0..S-1, segment ids to one segment per row."""
        if positions_BS is None:
            positions_BS = jnp.broadcast_to(jnp.arange(tokens_BS.shape[1]), tokens_BS.shape)
        if segment_ids_BS is None:
            segment_ids_BS = jnp.ones_like(tokens_BS)
        x_BSD = self.embed_tokens(tokens_BS)  # embedded once, shared by all streams
        x_BSD = constrain(x_BSD, ("batch", "length", "act_embed"))
        h_BSD, _ = self.aggregate(self.streams(x_BSD, positions_BS, segment_ids_BS))
        return constrain(self.lm_logits(h_BSD), ("batch", "length", "act_vocab"))


def model_graphdef(cfg: ModelConfig) -> nnx.GraphDef:
    """The model's structure, without allocating any parameter."""
    return nnx.graphdef(nnx.eval_shape(lambda: ParScaleLM(cfg, rngs=nnx.Rngs(0))))


def init_params(cfg: ModelConfig, seed: int) -> dict:
    """Freshly initialized parameters as a nested dict (call under `jax.jit` for speed)."""
    return nnx.to_pure_dict(nnx.state(ParScaleLM(cfg, rngs=nnx.Rngs(seed)), nnx.Param))


def abstract_params(cfg: ModelConfig) -> dict:
    """The parameter tree's shapes and dtypes (ShapeDtypeStructs), allocating nothing."""
    return jax.eval_shape(lambda: init_params(cfg, 0))


def split_params(params: dict, cfg: ModelConfig) -> tuple[dict, dict]:
    """(ParScale parameters: prefixes and aggregator, backbone parameters) of a parameter dict."""
    abstract = nnx.eval_shape(lambda: ParScaleLM(cfg, rngs=nnx.Rngs(0)))
    parscale_paths = {path for path, _ in nnx.to_flat_state(nnx.state(abstract, ParScaleParam))}
    flat = nnx.traversals.flatten_mapping(params)
    parscale = {path: x for path, x in flat.items() if path in parscale_paths}
    backbone = {path: x for path, x in flat.items() if path not in parscale_paths}
    return nnx.traversals.unflatten_mapping(parscale), nnx.traversals.unflatten_mapping(backbone)


def merge_params(*parts: dict) -> dict:
    """One parameter dict from disjoint parts (the inverse of `split_params`)."""
    flat = {}
    for part in parts:
        flat.update(nnx.traversals.flatten_mapping(part))
    return nnx.traversals.unflatten_mapping(flat)
