"""Configuration of a Qwen2-style decoder with ParScale parallel streams (`model_type = "qwen2_parscale"`).

This file is copied into exported checkpoint directories and loaded by `AutoConfig.from_pretrained(...,
trust_remote_code=True)`. It reads both the configs the official ParScale release writes (transformers 4.x keys such
as `rope_theta`, `rope_scaling`, `use_sliding_window`) and transformers-5 style ones (`rope_parameters`).
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class Qwen2ParScaleConfig(PretrainedConfig):
    """Qwen2 hyper-parameters plus the three ParScale ones, optionally Qwen3's q/k norms and a Mixture-of-Experts MLP.

    `parscale_n` is the number of parallel streams P (1 means a plain Qwen2 model), `parscale_n_tokens` the number T of
    learned prefix key/value slots each stream owns in every layer, and `parscale_attn_smooth` the smoothing ε applied
    to the aggregation weights (`w * (1 - ε) + ε / P`). `qkv_bias` selects Qwen2 (biased q/k/v projections) or Llama
    (no biases) attention; configs without the key are Qwen2. `qk_norm` RMS-normalizes every query and key head before
    RoPE (Qwen3). `num_experts` > 0 makes the MLP of every `decoder_sparse_step`-th layer (layer i when
    (i + 1) % decoder_sparse_step == 0; 1: every layer) a Mixture of Experts as Qwen2-MoE's: `num_experts_per_tok`
    experts of width `moe_intermediate_size` per token, their softmax weights renormalized with `norm_topk_prob`, plus
    a sigmoid-gated shared expert of width `shared_expert_intermediate_size` (0: none); the other layers keep the
    dense MLP of width `intermediate_size`.
    """

    model_type = "qwen2_parscale"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 4096,
        intermediate_size: int = 22016,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = 32,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        rope_theta: float | None = None,
        rope_parameters: dict[str, Any] | None = None,
        rope_scaling: dict[str, Any] | None = None,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        num_experts: int = 0,
        num_experts_per_tok: int = 2,
        moe_intermediate_size: int | None = None,
        shared_expert_intermediate_size: int = 0,
        norm_topk_prob: bool = False,
        decoder_sparse_step: int = 1,
        attention_dropout: float = 0.0,
        use_sliding_window: bool = False,
        sliding_window: int | None = None,
        parscale_n: int = 1,
        parscale_n_tokens: int = 48,
        parscale_attn_smooth: float = 0.01,
        **kwargs: Any,
    ) -> None:
        _check_shape(use_sliding_window, parscale_n, parscale_n_tokens, decoder_sparse_step)
        del sliding_window  # never enabled in ParScale checkpoints (see _check_shape)
        theta = _rope_theta(rope_parameters or rope_scaling or {}, rope_theta)

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.qkv_bias = qkv_bias
        self.qk_norm = qk_norm
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size if moe_intermediate_size is not None else intermediate_size
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.norm_topk_prob = norm_topk_prob
        self.decoder_sparse_step = decoder_sparse_step
        self.attention_dropout = attention_dropout
        self.use_sliding_window = False
        self.sliding_window = None
        # Both spellings are stored: `rope_theta` for the official (transformers 4.x) modeling code,
        # `rope_parameters` for the transformers 5 RoPE validation.
        self.rope_theta = theta
        self.rope_parameters = {"rope_type": "default", "rope_theta": theta}
        self.parscale_n = parscale_n
        self.parscale_n_tokens = parscale_n_tokens
        self.parscale_attn_smooth = parscale_attn_smooth

        # Passed through the base class (not set above) because transformers 4.x's base __init__ would otherwise
        # overwrite it with its own default.
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


def _check_shape(use_sliding_window: bool, parscale_n: int, parscale_n_tokens: int, decoder_sparse_step: int) -> None:
    # Sliding-window attention is never enabled in ParScale checkpoints. Qwen2 configs still carry a
    # `sliding_window` size next to `use_sliding_window: false`; dropping it keeps the transformers cache from
    # building sliding-window layers for it.
    if use_sliding_window:
        raise ValueError("Qwen2ParScaleConfig does not support sliding-window attention (use_sliding_window=True).")
    if parscale_n < 1:
        raise ValueError(f"parscale_n must be >= 1, got {parscale_n}.")
    if parscale_n > 1 and parscale_n_tokens < 1:
        raise ValueError(f"parscale_n_tokens must be >= 1 when parscale_n > 1, got {parscale_n_tokens}.")
    if decoder_sparse_step < 1:
        raise ValueError(f"decoder_sparse_step must be >= 1, got {decoder_sparse_step}.")


def _rope_theta(rope_parameters: dict[str, Any], rope_theta: float | None) -> float:
    # Only plain RoPE is implemented. The theta may sit in `rope_parameters` (transformers 5) or at top level
    # (transformers 4 and the official ParScale configs); `rope_scaling: null` is the 4.x spelling of "none".
    rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"Qwen2ParScaleConfig supports only the default RoPE, got rope_type={rope_type!r}.")
    return float(rope_parameters.get("rope_theta", rope_theta if rope_theta is not None else 10000.0))
