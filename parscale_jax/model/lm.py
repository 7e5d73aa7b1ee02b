"""The ParScale decoder (SPEC §1): embedding → P streams of the shared layers → aggregation → LM head.

A Qwen2/Llama-style backbone runs over P parallel streams of the same input. The streams share
every backbone weight and differ only by a learned per-layer key/value prefix; their final hidden
states are mixed by an input-dependent softmax weighting before the shared LM head.

Module names follow the Hugging Face state-dict names (`embed_tokens`, `layers.self_attn.q_proj`,
...), so conversion is close to an identity. The L layers are stacked (every layer weight has a
leading `[L]` axis) and run under one `lax.scan`; the streams are a leading axis of the activations
`[P, B, S, D]`, which the matrix products see as more rows of the shared weights. With
`model.moe_every` = m > 1 (a Mixture-of-Experts in every m-th layer, dense MLPs in the others) the
blocks keep no feed-forward weights: two stacks beside them do (`mlp_stacks`), and the scan runs
groups of m layers, m - 1 dense then one routed.
Training, prefill and decoding all go through `forward`; only the attention mask and the KV source
differ (attention.py).

Shape suffixes (the package's legend): B batch, S sequence (the new tokens), D hidden, N query heads,
K kv heads, G query heads per kv head, Q the queries of a kv head (G·S, its G heads side by side),
H head_dim, T prefix tokens, C key/value slots (T + S, or the cache length), P streams, F MLP width,
V vocab, L layers, X the streams' hidden states side by side (P·D); R rows of packed data or of a
flattened product, W a packed row's window of S + 1 tokens; M, I, O a linear layer's rows, inputs and
outputs; in a Mixture-of-Experts (moe.py) E experts, k the experts of a token, A a group's
assignments (k·S), J groups (a stream's row each), Z slots per expert and group. A lowercase letter
is a part of its capital (b a block of queries, h half of H, n a block's index, e the experts a
device holds, l the layers of one feed-forward stack), and 1 an axis kept at size 1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from parscale_jax.model.attention import Attention, AttentionMask, KVCache, attention_mask
from parscale_jax.model.config import ModelConfig
from parscale_jax.model.ffn import FFN_TYPES
from parscale_jax.model.layers import Aux, GrowthMasks, Linear, RMSNorm, masked, normal, rope_tables
from parscale_jax.model.params import ParScaleParam, declare, describe, merge_parts, split_parscale
from parscale_jax.sharding import constrain

# model.remat -> what a layer keeps for the backward pass ("none": everything, no rematerialization).
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "qkv_proj": jax.checkpoint_policies.save_only_these_names("query_proj", "key_proj", "value_proj"),
}


def activation_axes(cfg: ModelConfig) -> dict[str, tuple[int, str]]:
    """The split logical axes of the activations the model constrains, beyond the batch's rows:
    {logical axis: (size, what it is)}. With the parameters' declarations, what a mesh must divide."""
    return {"stream": (cfg.parscale_n, f"the {cfg.parscale_n} streams (model.parscale_n)"),
            "act_vocab": (cfg.vocab_size, f"the {cfg.vocab_size} logits of a token (model.vocab_size)")}


def moe_layer(cfg: ModelConfig, layer: int) -> bool:
    """Whether a layer's feed-forward block is routed: with model.moe_every = m, layer i when
    (i + 1) % m == 0 (Qwen2-MoE's decoder_sparse_step), so every layer when m = 1."""
    return cfg.ffn == "moe" and (layer + 1) % cfg.moe_every == 0


def mlp_stacks(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[str, list[int]]]:
    """Where the feed-forward weights are stacked: {path of the stack: (its feed-forward type, the
    layer at each position of its leading axis)}. One stack, `layers/mlp`, inside the blocks; with
    model.moe_every = m > 1 two of their own beside them: `dense_mlp` (SwiGLU, L - L/m layers) and
    `moe_mlp` (L/m layers)."""
    L = cfg.num_layers
    if cfg.moe_every == 1:
        return {("layers", "mlp"): (cfg.ffn, list(range(L)))}
    return {("dense_mlp",): ("swiglu", [i for i in range(L) if not moe_layer(cfg, i)]),
            ("moe_mlp",): ("moe", [i for i in range(L) if moe_layer(cfg, i)])}


