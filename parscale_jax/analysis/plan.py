"""Will a config fit a machine? Compile its train step ahead of time for the target and measure.

For a TPU topology the step is compiled by the real TPU compiler (libtpu, `pip install
'parscale-jax[tpu]'`) from any CPU machine, so its memory figures are the ones the pod will see and a
program that does not fit is refused exactly as it would be there. For N GPUs the step is compiled
for N simulated CPU devices with the same mesh and shardings: the parameter and optimizer-state
figures are exact, the activation figure is the CPU compiler's and only an estimate.

A step that does not fit comes with a suggestion: the least disruptive overrides (FSDP,
rematerialization, more micro-batches, then a smaller batch) under which it compiles and fits.
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
from parscale_jax.config import Config, load_config, to_dict
from parscale_jax.errors import ConfigError
from parscale_jax.growth import Ramp, Schedule, describe
from parscale_jax.layout import Layout
from parscale_jax.model import abstract_params, partition_trainable
from parscale_jax.training.step import Trainer, shardings_of

GIB = 1024**3
# How a report on simulated GPUs qualifies its verdicts.
ESTIMATED = "estimated: activations from the CPU compiler"

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
    report is the largest stage's, with every stage's total and whether all of them fit. When the
    step does not fit, `report["suggestion"]` says which overrides make it fit (see `suggest`)."""
    report = _plan_stages(config, target) if config.train.growth else _plan_phase(config, target, None)
    if not report["fits"]:
        report["suggestion"] = suggest(config, target, report)
    return report


def _plan_stages(config: Config, target: Target) -> dict[str, Any]:
    stages = []
    for step in [0, *(stage.step for stage in config.train.growth)]:
        plain, ramp = _stage(config, step)
        report = _plan_phase(plain, target, ramp)
        stages.append({"from_step": step, "model": describe(plain.model), "report": report})
    largest = max(stages, key=lambda stage: stage["report"].get("total_bytes", math.inf))
    return {**largest["report"], "fits": all(stage["report"]["fits"] for stage in stages),
            "largest_from_step": largest["from_step"],
            "stages": [{"from_step": stage["from_step"], "model": stage["model"],
                        "total_bytes": stage["report"].get("total_bytes"), "fits": stage["report"]["fits"]}
                       for stage in stages]}


def _stage(config: Config, step: int) -> tuple[Config, Ramp | None]:
    """The config of the model a growth run trains from `step` on (without the growth schedule), and
    the ramp that step is in (None outside one)."""
    phase = Schedule(config).phase(step)
    plain = dataclasses.replace(config, model=phase.model, train=dataclasses.replace(config.train, growth=()))
    return plain, phase.ramp


def _step_inputs(config: Config, target: Target) -> tuple[Layout, Trainer, dict, dict]:
    """The layout on the target's devices, the trainer, and the abstract sharded train state and
    frozen parameters the step takes."""
    layout = Layout.create(config, list(target.devices))
    trainer = Trainer.of(config)
    state = trainer.abstract_state(layout)
    frozen = layout.on_mesh(partition_trainable(abstract_params(config.model), config.model, config.train.trainable)[1])
    return layout, trainer, state, frozen


def _sizes(config: Config, target: Target, layout: Layout, state: dict, frozen: dict) -> dict[str, Any]:
    """The part of a report known without compiling: mesh, rows, and the exact bytes of the
    parameters and optimizer state each device holds."""
    B = config.train.batch_size
    return {
        "target": target.name, "devices": len(target.devices), "exact": target.exact,
        "mesh": dict(layout.mesh.shape), "fsdp": config.mesh.fsdp,
        "rows_per_device": B // layout.mesh.shape["data"], "seq_len": config.data.seq_len,
        "micro_batch_rows_per_device": B // config.train.grad_accum // layout.mesh.shape["data"],
        "parameters": sum(math.prod(x.shape) for x in jax.tree.leaves((state["params"], frozen))),
        "params_bytes": _bytes_per_device(state["params"]) + _bytes_per_device(frozen),
        "opt_state_bytes": _bytes_per_device(state["opt_state"]),
        "memory_per_device_bytes": int(target.memory_per_device),
    }


