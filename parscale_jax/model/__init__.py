"""The model: lm.py (the decoder), attention.py, ffn.py, layers.py, params.py (declared parameters).

The registries a config chooses from: `FFN_TYPES` (model.ffn), `ATTENTION_KERNELS` (model.attention)
and `REMAT_POLICIES` (model.remat).
"""

from parscale_jax.model.attention import KERNELS as ATTENTION_KERNELS
from parscale_jax.model.attention import KVCache, attention_mask
from parscale_jax.model.ffn import FFN_TYPES
from parscale_jax.model.moe import MOE_IMPLS  # registers model.ffn=moe
from parscale_jax.model.layers import Aux, GrowthMasks, apply_rope, rope_tables
from parscale_jax.model.lm import (
    REMAT_POLICIES,
    ParScaleLM,
    abstract_params,
    activation_axes,
    init_params,
    merge_params,
    partition_trainable,
    mlp_stacks,
    model_graphdef,
    moe_layer,
    param_info,
    prefix_slots,
    residual_outputs,
    scan_layers,
    split_params,
)
from parscale_jax.model.params import DECAYED, ParScaleParam

__all__ = ["ATTENTION_KERNELS", "DECAYED", "FFN_TYPES", "MOE_IMPLS", "REMAT_POLICIES", "Aux", "GrowthMasks", "KVCache",
           "ParScaleLM", "ParScaleParam", "abstract_params", "activation_axes", "apply_rope", "attention_mask",
           "init_params", "merge_params", "mlp_stacks", "model_graphdef", "moe_layer", "param_info",
           "partition_trainable", "prefix_slots", "residual_outputs", "rope_tables", "scan_layers", "split_params"]