def residual_outputs(cfg: ModelConfig) -> list[tuple[str, ...]]:
    """The projections whose outputs a layer adds to the residual stream, as paths from the root of
    the parameters: with them zero, the layer adds nothing (what `upscale --identity` inserts)."""
    paths = [("layers", "self_attn", *name.split("/")) for name in Attention.OUTPUT_PROJECTIONS] + \
        [(*stack, *name.split("/")) for stack, (ffn, _) in mlp_stacks(cfg).items()
         for name in FFN_TYPES[ffn].OUTPUT_PROJECTIONS]
    declared = param_info(cfg)

    def exists(path) -> bool:  # an optional part (a MoE's shared expert) may be absent
        tree = declared
        for key in path:
            if not isinstance(tree, dict) or key not in tree:
                return False
            tree = tree[key]
        return True

    return [path for path in paths if exists(path)]


def prefix_slots(cfg: ModelConfig) -> int:
    """Prefix tokens every stream's attention adds in each layer: T, none without streams."""
    return cfg.parscale_n_tokens if cfg.parscale_n > 1 else 0


class Block(nnx.Module):
    """Pre-norm attention, then the feed-forward block chosen by `model.ffn` (none with
    model.moe_every > 1: the layer is then given its own, `mlp_stacks`)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg)
        if cfg.moe_every == 1:
            self.mlp = FFN_TYPES[cfg.ffn](cfg, rngs)

    def __call__(self, x_PBSD, cos_BSH, sin_BSH, mask, cache: KVCache | None = None,
                 masks: GrowthMasks | None = None, mlp: nnx.Module | None = None):
        """(output, cache, aux). With growth `masks`, the new hidden dimensions, neurons and heads
        contribute m times their output, and a new layer adds m times its change (as MSG grows).
        `mlp` is the layer's feed-forward block when the block keeps none."""
        g = masks or GrowthMasks()
        mlp = self.mlp if mlp is None else mlp
        attended_PBSD, cache = self.self_attn(self.input_layernorm(x_PBSD, g.hidden_D), cos_BSH, sin_BSH, mask,
                                              cache, g.heads_N)
        attended_PBSD = masked(attended_PBSD, g.hidden_D)
        h_PBSD = x_PBSD + attended_PBSD  # one sum for both uses: the backward pass adds their gradients once
        normed_PBSD = self.post_attention_layernorm(h_PBSD, g.hidden_D)
        mlp_PBSD, aux = mlp(normed_PBSD) if g.mlp_F is None else mlp(normed_PBSD, live_F=g.mlp_F)
        mlp_PBSD = masked(mlp_PBSD, g.hidden_D)
        if g.depth is None:
            return h_PBSD + mlp_PBSD, cache, aux
        return x_PBSD + g.depth.astype(x_PBSD.dtype) * (attended_PBSD + mlp_PBSD), cache, aux


