"""The model's config: a Qwen2-family decoder plus the ParScale fields (SPEC §1).

It lives with the model, which reads it; parscale_jax/config.py loads it from YAML as the `model`
section of a run's config and validates it (`validate_model`).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Field names follow the paper's Hugging Face configs."""

    vocab_size: int = 320  # 256 bytes + end of document, rounded up to a multiple of 64
    hidden_size: int = 128
    intermediate_size: int = 352
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_heads, filled in when the config is made
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = True  # Qwen2: True, Llama: False
    qk_norm: bool = False  # RMSNorm over head_dim on each query and key head before RoPE (Qwen3)
    tie_embeddings: bool = True
    max_position_embeddings: int = 2048
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    init_std: float = 0.02
    remat: str = "none"  # per-layer rematerialization: "none" or a key of model.lm.REMAT_POLICIES
    ffn: str = "swiglu"  # the feed-forward block: a key of model.ffn.FFN_TYPES
    # Mixture-of-Experts (model.ffn=moe; model/moe.py says what each does)
    num_experts: int = 8  # E
    experts_per_token: int = 2  # k
    moe_intermediate_size: int = 0  # F of one expert; 0: intermediate_size
    moe_capacity_factor: float = 0.0  # slots per expert and row: c · k · S / E; 0: dropless
    moe_renormalize: bool = True  # the k chosen weights sum to 1 (Mixtral; Qwen's norm_topk_prob)
    moe_shared_expert_size: int = 0  # F of a sigmoid-gated shared expert (Qwen2-MoE); 0: none
    moe_every: int = 1  # m: layer i routed when (i + 1) % m == 0, the others dense (Qwen2-MoE's decoder_sparse_step)
    moe_impl: str = "auto"  # dispatch: a key of model.moe.MOE_IMPLS
    attention: str = "einsum"  # the attention kernel: a key of model.attention.KERNELS
    parscale_n: int = 1  # P, the number of parallel streams
    parscale_n_tokens: int = 48  # T, prefix tokens per stream and layer
    parscale_attn_smooth: float = 0.1  # epsilon of the aggregation-weight smoothing

    def __post_init__(self):
        # The one place head_dim is derived, so every ModelConfig has it. When the heads do not
        # divide the width it stays None, and `validate_model` says so.
        if self.head_dim is None and self.num_heads >= 1 and self.hidden_size % self.num_heads == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)


def vocab_size_for(tokens: int) -> int:
    """The `vocab_size` for a tokenizer of `tokens` tokens: rounded up to a multiple of 64, so that
    the embedding and the logits divide the mesh and the matrix units evenly."""
    return -(-tokens // 64) * 64
