"""Will a config fit a machine? Compile its train step ahead of time for the target and measure.

For a TPU topology the step is compiled by the real TPU compiler (libtpu, `pip install
'parscale-jax[tpu]'`) from any CPU machine, so its memory figures are the ones the pod will see and a
program that does not fit is refused exactly as it would be there. For N GPUs the step is compiled
for N simulated CPU devices with the same mesh and shardings: the parameter and optimizer-state
figures are exact, the activation figure is the CPU compiler's and only an estimate.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from parscale_jax.data.packing import ROW_KEYS
from parscale_jax.config import Config
from parscale_jax.errors import ConfigError
from parscale_jax.growth import Ramp, Schedule, describe
from parscale_jax.layout import Layout, with_shardings
from parscale_jax.model import abstract_params
from parscale_jax.runs import partition_trainable
from parscale_jax.training.loop import create_state_fn, jit_train_step

GIB = 1024**3

# TPU generations: how a slice name counts (TensorCores or chips), its torus rank, and the HBM per
# device the compiler lets a program use.
TPU_GENERATIONS = {
    "v4": {"per_chip": 2, "dims": 3, "hbm_gib": 30.75},
    "v5p": {"per_chip": 2, "dims": 3, "hbm_gib": 95.74},
    "v5e": {"per_chip": 1, "dims": 2, "hbm_gib": 15.75},
    "v6e": {"per_chip": 1, "dims": 2, "hbm_gib": 31.25},
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}
_TORUS = {  # chips -> slice shape
    3: {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
        512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"},
    2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
}


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # as the user wrote it
    devices: tuple[Any, ...]
    memory_per_device: float  # bytes a program may use on one device
    exact: bool  # compiled by the target's own compiler


def tpu_target(name: str, slices: int = 1) -> Target:
    """`v5p-256` (the Cloud TPU name) or `v5p:4x4x8` (generation:chip topology), `slices` of it."""
    match = re.fullmatch(r"(v\d+[a-z]*|v5litepod|v5lite)(?:-(\d+)|:(\d+(?:x\d+)+))", name)
    generation = _ALIASES.get(match.group(1), match.group(1)) if match else None
    if generation not in TPU_GENERATIONS:
        raise ConfigError("--topology", f"unknown TPU topology '{name}'; write it like v5p-256, v5e-64 or "
                          f"v5p:4x4x8 (generations: {', '.join(TPU_GENERATIONS)})")
    spec = TPU_GENERATIONS[generation]
    if match.group(3):
        shape = match.group(3)
        if shape.count("x") + 1 != spec["dims"]:
            raise ConfigError("--topology", f"{generation} slices are {spec['dims']}-D, got {shape}")
    else:
        chips = int(match.group(2)) // spec["per_chip"]
        shape = _TORUS[spec["dims"]].get(chips)
        if shape is None:
            known = ", ".join(f"{generation}-{chips * spec['per_chip']}" for chips in _TORUS[spec["dims"]])
            raise ConfigError("--topology", f"no {generation} slice has {chips} chips ({name}); known: {known}")
    try:
        from jax.experimental import topologies

        # Quiets libtpu's complaints about not running on a TPU VM; a real one has these set.
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{generation}-8")
        topology = topologies.get_topology_desc(
            topology_name=f"{generation}:{shape}", platform="tpu", num_slices=slices,
            **({"chip_config_name": "megacore"} if generation == "v4" else {}))
    except (ImportError, RuntimeError) as err:
        raise ConfigError("--topology", "compiling for TPU needs libtpu: pip install 'parscale-jax[tpu]' "
                          f"({str(err).splitlines()[0]})") from None
    return Target(name if slices == 1 else f"{slices} x {name}", tuple(topology.devices),
                  spec["hbm_gib"] * GIB, exact=True)


def gpu_target(count: int, memory_gib: float) -> Target:
    """`count` GPUs of `memory_gib` each, simulated by as many CPU devices (set before JAX starts)."""
    if count < 1:
        raise ConfigError("--gpus", f"must be >= 1, got {count}")
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # the CPU backend already exists: usable only if it has the right size
        if jax.device_count("cpu") != count:
            raise ConfigError("--gpus", f"JAX already started with {jax.device_count('cpu')} CPU devices; "
                              "run `parscale-jax plan` in a fresh process") from None
    return Target(f"{count} GPUs x {memory_gib:g} GiB", tuple(jax.devices("cpu")), memory_gib * GIB, exact=False)


def _bytes_per_device(tree: Any) -> int:
    """Bytes of one device's shard of every array in a tree of sharded ShapeDtypeStructs."""
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
               for leaf in jax.tree.leaves(tree))


def plan(config: Config, target: Target) -> dict[str, Any]:
    """Per-device memory of one training step of `config` on `target`, from its compiled program.
    A run with `train.growth` is planned at every stage (the step of each ramp, with its masks); the
    report is the largest stage's, with every stage's total and whether all of them fit."""
    if not config.train.growth:
        return _plan_phase(config, target, None)
    schedule = Schedule(config)
    starts = [0, *(stage.step for stage in config.train.growth)]
    stages = []
    for step in starts:
        phase = schedule.phase(step)
        plain = dataclasses.replace(config, model=phase.model, train=dataclasses.replace(config.train, growth=()))
        report = _plan_phase(plain, target, phase.ramp)
        stages.append({"from_step": step, "model": describe(phase.model), "report": report})
    largest = max(stages, key=lambda stage: stage["report"].get("total_bytes", math.inf))["report"]
    return {**largest, "fits": all(stage["report"]["fits"] for stage in stages),
            "stages": [{"from_step": stage["from_step"], "model": stage["model"],
                        "total_bytes": stage["report"].get("total_bytes"), "fits": stage["report"]["fits"]}
                       for stage in stages]}


