"""Feed-forward blocks, chosen by `model.ffn` from `FFN_TYPES`.

An entry is an `nnx.Module` built as `cls(cfg, rngs)` whose call maps `x_BSD` to `(y_BSD, Aux)`:
the output, and any auxiliary losses and statistics it wants trained on and logged (a router's
load-balancing loss, say). An entry that can grow wider during training (`train.growth`) also takes
`live_F`, the growth mask over its neurons. A new kind of feed-forward layer (Mixture-of-Experts) is a new entry
here, declaring its parameters' axes and kinds; Block, the scan and the train step take it as is.
"""

from __future__ import annotations

import jax
from flax import nnx

from parscale_jax.model.config import ModelConfig
from parscale_jax.model.layers import Aux, Linear, masked


class SwiGLU(nnx.Module):
    """The Qwen2/Llama MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, F = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(cfg, rngs, D, F, ("embed", "mlp"))
        self.up_proj = Linear(cfg, rngs, D, F, ("embed", "mlp"))
        self.down_proj = Linear(cfg, rngs, F, D, ("mlp", "embed"))

    def __call__(self, x_BSD: jax.Array, live_F: jax.Array | None = None) -> tuple[jax.Array, Aux]:
        return self.down_proj(masked(nnx.silu(self.gate_proj(x_BSD)) * self.up_proj(x_BSD), live_F)), Aux.none()


FFN_TYPES: dict[str, type[nnx.Module]] = {"swiglu": SwiGLU}
