"""Parameter counts (from the parameters' own declarations) and FLOP counts (SPEC §1), used for
logging TFLOP/s and by the scaling law."""

from __future__ import annotations

import jax

from parscale_jax.config import ModelConfig
from parscale_jax.model import param_info, prefix_slots


def _count(cfg: ModelConfig, keep) -> int:
    return sum(info.size for info in jax.tree.leaves(param_info(cfg)) if keep(info))


def parscale_extra_params(cfg: ModelConfig) -> int:
    """The ParScale parameters: prefixes `L·2·P·K·T·H` plus the aggregator `P·D² + D + D·P + P`; zero when P = 1."""
    return _count(cfg, lambda info: info.parscale)


def non_embedding_params(cfg: ModelConfig) -> int:
    """N of the scaling law: everything but the embedding and LM head, ParScale extras included."""
    return _count(cfg, lambda info: info.kind != "embedding")


def total_params(cfg: ModelConfig) -> int:
    return _count(cfg, lambda info: True)


def _layer_matmul_params(cfg: ModelConfig) -> int:
    D, F, N, K, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    return D * N * H + 2 * D * K * H + N * H * D + 3 * D * F


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward = 3 × forward), counting all P streams.

    Each stream pays for every layer's matmuls and for attention over its T prefix slots plus, on
    average, half the causal context; the aggregator and the LM head run once.
    """
    P, D, T = cfg.parscale_n, cfg.hidden_size, prefix_slots(cfg)
    attended_keys = T + (seq_len + 1) / 2
    attention = 2 * 2 * cfg.num_heads * cfg.head_dim * attended_keys  # scores and weighted sum
    per_stream = cfg.num_layers * (2 * _layer_matmul_params(cfg) + attention)
    aggregator = 2 * (P * D * D + D * P) if P > 1 else 0
    lm_head = 2 * D * cfg.vocab_size
    return 3.0 * (P * per_stream + aggregator + lm_head)
