"""Where every array lives: the device mesh, and the shardings of a model's parameters, train
state, batches and KV cache on it (by the rules of sharding.py and the axes each parameter declares)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from parscale_jax.config import Config, MeshConfig, validate_mesh
from parscale_jax.errors import ConfigError
from parscale_jax.model import param_info
from parscale_jax.model.config import ModelConfig
from parscale_jax.sharding import rules_for, spec

Path = tuple[str, ...]  # a parameter's keys in the parameter dict
LAYER_CACHE_AXES = ("stream", "batch", "length", "kv_heads", "head_dim")  # a layer's KV cache [P, B, C, K, H]


def resolve_mesh(config: Config, num_devices: int) -> tuple[MeshConfig, dict[str, tuple[str, ...]]]:
    """(`config.mesh` with its -1 axis filled in for `num_devices`, checked against them and against
    the model; the sharding rules in force on it)."""
    shape = config.mesh.shape
    fixed = math.prod(size for size in shape.values() if size != -1)
    written = " x ".join(f"{name}={size}" for name, size in shape.items())
    for name, size in shape.items():
        if size == -1:
            if num_devices % fixed:
                raise ConfigError(f"mesh.{name}", f"cannot fill: {num_devices} devices do not split into {written}")
            shape[name] = num_devices // fixed
    written = " x ".join(f"{name}={size}" for name, size in shape.items())
    if math.prod(shape.values()) != num_devices:
        raise ConfigError("mesh", f"{written} = {math.prod(shape.values())} devices, but {num_devices} are "
                          "available (set one axis to -1 to fill)")
    mesh = dataclasses.replace(config.mesh, sizes=tuple(shape.items()))
    return mesh, validate_mesh(mesh, config.model, config.train)


def device_mesh(mesh_cfg: MeshConfig, devices: list[Any]) -> Mesh:
    """The devices laid out as `mesh_cfg` (resolved) says, by the physical topology, so that the
    last axis (`model`) gets the fastest links. With `mesh.dcn_data` > 1 the first axis (`data`)
    spans that many TPU slices; the other axes stay inside one."""
    slices = len({getattr(device, "slice_index", 0) for device in devices})
    if slices != mesh_cfg.dcn_data:
        raise ConfigError("mesh.dcn_data", f"is {mesh_cfg.dcn_data} but the devices form {slices} slice(s)")
    names, shape = tuple(mesh_cfg.shape), tuple(mesh_cfg.shape.values())
    if mesh_cfg.dcn_data > 1:
        per_slice = (shape[0] // mesh_cfg.dcn_data, *shape[1:])
        across = (mesh_cfg.dcn_data,) + (1,) * (len(shape) - 1)
        device_grid = mesh_utils.create_hybrid_device_mesh(per_slice, across, devices)
    else:
        try:
            device_grid = mesh_utils.create_device_mesh(shape, devices)
        except (AssertionError, NotImplementedError, ValueError):
            # Topologies the helper does not know (e.g. a subset of a host's devices): plain order.
            device_grid = np.asarray(devices).reshape(shape)
    return Mesh(device_grid, names, axis_types=(AxisType.Auto,) * len(names))


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh, the rules in force on it, and the declared axes of one model's parameters."""

    mesh: Mesh
    rules: Mapping[str, tuple[str, ...]]  # see `sharding.rules_for`
    param_axes: Mapping[Path, tuple[str, ...]]  # every parameter's logical axes, by path
    fsdp: bool

    @classmethod
    def create(cls, config: Config, devices: list[Any] | None = None) -> Layout:
        """`config`'s model on its mesh over `devices` (default: all), checked against them."""
        devices = list(jax.devices() if devices is None else devices)
        mesh_cfg, rules = resolve_mesh(config, len(devices))
        axes = {path: leaf.axes for path, leaf in _flat(param_info(config.model)).items()}
        return cls(device_mesh(mesh_cfg, devices), rules, axes, config.mesh.fsdp)

    @classmethod
    def one_device(cls, model: ModelConfig) -> Layout:
        """`model` on the first device alone: for benchmarks, and for reading a run to write it out."""
        config = Config(model=model, mesh=MeshConfig.one_device())
        return cls.create(config, jax.devices()[:1])

    @classmethod
    def on(cls, mesh: Mesh, model: ModelConfig, fsdp: bool) -> Layout:
        axes = {path: leaf.axes for path, leaf in _flat(param_info(model)).items()}
        return cls(mesh, rules_for(model.num_kv_heads, mesh.shape, fsdp), axes, fsdp)

    def for_model(self, model: ModelConfig) -> Layout:
        """The same mesh laid out for another shape of model (a grown one)."""
        return Layout.on(self.mesh, model, self.fsdp)

    def sharding(self, logical_axes: tuple[str, ...]) -> NamedSharding:
        return NamedSharding(self.mesh, spec(logical_axes, self.rules))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def batch_sharding(self) -> NamedSharding:
        """`[B, ...]` batch arrays: rows over `data`, the same on every stream and model device."""
        return self.sharding(("batch",))

    def param_sharding(self, path: Path, ndim: int) -> NamedSharding:
        axes = self.param_axes.get(path)
        if axes is None:
            raise KeyError(f"{'/'.join(path)} is not a parameter of this model (none declares its axes)")
        if len(axes) != ndim:
            raise ValueError(f"parameter {'/'.join(path)} declares axes {axes} but has {ndim} dimensions")
        return self.sharding(axes)

    def param_shardings(self, params: Any) -> Any:
        """Shardings of a parameter tree (arrays or ShapeDtypeStructs; all parameters or a part)."""
        return jax.tree_util.tree_map_with_path(lambda path, x: self.param_sharding(keys_of(path), x.ndim), params)

    def state_shardings(self, state: dict) -> dict:
        """Shardings of a train state: optimizer moments follow their parameter, scalars replicate."""
        params = self.param_shardings(state["params"])
        by_path = {keys_of(path): s for path, s in jax.tree_util.tree_leaves_with_path(params)}

        def opt_leaf(path, leaf):
            return by_path.get(keys_of(path), self.replicated())

        return {"step": self.replicated(), "params": params,
                "opt_state": jax.tree_util.tree_map_with_path(opt_leaf, state["opt_state"]),
                "skipped_steps": self.replicated()}

    def place(self, params: Any, dtype: Any) -> Any:
        """Host arrays (numpy) straight onto the mesh as `dtype`: each device receives only its own slice."""
        return jax.tree.map(lambda x, s: jax.make_array_from_callback(
            x.shape, s, lambda index: np.asarray(x[index], dtype=dtype)), params, self.param_shardings(params))

    def on_mesh(self, abstract: Any) -> Any:
        """ShapeDtypeStructs of a parameter tree that carry its shardings, as Orbax needs to restore."""
        return with_shardings(abstract, self.param_shardings(abstract))

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

    def placed(self, batches: Iterable[dict[str, np.ndarray]], global_batch: int) -> Iterator[dict[str, jax.Array]]:
        """Global batches of `global_batch` rows on the mesh, as each is asked for, of which this process
        supplies its own rows (`process_rows`) from every batch of `batches`."""
        mine = self.process_rows(global_batch)
        return (self.put_batch({key: value[mine] for key, value in batch.items()}, global_batch) for batch in batches)

    def put_batch(self, local_batch: dict[str, np.ndarray], global_batch: int) -> dict[str, jax.Array]:
        """Global arrays from this process's rows (`process_rows`) of every batch field."""
        sharding = self.batch_sharding()
        return {key: jax.make_array_from_process_local_data(
                    sharding, value, (global_batch, *value.shape[1:]))
                for key, value in local_batch.items()}


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that carry shardings, as Orbax needs to restore onto a mesh."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def keys_of(path) -> Path:
    """The dict keys along a pytree path (optax's wrappers add attribute and index entries)."""
    return tuple(str(entry.key) for entry in path if isinstance(entry, jax.tree_util.DictKey))


def _flat(tree: dict) -> dict[Path, Any]:
    return {keys_of(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
