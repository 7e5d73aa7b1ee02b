"""A run directory: its config and the checks on it, its starting weights and where they came from,
and restoring it. Everything that makes or reads a run goes through `Run`: train, eval, generate,
import, export, sweep, and the transforms that make new runs from old weights.

    RUN/
      config.yaml     the config the run was started (or last continued) with
      lineage.json    what the run was made from: a fresh init, an imported checkpoint, another run
      initial/        starting weights when the run was made from existing ones: backbone/, and
                      parscale_p<P>/ for a stream set that came with them
      checkpoints/    Orbax step checkpoints (checkpoints_p<P>/, one per stream set, in a PEFT run)
      metrics.jsonl, tensorboard/, eval_step<N>.json

A run made from existing weights (an import, an up-scaled run; any transform) can be evaluated,
sampled and exported before it has trained a step: its step 0 is its starting weights.

Transforms read their starting points with `read_source` (a run at a settled checkpoint, or a
Hugging Face checkpoint directory), check that several agree in shape with `check_same_shapes`, and
write what they make with `Run.create`, whose lineage names every parent.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml
from flax.nnx.traversals import flatten_mapping

from parscale_jax.checkpoint import Checkpointer, complete_steps, restore_params, save_params
from parscale_jax.config import (Config, DataConfig, config_differences, from_dict, load_config, read_yaml,
                                 require_trainable, to_dict)
from parscale_jax.errors import ConfigError
from parscale_jax.files import write_atomic
from parscale_jax.growth import Schedule
from parscale_jax.interop import hf
from parscale_jax.layout import Layout
from parscale_jax.model import abstract_params, init_params, merge_params, partition_trainable, split_params
from parscale_jax.model.config import ModelConfig
from parscale_jax.recycle import new_stream_set

# Where the run is laid out, saved and reported: a resumed run computes the same either way.
FREE_TO_CHANGE = ("mesh.", "checkpoint.", "train.log_every", "train.eval_every", "train.eval_batches", "train.eval_tasks")


def check_new(directory: Path) -> None:
    """Refuse to make a run where one exists already."""
    if (directory / "config.yaml").exists() or (directory / "initial").exists():
        raise ConfigError("--out", f"{directory} is already a run directory; make a new one")


def initial_weights(layout: Layout, params: dict, cfg, dtype) -> dict[str, dict]:
    """`Run.create`'s `initial` from every parameter of a model of `cfg`: the backbone, and its
    stream set when P > 1, placed on `layout` in `dtype`."""
    parscale, backbone = split_params(params, cfg)
    initial = {"backbone": layout.place(backbone, dtype)}
    if cfg.parscale_n > 1:
        initial[f"parscale_p{cfg.parscale_n}"] = layout.place(parscale, dtype)
    return initial


def fresh_params(config: Config, layout: Layout) -> dict:
    """Every parameter of the run's model freshly initialized (seeded by train.seed) on `layout`."""
    cfg = config.model
    return jax.jit(lambda: init_params(cfg, config.train.seed),
                   out_shardings=layout.param_shardings(abstract_params(cfg)))()