def _plan_phase(config: Config, target: Target, ramp: Ramp | None) -> dict[str, Any]:
    layout = Layout.create(config, list(target.devices))
    graphdef, optimizer, create_state = create_state_fn(config)
    params = abstract_params(config.model)
    trained, frozen = partition_trainable(params, config)
    abstract_state = jax.eval_shape(create_state, trained)
    shardings = layout.state_shardings(abstract_state)
    state = with_shardings(abstract_state, shardings)
    frozen_shardings = layout.param_shardings(frozen)
    frozen = with_shardings(frozen, frozen_shardings)
    B, S = config.train.batch_size, config.data.seq_len
    batch = {key: jax.ShapeDtypeStruct((B, S), jnp.int32, sharding=layout.batch_sharding())
             for key in ROW_KEYS}
    halted = jax.ShapeDtypeStruct((), jnp.bool_, sharding=layout.replicated())

    report: dict[str, Any] = {
        "target": target.name, "devices": len(target.devices), "exact": target.exact,
        "mesh": dict(layout.mesh.shape), "fsdp": config.mesh.fsdp,
        "rows_per_device": B // layout.mesh.shape["data"], "seq_len": S,
        "micro_batch_rows_per_device": B // config.train.grad_accum // layout.mesh.shape["data"],
        "parameters": sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
        "params_bytes": _bytes_per_device(state["params"]) + _bytes_per_device(frozen),
        "opt_state_bytes": _bytes_per_device(state["opt_state"]),
        "memory_per_device_bytes": int(target.memory_per_device),
    }
    started = time.perf_counter()
    with jax.set_mesh(layout.mesh):
        try:
            compiled = jit_train_step(graphdef, optimizer, config.train, layout, shardings,
                                      frozen_shardings, ramp).lower(state, frozen, batch, halted).compile()
        except Exception as err:  # the TPU compiler refuses a program larger than HBM
            if "RESOURCE_EXHAUSTED" not in str(err):
                raise
            report.update(fits=False, compiler=str(err).splitlines()[0],
                          compile_s=round(time.perf_counter() - started, 1))
            return report
    memory = compiled.memory_analysis()
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
             + memory.temp_size_in_bytes + memory.generated_code_size_in_bytes)
    report.update(
        compile_s=round(time.perf_counter() - started, 1),
        arguments_bytes=memory.argument_size_in_bytes, outputs_bytes=memory.output_size_in_bytes,
        aliased_bytes=memory.alias_size_in_bytes, temporaries_bytes=memory.temp_size_in_bytes,
        code_bytes=memory.generated_code_size_in_bytes, total_bytes=total,
        fits=bool(total <= target.memory_per_device))
    return report


def format_report(report: dict[str, Any]) -> str:
    mesh = " x ".join(f"{axis}={size}" for axis, size in report["mesh"].items())
    lines = [
        f"target    {report['target']}: {report['devices']} devices",
        f"mesh      {mesh}{' with FSDP' if report['fsdp'] else ''}",
        f"batch     {report['rows_per_device']} rows x {report['seq_len']} tokens per data shard, "
        f"{report['micro_batch_rows_per_device']} per micro-batch",
        f"model     {report['parameters'] / 1e9:.3f} B parameters",
        "",
        "per device                  GiB",
    ]

    def row(label: str, key: str, note: str = "") -> str:
        return f"  {label:<24}{report[key] / GIB:7.2f}   {note}".rstrip()

    lines += [row("parameters", "params_bytes"), row("optimizer state", "opt_state_bytes")]
    if "total_bytes" in report:
        parts = " + ".join(f"{name} {report[key] / GIB:.2f}" for name, key in (
            ("arguments", "arguments_bytes"), ("outputs", "outputs_bytes"),
            ("temporaries", "temporaries_bytes"), ("code", "code_bytes")))
        source = "the target's compiler" if report["exact"] else "the CPU compiler: an estimate"
        lines += [row("activations, workspace", "temporaries_bytes", f"({source})"),
                  row("total", "total_bytes", f"= {parts} - donated {report['aliased_bytes'] / GIB:.2f}")]
    lines.append(row("usable", "memory_per_device_bytes"))
    if "compiler" in report:
        lines.append(f"compiler: {report['compiler']}")
    lines.append(f"{'FITS' if report['fits'] else 'DOES NOT FIT'} (compiled in {report['compile_s']} s)")
    if "stages" in report:
        lines += ["", "growth stages (train.growth; the largest is shown above)"]
        for stage in report["stages"]:
            total = "does not compile" if stage["total_bytes"] is None else f"{stage['total_bytes'] / GIB:7.2f} GiB"
            lines.append(f"  from step {stage['from_step']:<8} {stage['model']}: {total}"
                         f"{'' if stage['fits'] else '  DOES NOT FIT'}")
    return "\n".join(lines)
