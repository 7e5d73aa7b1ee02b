"""Analytic parameter and FLOP counts (SPEC §1), used for logging TFLOP/s and by the scaling law."""

from __future__ import annotations

from parscale_jax.config import ModelConfig


def prefix_slots(cfg: ModelConfig) -> int:
    """Prefix tokens every stream's attention adds in each layer: T, none without streams."""
    return cfg.parscale_n_tokens if cfg.parscale_n > 1 else 0


def _layer_matmul_params(cfg: ModelConfig) -> int:
    D, F, N, K, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    return D * N * H + 2 * D * K * H + N * H * D + 3 * D * F


def parscale_extra_params(cfg: ModelConfig) -> int:
    """Prefixes `L·2·P·K·T·H` plus the aggregator `P·D² + D + D·P + P`; zero when P = 1."""
    P, D = cfg.parscale_n, cfg.hidden_size
    if P == 1:
        return 0
    prefixes = cfg.num_layers * 2 * P * cfg.num_kv_heads * cfg.parscale_n_tokens * cfg.head_dim
    return prefixes + P * D * D + D + D * P + P


def non_embedding_params(cfg: ModelConfig) -> int:
    """N of the scaling law: everything but the embedding and LM head, ParScale extras included."""
    N, K, H, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    biases = (N + 2 * K) * H if cfg.qkv_bias else 0
    per_layer = _layer_matmul_params(cfg) + biases + 2 * D
    return cfg.num_layers * per_layer + D + parscale_extra_params(cfg)


def total_params(cfg: ModelConfig) -> int:
    embeddings = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_embeddings else 2)
    return non_embedding_params(cfg) + embeddings


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
