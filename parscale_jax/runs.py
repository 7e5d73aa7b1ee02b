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

A run made from existing weights (an import today; upscaling, growth, branches, merges) can be
evaluated, sampled and exported before it has trained a step: its step 0 is its starting weights.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import yaml

from parscale_jax.checkpoint import Checkpointer, complete_steps, restore_params, save_params
from parscale_jax.config import Config, config_differences, from_dict, load_config, read_yaml, to_dict
from parscale_jax.errors import ConfigError
from parscale_jax.errors import CheckpointError
from parscale_jax.files import write_atomic
from parscale_jax.layout import Layout, with_shardings
from parscale_jax.growth import Schedule
from parscale_jax.model import abstract_params, init_params, merge_params, split_params
from parscale_jax.model.config import ModelConfig

# Where the run is laid out, saved and reported: a resumed run computes the same either way.
FREE_TO_CHANGE = ("mesh.", "checkpoint.", "train.log_every", "train.eval_every", "train.eval_batches")


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


def partition_trainable(params: dict, config: Config) -> tuple[dict, dict]:
    """(trained, frozen) parameters: with `train.trainable=parscale` only the prefixes and the
    aggregator train and the backbone is frozen; otherwise everything trains."""
    if config.train.trainable == "parscale":
        return split_params(params, config.model)
    return params, {}


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
    def create(cls, directory: str | Path, config: Config, lineage: dict[str, Any],
               initial: dict[str, dict] | None = None) -> Run:
        """A new run that starts from existing weights: `initial` maps "backbone" (and
        "parscale_p<P>" for a stream set) to parameter trees on the mesh; `lineage` says where they
        came from. Training it, or evaluating it at step 0, starts from these weights."""
        run = cls(Path(directory), config)
        check_new(run.directory)
        for name, params in (initial or {}).items():
            save_params(run.initial_dir / name, params)
        run.save_config()
        run._write_lineage(lineage)
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
        if step is None:
            step = max(complete_steps(self.checkpoint_dir), default=0)
        return Run(self.directory, self.settled_config(step, what))

    def settled_config(self, step: int, what: str) -> Config:
        """The run's config with the model of `step`'s checkpoint, as a plain model (no growth left to
        do), for reading it: refused for a step inside a growth ramp, whose masks are not all 1."""
        model = Schedule(self.config).require_settled(step, what)
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
            self._write_lineage({"made_from": "init", "seed": self.config.train.seed})

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
        """Resuming under other settings than the run was started with needs `override`; the model's
        shape can never change (its checkpoints would not fit)."""
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

    def start_params(self, layout: Layout) -> tuple[dict, dict]:
        """(trained, frozen) parameters of the run's step 0, on their shardings.

        The starting weights in `initial/` where the run has them; fresh ones (seeded by train.seed)
        for the rest, e.g. the new prefixes and aggregator when P was raised on a P = 1 checkpoint.
        """
        cfg, seed = self.config.model, self.config.train.seed
        params = jax.jit(lambda: init_params(cfg, seed), out_shardings=layout.param_shardings(abstract_params(cfg)))()
        parscale, backbone = split_params(params, cfg)
        if (self.initial_dir / "backbone").exists():
            backbone = restore_params(self.initial_dir / "backbone", layout.on_mesh(backbone))
            if (self.initial_dir / f"parscale_p{cfg.parscale_n}").exists():
                parscale = restore_params(self.initial_dir / f"parscale_p{cfg.parscale_n}", layout.on_mesh(parscale))
        elif self.config.train.trainable == "parscale":
            raise ConfigError("train.trainable", "'parscale' trains new streams on a pretrained backbone, and "
                              f"{self.directory} has none: start from `parscale-jax import --hf DIR --out "
                              f"{self.directory}`")
        return partition_trainable(merge_params(backbone, parscale), self.config)

    def frozen_params(self, layout: Layout) -> dict:
        """The parameters a run does not train, read again on every start: they are never checkpointed."""
        if self.config.train.trainable != "parscale":
            return {}
        _, backbone = split_params(abstract_params(self.config.model), self.config.model)
        return restore_params(self.initial_dir / "backbone", layout.on_mesh(backbone))

    def params(self, layout: Layout, step: int | None = None) -> tuple[dict, int]:
        """(all parameters on `layout`, their step): the newest checkpoint, or `step`'s. A run made
        from existing weights that has no checkpoint yet gives its starting weights, as step 0."""
        steps = complete_steps(self.checkpoint_dir)
        if (step == 0 or (step is None and not steps)) and (self.initial_dir / "backbone").exists():
            return merge_params(*self.start_params(layout)), 0
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.checkpoint_dir}")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.checkpoint_dir} (it has {steps})")
        model = self.settled_config(step, "reading its weights").model
        layout = layout.for_model(model)
        trained, _ = partition_trainable(abstract_params(model), self.config)
        checkpointer = self.checkpointer()
        try:  # only the parameters: the optimizer state stays on disk
            params = checkpointer.restore_part(step, {"params": layout.on_mesh(trained)})["params"]
        finally:
            checkpointer.close()
        return merge_params(self.frozen_params(layout), params), step

    def resume(self, layout: Layout, checkpointer: Checkpointer, state_fn: Callable[[ModelConfig], Callable],
               train_iter, fallback: bool) -> tuple[int, dict, dict]:
        """(step, train state, frozen parameters) to start from: the newest checkpoint, with `train_iter`
        moved to its position, or step 0. `state_fn(model)` gives the function that makes a train
        state of that model from its parameters. With `fallback`, a damaged checkpoint is set aside
        and the one before it is tried."""
        step = checkpointer.latest_step()
        if step is None:
            trained, frozen = self.start_params(layout)
            create_state = state_fn(self.config.model)
            state_shardings = layout.state_shardings(jax.eval_shape(create_state, trained))
            return 0, jax.jit(create_state, out_shardings=state_shardings)(trained), frozen
        frozen = self.frozen_params(layout)
        while True:
            model = self.model_at(step)
            abstract_state = jax.eval_shape(state_fn(model), partition_trainable(abstract_params(model),
                                                                                 self.config)[0])
            abstract_state = with_shardings(abstract_state, layout.for_model(model).state_shardings(abstract_state))
            try:
                return step, checkpointer.restore(step, abstract_state, train_iter), frozen
            except CheckpointError as err:
                if not fallback:
                    raise
                moved = checkpointer.set_aside(step)
                print(f"{err}\n  moved to {moved}; trying the previous checkpoint", file=sys.stderr, flush=True)
                step = checkpointer.latest_step()
                if step is None:
                    raise CheckpointError(f"no good checkpoint is left in {checkpointer.directory}; the damaged "
                                          f"ones are in {moved.parent}") from None


def _param_shapes(cfg) -> dict:
    return jax.tree.map(lambda x: x.shape, abstract_params(cfg))