@dataclasses.dataclass(frozen=True)
class Run:
    directory: Path
    config: Config

    @classmethod
    def open(cls, directory: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Run:
        """An existing run, under `overrides` (e.g. model.parscale_n to pick a stream set)."""
        directory = Path(directory)
        saved = directory / "config.yaml"
        if not saved.is_file():
            raise ConfigError("--run-dir", f"{directory} holds no config.yaml; is it a training run directory?")
        return cls(directory, load_config(base=read_yaml(saved), overrides=list(overrides)))

    @classmethod
    def create(cls, directory: str | Path, config: Config, initial: dict[str, dict], made_from: str,
               parents: Sequence[dict[str, Any]], files: Mapping[str, str] | None = None, **details: Any) -> Run:
        """A new run that starts from existing weights: `initial` maps "backbone" (and
        "parscale_p<P>" for a stream set) to parameter trees on the mesh. Its lineage says how it was
        made (`made_from`: the transform, with its `details`) and from what: `parents`, each a
        `Source.parent` (several for a merge). Training it, or evaluating it at step 0, starts from
        these weights. `files` (name: text) are written into the run first, e.g. a tokenizer its
        config names."""
        run = cls(Path(directory), config)
        check_new(run.directory)
        run.directory.mkdir(parents=True, exist_ok=True)
        for name, text in (files or {}).items():
            write_atomic(run.directory / name, text)
        for name, params in initial.items():
            save_params(run.initial_dir / name, params)
        run.save_config()
        run._write_lineage({"made_from": made_from, "parents": list(parents), **details})
        return run

    # -- where things are

    @property
    def checkpoint_dir(self) -> Path:
        """Where the step checkpoints go. A PEFT run keeps one folder per P, every one of them sharing
        the starting backbone: several prefix+aggregator sets on one frozen model (dynamic P)."""
        if self.config.train.trainable == "parscale":
            return self.directory / f"checkpoints_p{self.config.model.parscale_n}"
        return self.directory / "checkpoints"

    @property
    def initial_dir(self) -> Path:
        return self.directory / "initial"  # see check_new

    def checkpointer(self) -> Checkpointer:
        return Checkpointer(self.checkpoint_dir, self.config.checkpoint)

    # -- shape (a run with `train.growth` changes it at each stage; growth.py)

    def model_at(self, step: int) -> ModelConfig:
        """The model whose parameters the checkpoint of `step` holds."""
        return Schedule(self.config).model_at(step)

    def settled(self, step: int | None, what: str) -> Run:
        """This run as a plain model of the shape of `step`'s checkpoint (default: the newest), for
        `what` (eval, generate, export) to read; a run without `train.growth` is that already."""
        if not self.config.train.growth:
            return self
        chosen = step is not None
        if step is None:
            step = max(complete_steps(self.checkpoint_dir), default=0)
        return Run(self.directory, self.settled_config(step, what, chosen))

    def settled_config(self, step: int, what: str, chosen: bool = True) -> Config:
        """The run's config with the model of `step`'s checkpoint, as a plain model (no growth left to
        do), for reading it: refused for a step inside a growth ramp, whose masks are not all 1
        (`chosen`: the step was asked for, else it is the newest)."""
        model = Schedule(self.config).require_settled(step, what, complete_steps(self.checkpoint_dir), chosen)
        return dataclasses.replace(self.config, model=model,
                                   train=dataclasses.replace(self.config.train, growth=()))

    # -- config and lineage

    def save_config(self) -> None:
        if jax.process_index() != 0:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomic(self.directory / "config.yaml", yaml.safe_dump(to_dict(self.config), sort_keys=False))

    def lineage(self) -> dict[str, Any] | None:
        path = self.directory / "lineage.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def record_fresh_start(self) -> None:
        """A run that starts from random weights says so, unless it already says where it came from."""
        if self.lineage() is None:
            self._write_lineage({"made_from": "init", "parents": [], "seed": self.config.train.seed})

    def _write_lineage(self, lineage: dict[str, Any]) -> None:
        if jax.process_index() != 0:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {**lineage, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_atomic(self.directory / "lineage.json", json.dumps(record, indent=2) + "\n")

    def config_changes(self) -> tuple[dict[str, tuple[Any, Any]], bool]:
        """({dotted key: (old, new)} where this config differs in what the run computes from the
        config the run started with, whether the parameters' shapes differ too). Nothing differs
        before the run's first checkpoint: until then (e.g. just after an import) the saved config is
        only a starting point."""
        saved = self.directory / "config.yaml"
        if not saved.is_file() or not complete_steps(self.checkpoint_dir):
            return {}, False
        old_config = from_dict(read_yaml(saved))
        differ = {key: change for key, change in config_differences(to_dict(old_config), to_dict(self.config)).items()
                  if not key.startswith(FREE_TO_CHANGE)}
        old_model = old_config.model
        if self.config.train.trainable == "parscale":  # each P of a PEFT run is its own stream set
            differ.pop("model.parscale_n", None)
            old_model = dataclasses.replace(old_model, parscale_n=self.config.model.parscale_n)
        model_changed = any(key.startswith("model.") for key in differ)
        return differ, model_changed and _param_shapes(old_model) != _param_shapes(self.config.model)

    def check_config(self, override: bool) -> None:
        """May this run train under its config? Something must train (`require_trainable`), and
        resuming under other settings than the run was started with needs `override`; the model's
        shape can never change (its checkpoints would not fit)."""
        require_trainable(self.config)
        differ, reshaped = self.config_changes()
        changes = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in differ.items())
        if reshaped:
            raise ConfigError(next(k for k in differ if k.startswith("model.")), f"{self.directory} holds a model of "
                              f"another shape ({changes}); its checkpoints cannot take the new one: train in a new "
                              "--run-dir")
        if differ and not override:
            raise ConfigError(next(iter(differ)), f"{self.directory} was started with other settings ({changes}); "
                              "pass --override-config to continue it with the new ones")

    # -- weights

    def start_weights(self, layout: Layout, fresh: bool = True) -> tuple[dict | None, dict]:
        """(trained, frozen) parameters a session starts from, on their shardings.

        `fresh`: those of step 0: the starting weights in `initial/` where the run has them, fresh
        ones (seeded by train.seed) for the rest, e.g. the new aggregator when P was raised on a
        P = 1 checkpoint, whose new prefixes are the backbone's own keys and values of contexts
        from the run's data where those keep its function better (recycle.py). Else (None,
        frozen): the trained ones come from a checkpoint, the frozen backbone of a PEFT run from
        `initial/` (it is never checkpointed).
        """
        cfg, backbone_dir = self.config.model, self.initial_dir / "backbone"
        peft, stream_set = self.config.train.trainable == "parscale", self.initial_dir / f"parscale_p{cfg.parscale_n}"
        if peft and not backbone_dir.exists():
            raise ConfigError("train.trainable", "'parscale' trains new streams on a pretrained backbone, and "
                              f"{self.directory} has none: start from `parscale-jax import --hf DIR --out "
                              f"{self.directory}`")
        parscale, backbone = split_params(fresh_params(self.config, layout) if fresh else abstract_params(cfg), cfg)
        if backbone_dir.exists() and (fresh or peft):
            backbone = restore_params(backbone_dir, layout.on_mesh(backbone))
        if not fresh:
            return None, backbone if peft else {}
        if stream_set.exists():
            parscale = restore_params(stream_set, layout.on_mesh(parscale))
        elif cfg.parscale_n > 1 and backbone_dir.exists():
            parscale = new_stream_set(parscale, backbone, self.config)
        return partition_trainable(merge_params(backbone, parscale), cfg, self.config.train.trainable)

    def params(self, layout: Layout, step: int | None = None) -> tuple[dict, int]:
        """(all parameters on `layout`, their step): the newest checkpoint, or `step`'s. A run made
        from existing weights that has no checkpoint yet gives its starting weights, as step 0."""
        steps = complete_steps(self.checkpoint_dir)
        if (step == 0 or (step is None and not steps)) and (self.initial_dir / "backbone").exists():
            return merge_params(*self.start_weights(layout)), 0
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.checkpoint_dir}")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.checkpoint_dir} (it has {steps})")
        model = self.settled_config(step, "reading its weights").model
        layout = layout.for_model(model)
        trained, _ = partition_trainable(abstract_params(model), model, self.config.train.trainable)
        checkpointer = self.checkpointer()
        try:  # only the parameters: the optimizer state stays on disk
            params = checkpointer.restore_part(step, {"params": layout.on_mesh(trained)})["params"]
        finally:
            checkpointer.close()
        return merge_params(self.start_weights(layout, fresh=False)[1], params), step