def scan_layers(layers_def, shared_state, prefix_state, x_PBSD, cos_BSH, sin_BSH, mask, kv=None, index=None,
                remat: str = "none", masks: GrowthMasks | None = None, mlps=None):
    """The P streams through the L stacked layers under `lax.scan`: (hidden states, kv, Aux per layer).

    `shared_state` holds the layer weights `[L, ...]`; `prefix_state` the prefixes `[L, P, K, T, H]`
    (empty when P = 1); `kv` the cache keys and values `[L, P, B, C, K, H]`, written at slot `index`
    (None in training, where the layers are rematerialized by `remat`); `masks` the growth masks, whose
    `depth` goes down the layers with them.

    With model.moe_every = m > 1 the blocks keep no feed-forward weights; `mlps` holds them as
    ((dense graph, weights `[L - L/m, ...]`), (MoE graph, weights `[L/m, ...]`)), and the scan runs
    L/m groups of m layers, m - 1 dense then one routed: blocks must be alike for a scan, groups
    are. The Aux is then the routed layers' alone (`[L/m]`), so dense layers do not dilute its means.

    Given as lists of per-layer states (and `kv` as per-layer pairs, `mlps` as each layer's
    (graphs, weights) lists), the same layers run as a Python loop: decoding does, since a scan reads
    each layer's weights out of the stacked arrays at half the bandwidth of separate ones, and a
    decode step is nothing but reading the weights.
    """

    depth = None if masks is None else masks.depth

    def layer(mlp_def, x_PBSD, per_layer):
        shared, prefix, layer_kv, layer_depth, mlp = per_layer
        block = nnx.merge(layers_def, shared, prefix)
        cache = None if layer_kv is None else KVCache(*layer_kv, index)
        layer_masks = None if masks is None else masks._replace(depth=layer_depth)
        mlp = None if mlp_def is None else nnx.merge(mlp_def, mlp)
        x_PBSD, cache, aux = block(x_PBSD, cos_BSH, sin_BSH, mask, cache, layer_masks, mlp)
        layer_kv = None if cache is None else (cache.k, cache.v)
        return constrain(x_PBSD, ("stream", "batch", "length", "act_embed")), (layer_kv, aux)

    if isinstance(shared_state, list):
        L = len(shared_state)
        mlp_defs, mlp_states = mlps or ([None] * L, [None] * L)
        outputs = []
        for l, (shared, prefix, layer_kv) in enumerate(zip(shared_state, prefix_state, kv or [None] * L)):
            x_PBSD, output = layer(mlp_defs[l], x_PBSD, (shared, prefix, layer_kv, None if depth is None else depth[l],
                                                         mlp_states[l]))
            outputs.append(output)
        kv = None if kv is None else [layer_kv for layer_kv, _ in outputs]
        return x_PBSD, kv, stack_aux([aux for _, aux in outputs])

    def run(mlp_def):  # one layer, rematerialized in training
        step = functools.partial(layer, mlp_def)
        if remat != "none" and kv is None:
            step = jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=False)
        return step

    if mlps is None:
        h_PBSD, (kv, aux) = jax.lax.scan(run(None), x_PBSD, (shared_state, prefix_state, kv, depth, None))
        return h_PBSD, kv, aux
    (dense_def, dense_state), (moe_def, moe_state) = mlps
    L, groups = jax.tree.leaves(shared_state)[0].shape[0], jax.tree.leaves(moe_state)[0].shape[0]
    m = L // groups
    dense_run, moe_run = run(dense_def), run(moe_def)

    def grouped(tree, n):  # [groups · n, ...] -> [groups, n, ...]
        return jax.tree.map(lambda x: x.reshape(groups, n, *x.shape[1:]), tree)

    def group(x_PBSD, per_group):
        shared, prefix, group_kv, group_depth, dense, moe = per_group
        outputs = []
        for j in range(m):
            at = functools.partial(jax.tree.map, lambda x, j=j: x[j])
            step, mlp = (moe_run, moe) if j == m - 1 else (dense_run, at(dense))
            x_PBSD, output = step(x_PBSD, (at(shared), at(prefix), at(group_kv), at(group_depth), mlp))
            outputs.append(output)
        group_kv = None if group_kv is None else jax.tree.map(lambda *x: jnp.stack(x), *(o[0] for o in outputs))
        return x_PBSD, (group_kv, outputs[-1][1])

    xs = (grouped(shared_state, m), grouped(prefix_state, m), grouped(kv, m), grouped(depth, m),
          grouped(dense_state, m - 1), moe_state)
    h_PBSD, (kv, aux) = jax.lax.scan(group, x_PBSD, xs)
    kv = None if kv is None else jax.tree.map(lambda x: x.reshape(L, *x.shape[2:]), kv)
    return h_PBSD, kv, aux


def stack_aux(auxes: list[Aux]) -> Aux:
    """The per-layer Aux of the layers that report any (dense ones report none), stacked."""
    reported = [aux for aux in auxes if aux.losses or aux.stats]
    return jax.tree.map(lambda *per_layer: jnp.stack(per_layer), *reported) if reported else Aux.none()


