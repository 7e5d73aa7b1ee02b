"""Feed-forward blocks, chosen by `model.ffn` from `FFN_TYPES`.

An entry is an `nnx.Module` built as `cls(cfg, rngs)` whose call maps the streams' activations
`x_PBSD` to `(y_PBSD, Aux)`: the output, and any auxiliary losses and statistics it wants trained on and logged (a router's
load-balancing loss, say). An entry that can grow wider during training (`train.growth`) also takes
`live_F`, the growth mask over its neurons. Besides its parameters, which declare their axes and
kinds, an entry says what the rest of the framework needs to know about it:

  HF_NAMES            its tensors in a Hugging Face checkpoint: our path under the layer's `mlp` ->
                      (the name under `model.layers.{i}.mlp.`, the conversion of interop/hf.py); a
                      parameter with a leading axis the checkpoint keeps as separate tensors (experts)
                      writes that axis's index as `{e}` in the name
  OUTPUT_PROJECTIONS  the projections (paths under `mlp`) whose outputs enter the residual stream
  flops_per_token     forward matrix-product FLOPs of one token through the block

A new kind of feed-forward layer (Mixture-of-Experts) is a new entry here; Block, the scan, the
train step, sharding, counting, Hugging Face names and `upscale` take it as is.
"""

from __future__ import annotations

import jax
from flax import nnx

from parscale_jax.model.config import ModelConfig
from parscale_jax.model.layers import Aux, Linear, masked


class SwiGLU(nnx.Module):
    """The Qwen2/Llama MLP: down(silu(gate(x)) * up(x))."""

    HF_NAMES = {
        "gate_proj/kernel": ("gate_proj.weight", "transpose"),
        "up_proj/kernel": ("up_proj.weight", "transpose"),
        "down_proj/kernel": ("down_proj.weight", "transpose"),
    }
    OUTPUT_PROJECTIONS = ("down_proj",)

    @staticmethod
    def flops_per_token(cfg: ModelConfig) -> int:
        return 2 * 3 * cfg.hidden_size * cfg.intermediate_size

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, F = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(cfg, rngs, D, F, ("embed", "mlp"))
        self.up_proj = Linear(cfg, rngs, D, F, ("embed", "mlp"))
        self.down_proj = Linear(cfg, rngs, F, D, ("mlp", "embed"))

    def __call__(self, x_PBSD: jax.Array, live_F: jax.Array | None = None) -> tuple[jax.Array, Aux]:
        return self.down_proj(masked(nnx.silu(self.gate_proj(x_PBSD)) * self.up_proj(x_PBSD), live_F)), Aux.none()


FFN_TYPES: dict[str, type[nnx.Module]] = {"swiglu": SwiGLU}