def _param_shapes(cfg) -> dict:
    return jax.tree.map(lambda x: x.shape, abstract_params(cfg))


# ---------------------------------------------------------------------------------------------
# The starting points of transforms, and what they write


@dataclasses.dataclass(frozen=True)
class Source:
    """A model a transform starts from: its run config, its parameters (numpy, on the host) and the
    lineage entry that names it as a parent."""

    config: Config
    params: dict
    parent: dict[str, Any]


# What a checkpoint fixes; overrides may change the rest (P, T, ε, dtypes, remat, a MoE's capacity
# and dispatch).
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                       "num_kv_heads", "head_dim", "rope_theta", "rms_norm_eps", "qkv_bias", "qk_norm",
                       "tie_embeddings", "ffn", "num_experts", "experts_per_token", "moe_intermediate_size",
                       "moe_renormalize", "moe_shared_expert_size", "moe_every")


def hf_run_config(directory: Path, overrides: Sequence[str] = (), base: dict[str, Any] | None = None) -> Config:
    """The config of a run made from a Hugging Face checkpoint directory (see `checkpoint_run_config`)."""
    tokenizer = directory / "tokenizer.json"
    return checkpoint_run_config(hf.read_hf_config(directory), tokenizer if tokenizer.is_file() else None,
                                 overrides, base)