def stacked(make, n: int, rngs: nnx.Rngs) -> nnx.Module:
    """n modules `make(rngs)` with their weights stacked on a leading axis, which every parameter declares."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers", "axes": "layers"})
    def build(rngs: nnx.Rngs) -> nnx.Module:
        return make(rngs)

    return build(rngs)


class ParScaleLM(nnx.Module):
    """Embedding → P streams of the shared decoder → aggregation → LM head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        D, P = cfg.hidden_size, cfg.parscale_n
        self.embed_tokens = nnx.Embed(cfg.vocab_size, D, dtype=dtype, param_dtype=param_dtype,
                                      embedding_init=normal(cfg.init_std), rngs=rngs,
                                      embedding_metadata=declare(("vocab", "embed"), "embedding"))

        # L blocks with their weights stacked on a leading axis, which every parameter declares.
        self.layers = stacked(lambda rngs: Block(cfg, rngs), cfg.num_layers, rngs)
        if cfg.moe_every > 1:  # the feed-forward blocks in stacks of their own: dense_mlp, moe_mlp
            for (name,), (ffn, layers) in mlp_stacks(cfg).items():
                setattr(self, name, stacked(lambda rngs, ffn=ffn: FFN_TYPES[ffn](cfg, rngs), len(layers), rngs))
        self.norm = RMSNorm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = Linear(cfg, rngs, D, cfg.vocab_size, ("embed", "vocab"), kind="embedding")
        if P > 1:
            # Input features are stream-major (p * D + d); the Hugging Face format interleaves
            # them (d * P + p), which the converter permutes.
            init = normal(cfg.init_std)
            self.aggregate_in_kernel = ParScaleParam(init(rngs.params(), (P * D, D), param_dtype),
                                                     **declare(("stream_embed", "embed"), "matrix"))
            self.aggregate_in_bias = ParScaleParam(jnp.zeros((D,), param_dtype), **declare(("norm",), "bias"))
            self.aggregate_out_kernel = ParScaleParam(init(rngs.params(), (D, P), param_dtype),
                                                      **declare(("embed", "stream"), "matrix"))
            self.aggregate_out_bias = ParScaleParam(jnp.zeros((P,), param_dtype), **declare(("stream",), "bias"))

    def __call__(self, tokens_BS, positions_BS=None, segment_ids_BS=None,
                 masks: GrowthMasks | None = None) -> tuple[jax.Array, Aux]:
        """(logits `[B, S, V]`, aux) of whole sequences. Positions default to 0..S-1, segment ids to
        one segment per row (0 marks padding); `masks` while a grown model's new parts fade in."""
        if positions_BS is None:
            positions_BS = jnp.broadcast_to(jnp.arange(tokens_BS.shape[1]), tokens_BS.shape)
        if segment_ids_BS is None:
            segment_ids_BS = jnp.ones_like(tokens_BS)
        mask = attention_mask(segment_ids_BS, prefix_slots(self.config))
        logits_BSV, aux, _ = self.forward(tokens_BS, positions_BS, mask, masks=masks)
        return logits_BSV, aux

    def decode(self, tokens_BS, positions_BS, cache: KVCache, visible_BSC,
               layers: tuple[list, list] | None = None) -> tuple[jax.Array, KVCache]:
        """(logits `[B, S, V]`, the updated cache) of S new tokens, written into the cache at
        `cache.index`; `visible_BSC` says which cache slots each new token sees (inference/generate.py).
        `layers` (from `unstack_layers`, with a cache of per-layer arrays) runs the layers as a loop."""
        mask = AttentionMask(visible_BSC=visible_BSC)
        logits_BSV, _, cache = self.forward(tokens_BS, positions_BS, mask, cache, layers)
        return logits_BSV, cache

    def unstack_layers(self) -> tuple[list, list, list | None]:
        """(per-layer weight states, per-layer prefix states, per-layer feed-forward states or None
        when the blocks hold them): copies of the stacked layers, one per layer."""
        cfg = self.config
        _, prefix_state, shared_state = nnx.split(self.layers, ParScaleParam, ...)
        L = cfg.num_layers
        mlps = None
        if cfg.moe_every > 1:
            mlps = [None] * L
            for (name,), (_, layers) in mlp_stacks(cfg).items():
                state = nnx.state(getattr(self, name))
                for position, l in enumerate(layers):
                    mlps[l] = jax.tree.map(lambda x, p=position: x[p], state)
        return ([jax.tree.map(lambda x, l=l: x[l], shared_state) for l in range(L)],
                [jax.tree.map(lambda x, l=l: x[l], prefix_state) for l in range(L)], mlps)

    def split_mlps(self, per_layer: list | None = None):
        """The feed-forward stacks kept beside the blocks (model.moe_every > 1) as `scan_layers` takes
        them: ((dense graph, weights), (MoE graph, weights)); with `per_layer` weights (from
        `unstack_layers`), (each layer's graph, `per_layer`). None when the blocks hold them."""
        cfg = self.config
        if cfg.moe_every == 1:
            return None
        dense, moe = nnx.split(self.dense_mlp), nnx.split(self.moe_mlp)
        if per_layer is None:
            return dense, moe
        return [moe[0] if moe_layer(cfg, l) else dense[0] for l in range(cfg.num_layers)], per_layer

    def forward(self, tokens_BS, positions_BS, mask, cache: KVCache | None = None, layers=None,
                masks: GrowthMasks | None = None):
        """(logits, aux, cache): the one forward path of training, prefill and decoding."""
        cfg = self.config
        h_PBSD, aux, cache = self.hidden_streams(tokens_BS, positions_BS, mask, cache, layers, masks)
        h_BSD, weights_BSP = self.aggregate(h_PBSD, masks)
        if cfg.parscale_n > 1:
            entropy_BS = jnp.sum(jax.scipy.special.entr(weights_BSP), axis=-1)  # a stream fading in has weight 0
            aux = aux.merge(Aux({}, {"stream_weight_entropy": jnp.mean(entropy_BS)}))
        logits_BSV = constrain(self.lm_logits(h_BSD), ("batch", "length", "act_vocab"))
        return logits_BSV, aux, cache

    def hidden_streams(self, tokens_BS, positions_BS, mask, cache: KVCache | None = None, layers=None,
                       masks: GrowthMasks | None = None, prefix_state=None):
        """`streams` of the tokens' embeddings: every stream's final hidden states, before aggregation."""
        cfg = self.config
        cos_BSH, sin_BSH = rope_tables(positions_BS, cfg.head_dim, cfg.rope_theta)
        x_BSD = masked(self.embed_tokens(tokens_BS), None if masks is None else masks.hidden_D)
        x_BSD = constrain(x_BSD, ("batch", "length", "act_embed"))  # shared by all streams
        return self.streams(x_BSD, cos_BSH, sin_BSH, mask, cache, layers, masks, prefix_state)

    def streams(self, x_BSD, cos_BSH, sin_BSH, mask, cache: KVCache | None = None, layers=None,
                masks: GrowthMasks | None = None, prefix_state=None):
        """(final-normed hidden states of every stream `[P, B, S, D]`, aux averaged over layers (the
        routed ones), the updated cache or None). Every stream starts from the same embeddings; the
        layers see the streams as one more leading axis (their weights are shared, only the prefixes
        differ). With `layers` (per-layer states) the cache holds per-layer tuples of arrays.
        `prefix_state` replaces the model's prefixes (the stacked layers' `ParScaleParam` state) with
        others of the same layout, e.g. several stream sets side by side on the stream axis: then P
        is their number of streams."""
        layers_def, own_prefixes, shared_state = nnx.split(self.layers, ParScaleParam, ...)
        P = self.config.parscale_n
        if prefix_state is None:
            prefix_state = own_prefixes
        else:
            P = prefix_state["self_attn"]["prefix_k"].shape[1]
        mlps = self.split_mlps()
        if layers is not None:
            shared_state, prefix_state, mlp_states = layers
            mlps = self.split_mlps(mlp_states)
        x_PBSD = constrain(jnp.broadcast_to(x_BSD, (P, *x_BSD.shape)), ("stream", "batch", "length", "act_embed"))
        kv, index = (None, None) if cache is None else ((cache.k, cache.v), cache.index)
        if kv is not None and layers is not None:
            kv = list(zip(*kv))
        h_PBSD, kv, aux = scan_layers(layers_def, shared_state, prefix_state, x_PBSD, cos_BSH, sin_BSH, mask,
                                      kv, index, self.config.remat, masks, mlps)
        if kv is not None and layers is not None:
            kv = tuple(zip(*kv))
        cache = None if cache is None else KVCache(*kv, cache.index + x_BSD.shape[1])
        return self.norm(h_PBSD, None if masks is None else masks.hidden_D), aux.mean(), cache

    def aggregate(self, h_PBSD, masks: GrowthMasks | None = None) -> tuple[jax.Array, jax.Array]:
        """Input-dependent softmax mix of the streams: `(h_BSD, weights_BSP)`, in float32 inside.

        While new streams fade in (`masks.streams_P` = m), each stream's softmax term and share of
        the smoothing are weighted by its mask, and a new stream's input to the aggregator by m."""
        P, B, S, D = h_PBSD.shape
        if P == 1:
            return h_PBSD[0], jnp.ones((B, S, 1), jnp.float32)
        g = masks or GrowthMasks()
        dtype = jnp.dtype(self.config.dtype)
        seen_PBSD = h_PBSD if g.streams_P is None else h_PBSD * g.streams_P[:, None, None, None].astype(dtype)
        streams_BSX = jnp.moveaxis(seen_PBSD, 0, 2).reshape(B, S, P * D)  # X: P·D, stream-major
        hidden_BSD = masked(nnx.silu(streams_BSX @ self.aggregate_in_kernel[...].astype(dtype)
                                     + self.aggregate_in_bias[...].astype(dtype)), g.hidden_D)
        logits_BSP = (hidden_BSD @ self.aggregate_out_kernel[...].astype(dtype)
                      + self.aggregate_out_bias[...].astype(dtype)).astype(jnp.float32)
        eps = self.config.parscale_attn_smooth
        if g.streams_P is None:
            weights_BSP = jax.nn.softmax(logits_BSP, axis=-1) * (1.0 - eps) + eps / P
        else:
            live_P = g.streams_P
            logits_BSP = jnp.where(live_P > 0, logits_BSP, -jnp.inf)  # a new stream at m = 0 takes nothing
            exp_BSP = live_P * jnp.exp(logits_BSP - jnp.max(logits_BSP, axis=-1, keepdims=True))
            weights_BSP = exp_BSP / jnp.sum(exp_BSP, axis=-1, keepdims=True) * (1.0 - eps) + eps * live_P / jnp.sum(live_P)
        h_BSD = jnp.einsum("bsp,pbsd->bsd", weights_BSP, h_PBSD.astype(jnp.float32))
        return h_BSD.astype(h_PBSD.dtype), weights_BSP

    def lm_logits(self, h_BSD) -> jax.Array:
        if self.config.tie_embeddings:
            return self.embed_tokens.attend(h_BSD)
        return self.lm_head(h_BSD)

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache `[L, P, B, T + max_len, K, H]` with each stream's prefix in slots [0, T)."""
        cfg = self.config
        L, P, K, H, T = cfg.num_layers, cfg.parscale_n, cfg.num_kv_heads, cfg.head_dim, prefix_slots(cfg)
        dtype = jnp.dtype(cfg.dtype)
        kv = []
        for name in ("prefix_k", "prefix_v"):
            cache_LPBCKH = jnp.zeros((L, P, batch, T + max_len, K, H), dtype)
            if T:
                prefix_LPTKH = getattr(self.layers.self_attn, name)[...].transpose(0, 1, 3, 2, 4).astype(dtype)
                cache_LPBCKH = cache_LPBCKH.at[:, :, :, :T].set(
                    jnp.broadcast_to(prefix_LPTKH[:, :, None], (L, P, batch, T, K, H)))
            kv.append(cache_LPBCKH)
        return KVCache(*kv, jnp.int32(T))


