"""Where every array lives on the device mesh: the mesh, the logical-axis rules, the shardings.

The mesh has three axes:
  data    batch rows (and, with `mesh.fsdp`, the hidden dimension of every weight: ZeRO-3)
  stream  the P parallel streams: their activations and their per-stream prefixes
  model   tensor parallelism: attention heads, MLP width, vocabulary

Arrays name their dimensions with logical axes (`PARAM_AXES` for weights, literal tuples at the
few activation constraints in model.py); `rules` maps those names to mesh axes. This file is the
only place that names a mesh axis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from parscale_jax.config import Config, ConfigError, resolve_mesh

MESH_AXES = ("data", "stream", "model")

# Logical axis -> mesh axis. `embed` goes to `data` only with FSDP, and `kv_heads` to `model` only
# when the kv heads split evenly over it (Qwen2.5 has 2 kv heads; more model devices replicate them).
ACTIVATION_RULES: dict[str, str | None] = {
    "batch": "data",
    "stream": "stream",
    "length": None,
    "act_embed": None,
    "act_vocab": "model",
}
PARAM_RULES: dict[str, str | None] = {
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

# The logical axes of each weight, by the end of its path in the parameter dict.
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed_tokens/embedding": ("vocab", "embed"),
    "lm_head/kernel": ("embed", "vocab"),
    "norm/weight": ("norm",),
    "input_layernorm/weight": ("layers", "norm"),
    "post_attention_layernorm/weight": ("layers", "norm"),
    "q_proj/kernel": ("layers", "embed", "heads"),
    "q_proj/bias": ("layers", "heads"),
    "k_proj/kernel": ("layers", "embed", "kv_heads"),
    "k_proj/bias": ("layers", "kv_heads"),
    "v_proj/kernel": ("layers", "embed", "kv_heads"),
    "v_proj/bias": ("layers", "kv_heads"),
    "o_proj/kernel": ("layers", "heads", "embed"),
    "gate_proj/kernel": ("layers", "embed", "mlp"),
    "up_proj/kernel": ("layers", "embed", "mlp"),
    "down_proj/kernel": ("layers", "mlp", "embed"),
    "prefix_k": ("layers", "stream", "kv_heads", "prefix", "head_dim"),
    "prefix_v": ("layers", "stream", "kv_heads", "prefix", "head_dim"),
    "aggregate_in_kernel": ("stream_embed", "embed"),
    "aggregate_in_bias": ("norm",),
    "aggregate_out_kernel": ("embed", "stream"),
    "aggregate_out_bias": ("stream",),
}


def param_logical_axes(path: tuple[str, ...]) -> tuple[str, ...]:
    """The logical axes of the weight at `path` (its keys in the parameter dict)."""
    for length in (2, 1):
        axes = PARAM_AXES.get("/".join(path[-length:]))
        if axes is not None:
            return axes
    raise KeyError(f"no sharding rule for parameter {'/'.join(path)}; add it to PARAM_AXES")


def param_rules(num_kv_heads: int, mesh_shape: Mapping[str, int], fsdp: bool) -> dict[str, str | None]:
    """PARAM_RULES for one model on one mesh: `embed` over `data` with FSDP; kv heads replicated
    when they are fewer than the `model` devices (Qwen2.5 has 2) rather than split inside a head."""
    rules = {**PARAM_RULES, "embed": "data" if fsdp else None}
    if num_kv_heads % mesh_shape["model"]:
        rules["kv_heads"] = None
    return rules


def param_spec(logical_axes: tuple[str, ...], rules: Mapping[str, str | None]) -> PartitionSpec:
    return PartitionSpec(*(rules[name] for name in logical_axes))


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    """Pin an activation's layout when a mesh is set (`jax.set_mesh`); a no-op without one.

    Inside the stream vmap (spmd_axis_name="stream") the stream axis is added by JAX.
    """
    if jax.sharding.get_abstract_mesh().empty:
        return x
    spec = PartitionSpec(*(ACTIVATION_RULES[name] if name else None for name in logical_axes))
    return jax.lax.with_sharding_constraint(x, spec)


def make_mesh(config: Config, devices: list[Any] | None = None) -> Mesh:
    """The (data, stream, model) mesh over `devices` (default: all), after checking it fits them.

    Devices are laid out by the physical topology, so `model` gets the fastest links. With
    `mesh.dcn_data` > 1 the data axis spans that many TPU slices; the other axes stay inside one.
    """
    devices = list(jax.devices() if devices is None else devices)
    mesh_cfg = resolve_mesh(config, len(devices))
    slices = len({getattr(device, "slice_index", 0) for device in devices})
    if slices != mesh_cfg.dcn_data:
        raise ConfigError("mesh.dcn_data", f"is {mesh_cfg.dcn_data} but the devices form {slices} slice(s)")
    shape = (mesh_cfg.data, mesh_cfg.stream, mesh_cfg.model)
    if mesh_cfg.dcn_data > 1:
        per_slice = (mesh_cfg.data // mesh_cfg.dcn_data, mesh_cfg.stream, mesh_cfg.model)
        device_grid = mesh_utils.create_hybrid_device_mesh(per_slice, (mesh_cfg.dcn_data, 1, 1), devices)
    else:
        try:
            device_grid = mesh_utils.create_device_mesh(shape, devices)
        except (AssertionError, NotImplementedError, ValueError):
            # Topologies the helper does not know (e.g. a subset of a host's devices): plain order.
            device_grid = np.asarray(devices).reshape(shape)
    return Mesh(device_grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh plus the rules in force on it; turns logical axes into shardings."""

    mesh: Mesh
    rules: Mapping[str, str | None]  # for weights; see `param_rules`

    @classmethod
    def create(cls, config: Config, devices: list[Any] | None = None) -> Layout:
        mesh = make_mesh(config, devices)
        return cls(mesh, param_rules(config.model.num_kv_heads, mesh.shape, config.mesh.fsdp))

    def sharding(self, logical_axes: tuple[str, ...]) -> NamedSharding:
        return NamedSharding(self.mesh, param_spec(logical_axes, self.rules))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def batch_sharding(self) -> NamedSharding:
        """`[B, ...]` batch arrays: rows over `data`, the same on every stream and model device."""
        return NamedSharding(self.mesh, PartitionSpec("data"))

    def cache_sharding(self) -> NamedSharding:
        """The generation KV cache `[L, P, B, C, n_kv, head_dim]`: streams, rows and kv heads as in training."""
        return NamedSharding(self.mesh, PartitionSpec(None, "stream", "data", None, self.rules["kv_heads"], None))

    def param_shardings(self, params: Any) -> Any:
        """Shardings of a parameter tree (arrays or ShapeDtypeStructs) by `PARAM_AXES`."""

        return jax.tree_util.tree_map_with_path(lambda path, _: self.sharding(param_logical_axes(_keys(path))),
                                                params)

    def state_shardings(self, state: dict) -> dict:
        """Shardings of a train state: optimizer moments follow their parameter, scalars replicate."""
        params = self.param_shardings(state["params"])
        by_path = {_keys(path): s for path, s in jax.tree_util.tree_leaves_with_path(params)}

        def opt_leaf(path, leaf):
            return by_path.get(_keys(path), self.replicated())

        return {"step": self.replicated(), "params": params,
                "opt_state": jax.tree_util.tree_map_with_path(opt_leaf, state["opt_state"]),
                "skipped_steps": self.replicated()}

    def process_rows(self, global_batch: int) -> slice:
        """The contiguous rows of a global batch whose shards live on this process's devices."""
        index_map = self.batch_sharding().addressable_devices_indices_map((global_batch,))
        ranges = {(index[0].start or 0, global_batch if index[0].stop is None else index[0].stop)
                  for index in index_map.values()}
        start, stop = min(r[0] for r in ranges), max(r[1] for r in ranges)
        if sum(r[1] - r[0] for r in ranges) != stop - start:
            raise ValueError(f"this process's devices hold rows {sorted(ranges)} of the batch, not one "
                             "contiguous block; order the devices so each host's share of `data` is adjacent")
        return slice(start, stop)

    def put_batch(self, local_batch: dict[str, np.ndarray], global_batch: int) -> dict[str, jax.Array]:
        """Global arrays from this process's rows (`process_rows`) of every batch field."""
        sharding = self.batch_sharding()
        return {key: jax.make_array_from_process_local_data(
                    sharding, value, (global_batch, *value.shape[1:]))
                for key, value in local_batch.items()}


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that carry shardings, as Orbax needs to restore onto a mesh."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _keys(path) -> tuple[str, ...]:
    """The dict keys along a pytree path (optax's wrappers add attribute and index entries)."""
    return tuple(str(entry.key) for entry in path if isinstance(entry, jax.tree_util.DictKey))