def _plan_phase(config: Config, target: Target, ramp: Ramp | None) -> dict[str, Any]:
    layout, trainer, state, frozen = _step_inputs(config, target)
    batch = {key: jax.ShapeDtypeStruct((config.train.batch_size, config.data.seq_len), jnp.int32,
                                       sharding=layout.batch_sharding())
             for key in ROW_KEYS}
    halted = jax.ShapeDtypeStruct((), jnp.bool_, sharding=layout.replicated())
    report = _sizes(config, target, layout, state, frozen)
    started = time.perf_counter()
    with jax.set_mesh(layout.mesh):
        try:
            step = trainer.train_step(layout, shardings_of(state), shardings_of(frozen), ramp)
            compiled = step.lower(state, frozen, batch, halted).compile()
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


# ---------------------------------------------------------------------------------------------
# What would fit

# Candidates a suggestion compiles at most: the step of a large model takes minutes to compile.
MAX_SUGGESTION_COMPILES = 4


def suggest(config: Config, target: Target, report: dict[str, Any]) -> dict[str, Any]:
    """Overrides under which the step of `config`, too large as `report` says, fits `target`.

    Each candidate adds one change to the one before (`_candidates`). Its total is estimated from the
    last compiled figures; one estimated to fit is compiled, up to MAX_SUGGESTION_COMPILES of them, and
    the first that fits is the suggestion. A growth run is checked on its largest stage. Returns
    {"overrides", "total_bytes" (compiled), "fits", "tried": [{"overrides", "estimated_bytes", and
    once compiled "total_bytes", "fits"}], and when none fits "untried": candidates left}."""
    step = report.get("largest_from_step", 0)
    base_config, base = _stage(config, step)[0], report
    candidates = _candidates(config, report["mesh"]["data"])
    tried: list[dict[str, Any]] = []
    for overrides, candidate in candidates:
        if sum("fits" in attempt for attempt in tried) == MAX_SUGGESTION_COMPILES:
            break
        stage, ramp = _stage(candidate, step)
        layout, _, state, frozen = _step_inputs(stage, target)
        sizes = _sizes(stage, target, layout, state, frozen)
        attempt = {"overrides": overrides, "estimated_bytes": _estimate(stage, sizes, base_config, base)}
        tried.append(attempt)
        if attempt["estimated_bytes"] > target.memory_per_device:
            continue
        compiled = _plan_phase(stage, target, ramp)
        attempt.update(total_bytes=compiled.get("total_bytes"), fits=compiled["fits"])
        if compiled["fits"]:
            return {"overrides": overrides, "total_bytes": compiled["total_bytes"], "fits": True, "tried": tried}
        base_config, base = stage, compiled
    return {"overrides": [], "total_bytes": None, "fits": False, "tried": tried,
            "untried": len(candidates) - len(tried)}  # left when the compiles ran out


def _candidates(config: Config, data_devices: int) -> list[tuple[list[str], Config]]:
    """(overrides, config) of each valid candidate, each adding one of `_changes` to the one before. A
    change that makes the config invalid (e.g. FSDP over a data axis that a parameter's dimension does
    not divide) is left out."""
    chosen: dict[str, Any] = {}
    candidates = []
    for key, value in _changes(config, data_devices):
        overrides = [f"{name}={setting}" for name, setting in {**chosen, key: value}.items()]
        try:
            candidate = load_config(base=to_dict(config), overrides=overrides)
        except ConfigError:
            continue
        chosen[key] = value
        candidates.append((overrides, candidate))
    return candidates


def _changes(config: Config, data_devices: int) -> list[tuple[str, Any]]:
    """(key, value) of the changes to try, least disruptive first: FSDP and rematerialization cost
    only communication and compute; more micro-batches keep the batch, so the training is the same; a
    smaller batch changes the training."""
    changes: list[tuple[str, Any]] = []
    if data_devices > 1 and not config.mesh.fsdp:
        changes.append(("mesh.fsdp", "true"))
    if config.model.remat != "full":  # "full" keeps only each layer's input: less than any other policy
        changes.append(("model.remat", "full"))
    batch, accum = config.train.batch_size, config.train.grad_accum
    while batch // accum % (2 * data_devices) == 0:  # halved micro-batches keep >= 1 row per data device
        accum *= 2
        changes.append(("train.grad_accum", accum))
    rows = batch // accum // data_devices  # of a micro-batch on one data device: 1 or odd by now
    while rows > 1:
        rows //= 2
        changes.append(("train.batch_size", rows * accum * data_devices))
    return changes