# ---------------------------------------------------------------------------------------------
# The parameter tree: nested dicts of arrays, as the train state and checkpoints hold them.


def model_graphdef(cfg: ModelConfig) -> nnx.GraphDef:
    """The model's structure, without allocating any parameter."""
    return nnx.graphdef(nnx.eval_shape(lambda: ParScaleLM(cfg, rngs=nnx.Rngs(0))))


@functools.lru_cache(maxsize=64)
def param_info(cfg: ModelConfig) -> dict:
    """A `ParamInfo` (shape, logical axes, kind) for every parameter, shaped like the parameter dict."""
    model = nnx.eval_shape(lambda: ParScaleLM(cfg, rngs=nnx.Rngs(0)))
    flat = {path: describe(variable) for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    return nnx.traversals.unflatten_mapping(flat)


def init_params(cfg: ModelConfig, seed: int) -> dict:
    """Freshly initialized parameters as a nested dict (call under `jax.jit` for speed)."""
    return nnx.to_pure_dict(nnx.state(ParScaleLM(cfg, rngs=nnx.Rngs(seed)), nnx.Param))


def abstract_params(cfg: ModelConfig) -> dict:
    """The parameter tree's shapes and dtypes (ShapeDtypeStructs), allocating nothing."""
    return jax.eval_shape(lambda: init_params(cfg, 0))


def split_params(params: dict, cfg: ModelConfig) -> tuple[dict, dict]:
    """(ParScale parameters: prefixes and aggregator, backbone parameters) of a parameter dict."""
    return split_parscale(params, param_info(cfg))


merge_params = merge_parts  # one parameter dict from disjoint parts, the inverse of `split_params`


def partition_trainable(params: dict, cfg: ModelConfig, trainable: str) -> tuple[dict, dict]:
    """(trained, frozen) parts of any tree shaped like the parameters: with `train.trainable=parscale`
    only the prefixes and the aggregator train and the backbone is frozen; otherwise everything trains."""
    if trainable == "parscale":
        return split_params(params, cfg)
    return params, {}

