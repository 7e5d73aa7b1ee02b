"""Parameter counts (from the parameters' own declarations) and FLOP counts (SPEC §1), used for
logging TFLOP/s and by the scaling law."""

from __future__ import annotations

import jax

from parscale_jax.model.config import ModelConfig
from parscale_jax.model.ffn import FFN_TYPES
from parscale_jax.model.lm import mlp_stacks, param_info, prefix_slots


def _count(cfg: ModelConfig, keep) -> int:
    return sum(info.size for info in jax.tree.leaves(param_info(cfg)) if keep(info))


def non_embedding_params(cfg: ModelConfig) -> int:
    """N of the scaling law: everything but the embedding and LM head, ParScale extras included."""
    return _count(cfg, lambda info: info.kind != "embedding")


def total_params(cfg: ModelConfig) -> int:
    return _count(cfg, lambda info: True)


def active_non_embedding_params(cfg: ModelConfig) -> int:
    """The non-embedding parameters one token uses: of a parameter stacked over `experts`, the k
    experts a token is routed to (the same as `non_embedding_params` without experts)."""
    def active(info) -> int:
        if "experts" not in info.axes:
            return info.size
        return info.size // info.shape[info.axes.index("experts")] * cfg.experts_per_token
    return sum(active(info) for info in jax.tree.leaves(param_info(cfg)) if info.kind != "embedding")


def _layers_flops(cfg: ModelConfig) -> int:
    """Forward matrix-product FLOPs of one token through every layer's projections: q, k, v and o,
    and each layer's feed-forward block (its registry entry counts its own; with model.moe_every > 1
    dense layers count the dense MLP, routed ones the experts)."""
    D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    attention = cfg.num_layers * 2 * (D * N * H + 2 * D * K * H + N * H * D)
    feed_forward = sum(len(layers) * FFN_TYPES[ffn].flops_per_token(cfg) for ffn, layers in mlp_stacks(cfg).values())
    return attention + feed_forward


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward = 3 × forward), counting all P streams.

    Each stream pays for every layer's matmuls and for attention over its T prefix slots plus, on
    average, half the causal context; the aggregator and the LM head run once.
    """
    P, D, T = cfg.parscale_n, cfg.hidden_size, prefix_slots(cfg)
    attended_keys = T + (seq_len + 1) / 2
    attention = 2 * 2 * cfg.num_heads * cfg.head_dim * attended_keys  # scores and weighted sum
    per_stream = _layers_flops(cfg) + cfg.num_layers * attention
    aggregator = 2 * (P * D * D + D * P) if P > 1 else 0
    lm_head = 2 * D * cfg.vocab_size
    return 3.0 * (P * per_stream + aggregator + lm_head)
