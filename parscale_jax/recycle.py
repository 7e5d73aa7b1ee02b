"""New streams on a pretrained backbone that keep what it knows.

Fresh prefix keys (std 0.02) give every query a logit near 0 on each of the T prefix slots. A
pretrained model's heads give most real tokens small or negative logits and keep their mass on an
attention sink, so T slots at logit 0 take a large share of it (36 % on average, up to 90 % in a
head, of SmolLM2-135M's attention) and feed back values near zero: the model at step 0 is 0.9-1.1
nats worse than the backbone alone.

Instead, stream p's prefix holds the backbone's own keys and values of a context of T tokens from
the training data, one that ends a document (its end-of-document token last): each stream then
starts as the backbone reading its text after another document, which it saw throughout
pretraining. The keys are rotated to positions -T .. -1, so every query sees them at the relative
distances of a text that came just before its segment. Each stream reads a different context, so
the streams differ from the start and training can pull them apart. The aggregator stays freshly
initialized: with streams this alike, its weights hardly matter at step 0.

Reading a context is not free either: it changes the first predictions of every row. A model whose
attention is flat enough to lose little to fresh prefixes (a small model trained briefly) loses
more to a context, so the start is whichever of the two is closer to the backbone's own next-token
distribution on the first training batch (KL, nats per token): SmolLM2-135M 0.28 (context) against
1.23 (fresh), the default toy model trained 300 steps 0.055 against 0.017.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from parscale_jax.config import Config
from parscale_jax.data import pipeline
from parscale_jax.data.tokenizer import load_tokenizer
from parscale_jax.model import merge_params, model_graphdef
from parscale_jax.model.layers import apply_rope, rope_tables


def first_batch(config: Config) -> dict[str, np.ndarray]:
    """The first global training batch (the same on every process)."""
    return next(iter(pipeline.train_dataset(config)))


def stream_contexts(config: Config, batch: dict[str, np.ndarray]) -> np.ndarray:
    """`[P, T]` token ids: P windows of `batch` that each end with an end-of-document token (T-1
    tokens followed by one, where the batch has too few document ends)."""
    P, T = config.model.parscale_n, config.model.parscale_n_tokens
    tokens = np.asarray(batch["tokens"]).reshape(-1)
    eos = load_tokenizer(config.data).eos_id
    ends = [] if eos is None else [int(i) for i in np.nonzero(tokens == eos)[0] if i >= T - 1]
    windows = [tokens[end - T + 1:end + 1] for end in ends[:P]]
    for start in range(0, (P - len(windows)) * T, T):  # too few document ends
        window = tokens[start:start + T].copy()
        if eos is not None:
            window[-1] = eos
        windows.append(window)
    return np.stack(windows).astype(np.int32)


def context_prefixes(backbone: dict, config: Config, contexts_PT: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """(prefix keys, prefix values) `[L, P, K, T, H]`: the backbone's keys and values of each
    stream's context, the keys rotated to positions -T .. -1."""
    cfg = dataclasses.replace(config.model, parscale_n=1)
    P, T = contexts_PT.shape
    graphdef = model_graphdef(cfg)

    @jax.jit
    def prefill(backbone, tokens_PT):
        model = nnx.merge(graphdef, nnx.State(backbone))
        positions_PT = jnp.broadcast_to(jnp.arange(T), (P, T))
        causal_PTT = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (P, T, T))
        _, cache = model.decode(tokens_PT, positions_PT, model.init_cache(P, T), causal_PTT)
        k_LPTKH, v_LPTKH = cache.k[:, 0], cache.v[:, 0]  # the contexts were the batch of one stream
        # The cache holds R(j) k_j; one more rotation by -T places slot j at position j - T.
        cos_PTH, sin_PTH = rope_tables(jnp.full((P, T), -T), cfg.head_dim, cfg.rope_theta)
        k_LPTKH = apply_rope(k_LPTKH, cos_PTH, sin_PTH)
        return k_LPTKH.transpose(0, 1, 3, 2, 4), v_LPTKH.transpose(0, 1, 3, 2, 4)

    return prefill(backbone, jnp.asarray(contexts_PT))


def with_context_prefixes(parscale: dict, backbone: dict, config: Config, batch: dict[str, np.ndarray]) -> dict:
    """The stream set `parscale` with its prefixes replaced by `context_prefixes` of contexts from
    `batch`, on the prefixes' shardings and dtype."""
    keys_LPKTH, values_LPKTH = context_prefixes(backbone, config, stream_contexts(config, batch))
    attention = dict(parscale["layers"]["self_attn"])
    for name, value in (("prefix_k", keys_LPKTH), ("prefix_v", values_LPKTH)):
        old = attention[name]
        attention[name] = jax.device_put(value.astype(old.dtype), old.sharding)
    layers = {**parscale["layers"], "self_attn": attention}
    return {**parscale, "layers": layers}


def kl_from_backbone(streams: dict, backbone: dict, config: Config, batch: dict) -> jax.Array:
    """KL divergence of the model with `streams` from the backbone alone, nats per target token of
    `batch` (differentiable in `streams`; the backbone's side is held fixed)."""
    inputs = (batch["tokens"], batch["positions"], batch["segment_ids"])
    base = nnx.merge(model_graphdef(dataclasses.replace(config.model, parscale_n=1)), nnx.State(backbone))
    ours = nnx.merge(model_graphdef(config.model), nnx.State(merge_params(backbone, streams)))
    base_BSV = jax.lax.stop_gradient(jax.nn.log_softmax(base(*inputs)[0].astype(jnp.float32)))
    ours_BSV = jax.nn.log_softmax(ours(*inputs)[0].astype(jnp.float32))
    kl_BS = jnp.sum(jnp.exp(base_BSV) * (base_BSV - ours_BSV), axis=-1)
    mask_BS = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(kl_BS * mask_BS) / jnp.maximum(jnp.sum(mask_BS), 1.0)


def new_stream_set(fresh: dict, backbone: dict, config: Config) -> dict:
    """The starting stream set for new streams on `backbone`: the context prefixes or the `fresh`
    random ones, whichever is closer to the backbone's own distribution on the first training
    batch (KL). Pretrained models take the context prefixes (SmolLM2-135M: KL 0.28 against 1.2);
    a barely trained one can keep random ones, which then cost it less than any context."""
    batch = first_batch(config)
    context = with_context_prefixes(fresh, backbone, config, batch)
    divergence = jax.jit(lambda streams, backbone, batch: kl_from_backbone(streams, backbone, config, batch))
    return min((context, fresh), key=lambda streams: float(divergence(streams, backbone, batch)))