def checkpoint_run_config(checkpoint: ModelConfig, tokenizer: Path | None, overrides: Sequence[str] = (),
                          base: dict[str, Any] | None = None) -> Config:
    """The config of a run made from a checkpoint: its shape under `base` (defaults for data and
    training), its tokenizer, then the overrides, which may not change the architecture."""
    values = dict(base or {})
    values["model"] = {**values.get("model", {}), **dataclasses.asdict(checkpoint)}
    data = values["data"] = dict(values.get("data", {}))
    if tokenizer is not None:
        data["tokenizer"] = str(tokenizer.absolute())
    # Rows no longer than the model's context, unless asked otherwise.
    data.setdefault("seq_len", min(DataConfig().seq_len, checkpoint.max_position_embeddings))
    config = load_config(base=values, overrides=list(overrides))
    for name in ARCHITECTURE_FIELDS:
        if getattr(config.model, name) != getattr(checkpoint, name):
            raise ConfigError(f"model.{name}", f"is fixed by the checkpoint ({getattr(checkpoint, name)}); "
                              "only parscale_*, dtype, param_dtype, remat, init_std, "
                              "moe_capacity_factor and moe_impl can change")
    return config


def read_source(path: str | Path, what: str, key: str = "--from") -> Source:
    """A run directory at its newest checkpoint (refused inside a growth ramp: `what` says who
    asks), or a local Hugging Face checkpoint directory; `key` is the option that named it."""
    path = Path(path)
    if (path / "config.yaml").is_file():
        run = Run.open(path).settled(None, what)
        layout = Layout.create(run.config)
        with jax.set_mesh(layout.mesh):
            params, step = run.params(layout)
        parent = {"kind": "run", "path": str(path.absolute()), "step": step, "lineage": run.lineage()}
        return Source(run.config, jax.tree.map(np.asarray, params), parent)
    if (path / "config.json").is_file():
        _, params = hf.read_hf_checkpoint(path)
        return Source(hf_run_config(path), params, {"kind": "huggingface", "path": str(path.absolute())})
    raise ConfigError(key, f"{path} is neither a run directory (config.yaml) nor a Hugging Face "
                      "checkpoint (config.json)")


def check_same_shapes(models: Mapping[str, ModelConfig], key: str) -> None:
    """Every model has the same parameters with the same shapes; else a ConfigError (naming `key`)
    that names the first difference."""
    (first, reference), *others = models.items()
    expected = {"/".join(path): x.shape for path, x in flatten_mapping(abstract_params(reference)).items()}
    for name, model in others:
        shapes = {"/".join(path): x.shape for path, x in flatten_mapping(abstract_params(model)).items()}
        for param in sorted(set(expected) | set(shapes)):
            if param not in shapes or param not in expected:
                has, lacks = (first, name) if param in expected else (name, first)
                raise ConfigError(key, f"{has} has parameter {param}, which {lacks} lacks")
            if shapes[param] != expected[param]:
                raise ConfigError(key, f"parameter {param} is {list(expected[param])} in {first} but "
                                  f"{list(shapes[param])} in {name}")


def export_hf(run: Run, out_dir: str | Path, step: int | None = None, dtype: str | None = None,
              max_shard_bytes: int = 5 * 1024**3, overwrite: bool = False) -> dict[str, Any]:
    """Write a run's parameters (latest checkpoint, or `step`; its starting weights if it has not
    trained yet) as a Hugging Face checkpoint."""
    run = run.settled(step, "export")
    config = run.config
    dtype = dtype or config.model.param_dtype
    if dtype not in hf.EXPORT_DTYPES:
        raise ConfigError("--dtype", f"must be one of {tuple(hf.EXPORT_DTYPES)}, got '{dtype}'")
    hf.prepare_output_dir(out_dir, overwrite)  # fail before reading anything
    layout = Layout.one_device(config.model)  # enough to hold what is written out tensor by tensor
    with jax.set_mesh(layout.mesh):
        params, step = run.params(layout, step)
    out = hf.write_hf_checkpoint(out_dir, params, config.model, config.data.tokenizer, dtype,
                                 max_shard_bytes, overwrite)
    return {"out": str(out), "step": step, "streams": config.model.parscale_n, "dtype": dtype,
            "files": sorted(p.name for p in out.iterdir())}
