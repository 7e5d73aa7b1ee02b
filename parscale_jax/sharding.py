"""The logical-axis rules: which mesh axis each named array dimension is split over.

The mesh has three axes (`config.MESH_AXES`):
  data    batch rows (and, with `mesh.fsdp`, the hidden dimension of every weight: ZeRO-3)
  stream  the P parallel streams: their activations and their per-stream prefixes
  model   tensor parallelism: attention heads, MLP width, vocabulary

Every parameter declares the logical names of its dimensions where it is created (model/params.py),
and activations name theirs at the few `constrain` calls in the model. `RULES` maps the names to
mesh axes; this file is the only place that names a mesh axis. layout.py turns the rules into
shardings on a concrete mesh.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
from jax.sharding import PartitionSpec

# Logical axis -> mesh axis. `embed` goes to `data` only with FSDP, and `kv_heads` to `model` only
# when the kv heads split evenly over it (Qwen2.5 has 2 kv heads; more model devices replicate them).
RULES: dict[str, str | None] = {
    # activations and batches
    "batch": "data",
    "length": None,
    "act_embed": None,
    "act_vocab": "model",
    # parameters (and the KV cache)
    "stream": "stream",
    "stream_embed": "stream",  # aggregator input: P hidden states side by side, stream-major
    "heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "vocab": "model",
    "embed": None,
    "layers": None,
    "norm": None,
    "prefix": None,
    "head_dim": None,
}


def rules_for(num_kv_heads: int, mesh_shape: Mapping[str, int], fsdp: bool) -> dict[str, str | None]:
    """RULES for one model on one mesh: `embed` over `data` with FSDP; kv heads replicated when they
    are fewer than the `model` devices (Qwen2.5 has 2) rather than split inside a head."""
    rules = {**RULES, "embed": "data" if fsdp else None}
    if num_kv_heads % mesh_shape["model"]:
        rules["kv_heads"] = None
    return rules


def spec(logical_axes: tuple[str | None, ...], rules: Mapping[str, str | None] = RULES) -> PartitionSpec:
    """The PartitionSpec of an array whose dimensions have these logical names (None: not split)."""
    unknown = [name for name in logical_axes if name and name not in rules]
    if unknown:
        raise KeyError(f"no sharding rule for logical axis '{unknown[0]}'; add it to sharding.RULES")
    return PartitionSpec(*(rules[name] if name else None for name in logical_axes))


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    """Pin an activation's layout when a mesh is set (`jax.set_mesh`); a no-op without one."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec(logical_axes))