def _estimate(candidate: Config, sizes: dict[str, Any], base_config: Config, base: dict[str, Any]) -> float:
    """A candidate's rough total per device: its exact parameter and optimizer bytes (`sizes`), plus the
    `base` report's workspace, whose parameter-sized buffers follow the parameters' sharding and whose
    activations follow the micro-batch rows (remat=full keeps about one layer's in num_layers)."""
    workspace = _workspace_bytes(base)
    # The gradients and the optimizer update's temporaries: about three parameter-sized buffers.
    buffers = min(workspace, 3 * base["params_bytes"])
    activations = ((workspace - buffers) * sizes["micro_batch_rows_per_device"]
                   / base["micro_batch_rows_per_device"])
    if candidate.model.remat == "full" and base_config.model.remat != "full":
        activations /= candidate.model.num_layers
    return (sizes["params_bytes"] + sizes["opt_state_bytes"] + activations
            + buffers * sizes["params_bytes"] / base["params_bytes"])


def _workspace_bytes(report: dict[str, Any]) -> float:
    """Bytes per device beyond the parameters and optimizer state: from the compiled total, or the
    temporaries the TPU compiler names when it refuses a program (0 if it names none)."""
    if "total_bytes" in report:
        return report["total_bytes"] - report["params_bytes"] - report["opt_state_bytes"]
    named = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", report.get("compiler", ""))
    return float(named[1]) * 1024 ** ("KMGT".index(named[2]) + 1) if named else 0.0


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
    estimated = "" if report["exact"] else f"{ESTIMATED}; "
    lines.append(f"{'FITS' if report['fits'] else 'DOES NOT FIT'} ({estimated}compiled in {report['compile_s']} s)")
    if "suggestion" in report:
        lines.append(_format_suggestion(report))
    if "stages" in report:
        lines += ["", "growth stages (train.growth; the largest is shown above)"]
        too_large = "  DOES NOT FIT" if report["exact"] else "  DOES NOT FIT (estimated)"
        for stage in report["stages"]:
            total = "does not compile" if stage["total_bytes"] is None else f"{stage['total_bytes'] / GIB:7.2f} GiB"
            lines.append(f"  from step {stage['from_step']:<8} {stage['model']}: {total}"
                         f"{'' if stage['fits'] else too_large}")
    return "\n".join(lines)


def _format_suggestion(report: dict[str, Any]) -> str:
    """One line: the overrides that make the step fit, or what was tried in vain."""
    suggestion = report["suggestion"]
    if not suggestion["tried"]:
        return "nothing fits: no change of mesh.fsdp, model.remat, train.grad_accum or train.batch_size is left to try"
    usable = f"GiB per device of {report['memory_per_device_bytes'] / GIB:.2f}"
    compiled = "compiled on the largest growth stage" if "stages" in report else "compiled"
    caveat = "" if report["exact"] else f"; {ESTIMATED}"
    if suggestion["fits"]:
        return (f"fits with: {' '.join(suggestion['overrides'])} "
                f"({compiled}: {suggestion['total_bytes'] / GIB:.2f} {usable}{caveat})")
    last = suggestion["tried"][-1]
    if "fits" not in last:
        needs = f"estimated: {last['estimated_bytes'] / GIB:.2f} {usable}"
    elif last["total_bytes"] is None:
        needs = "refused by the compiler"
    else:
        needs = f"{compiled}: {last['total_bytes'] / GIB:.2f} {usable}{caveat}"
    if suggestion["untried"]:
        return (f"no fit found in {MAX_SUGGESTION_COMPILES} compiles; the last tried: {' '.join(last['overrides'])} "
                f"({needs}); {suggestion['untried']} more candidates not tried")
    return f"nothing fits, not even with {' '.join(last['overrides'])} ({needs})"
