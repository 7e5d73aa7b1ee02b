"""The logical-axis rules: which mesh axes each named array dimension is split over.

Every parameter declares the logical names of its dimensions where it is created (model/params.py),
and activations name theirs at the few `constrain` calls in the model. `RULES` maps each name to
the mesh axes it is split over (none: replicated; several: split over their product). The mesh's
axes are the ones the rules name, in the order they first appear (`mesh_axes`; the last one gets
the devices with the fastest links):

  data    batch rows (and, with `mesh.fsdp`, the hidden dimension of every weight: ZeRO-3)
  expert  a Mixture-of-Experts' experts (model/moe.py); outside its layers, more batch rows
  stream  the P parallel streams: their activations and their per-stream prefixes
  model   tensor parallelism: attention heads, MLP width, vocabulary

A new kind of dimension is one rule here; a new mesh axis is a rule that
names it, and `mesh.<axis>` then sets its size. layout.py turns the rules into shardings on a
concrete mesh; config.py checks, from the same rules and the parameters' declarations, that every
split dimension divides evenly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import jax
from jax.sharding import PartitionSpec

from parscale_jax.errors import ConfigError

# Logical axis -> mesh axes. `embed` goes to `data` only with FSDP, and `kv_heads` to `model` only
# when the kv heads split evenly over it (Qwen2.5 has 2 kv heads; more model devices replicate them).
RULES: dict[str, tuple[str, ...]] = {
    # activations and batches
    "batch": ("data", "expert"),
    "stream": ("stream",),  # the streams' activations, prefixes and aggregator weights
    "length": (),
    "act_embed": (),
    "act_vocab": ("model",),
    # parameters (and the KV cache)
    "stream_embed": ("stream",),  # aggregator input: P hidden states side by side, stream-major
    "heads": ("model",),
    "kv_heads": ("model",),
    "mlp": ("model",),
    "experts": ("expert",),
    "routes": (),  # a router's outputs: one per expert (or the shared expert's gate)
    "vocab": ("model",),
    "embed": (),
    "layers": (),
    "norm": (),
    "prefix": (),
    "head_dim": (),
}
FSDP_RULES: dict[str, tuple[str, ...]] = {"embed": ("data",)}  # what `mesh.fsdp` adds


def mesh_axes(rules: Mapping[str, tuple[str, ...]] = RULES) -> tuple[str, ...]:
    """The mesh's axes: every mesh axis the rules name, in the order they first appear."""
    return tuple(dict.fromkeys(axis for axes in rules.values() for axis in axes))


def fill_axis(rules: Mapping[str, tuple[str, ...]] = RULES) -> str:
    """The mesh axis that takes the devices the others leave unless the config says otherwise: the
    first one batch rows are split over."""
    return rules["batch"][0]


def rules_for(num_kv_heads: int, mesh_shape: Mapping[str, int], fsdp: bool) -> dict[str, tuple[str, ...]]:
    """RULES for one model on one mesh: FSDP's on top when asked; kv heads replicated when they are
    fewer than the devices they would be split over (Qwen2.5 has 2) rather than split inside a head."""
    rules = {**RULES, **(FSDP_RULES if fsdp else {})}
    if num_kv_heads % math.prod(max(mesh_shape.get(axis, 1), 1) for axis in rules["kv_heads"]):
        rules["kv_heads"] = ()
    return rules


def spec(logical_axes: tuple[str | None, ...], rules: Mapping[str, tuple[str, ...]] = RULES) -> PartitionSpec:
    """The PartitionSpec of an array whose dimensions have these logical names (None: not split)."""
    unknown = [name for name in logical_axes if name and name not in rules]
    if unknown:
        raise KeyError(f"no sharding rule for logical axis '{unknown[0]}'; add it to sharding.RULES")

    def entry(name):
        axes = rules[name] if name else ()
        return None if not axes else axes[0] if len(axes) == 1 else axes

    return PartitionSpec(*(entry(name) for name in logical_axes))


def check_divisible(dims: Iterable[tuple[str, int, str]], mesh_shape: Mapping[str, int], num_kv_heads: int,
                    fsdp: bool) -> dict[str, tuple[str, ...]]:
    """The rules in force on this mesh (`rules_for`), once every dimension splits evenly over the
    mesh axes its rule names; else a ConfigError that names the first that does not and the mesh
    axis to blame. `dims` are (logical axis, size, what it is); an axis whose size is not yet known
    (-1) is not checked."""
    rules = rules_for(num_kv_heads, mesh_shape, fsdp)
    for logical, size, what in dims:
        axes = [axis for axis in rules.get(logical, ()) if mesh_shape.get(axis, 1) != 1]
        if not axes or any(mesh_shape[axis] < 1 for axis in axes):
            continue
        devices = math.prod(mesh_shape[axis] for axis in axes)
        if size % devices:
            over = " x ".join(f"mesh.{axis}={mesh_shape[axis]}" for axis in axes) + " = " if len(axes) > 1 else ""
            raise ConfigError(f"mesh.{axes[0]}", f"{over}{devices} devices do not divide {what}")
    return rules


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    """Pin an activation's layout when a mesh is set (`jax.set_mesh`); a no-op without one."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec(logical_axes))
