"""Masked structural growth (MSG, Yao et al. 2024) as a schedule in the training config.

`train.growth` lists stages; after stage k's `step` steps the model takes that stage's sizes
(transforms/grow.py copies every old tensor into the leading block of the new one, and the Adam
moments with it), and the new parts are multiplied by masks that ramp from 0 to 1 over
`ramp_steps`: the model computes exactly the small model's function at the moment of growth,
whatever the new weights are. Once the ramp is over the masks are dropped.

Everything here is a pure function of the step, so a run killed mid-ramp resumes bitwise. Step
numbers count finished updates, as the train state's "step" does: the update that takes the state
from step k to k + 1 runs in `phase(k)`, and the checkpoint of step k holds a model of `model_at(k)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp

from parscale_jax.config import Config, GrowthStage, stage_models
from parscale_jax.errors import ConfigError
from parscale_jax.model.counting import train_flops_per_token
from parscale_jax.model import GrowthMasks
from parscale_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Ramp:
    """The masks of one stage while they ramp: the sizes before it (`old`) and after (`new`)."""

    start: int
    steps: int
    old: ModelConfig
    new: ModelConfig

    def value(self, step):
        """m: 0 at the stage's step, 1 once `steps` updates have passed (a traced step works too)."""
        return jnp.clip((jnp.asarray(step, jnp.float32) - self.start) / self.steps, 0.0, 1.0)

    def masks(self, step) -> GrowthMasks:
        """1 on every old hidden dimension, MLP neuron, head, layer and stream, m on the new ones;
        None where that size did not grow."""
        m = self.value(step)

        def live(name: str):
            old, new = getattr(self.old, name), getattr(self.new, name)
            return None if old == new else jnp.where(jnp.arange(new) < old, 1.0, m)

        return GrowthMasks(hidden_D=live("hidden_size"), mlp_F=live("intermediate_size"), heads_N=live("num_heads"),
                           depth=live("num_layers"), streams_P=live("parscale_n"))

    def settled_masks(self, step: int) -> GrowthMasks | None:
        """The masks of the state after `step` updates: None once the ramp is over (all are 1)."""
        return None if step >= self.start + self.steps else self.masks(step)


@dataclasses.dataclass(frozen=True)
class Phase:
    """What the update from a step runs: the model's shape, and the ramp when its masks are below 1."""

    model: ModelConfig
    ramp: Ramp | None


def describe(model: ModelConfig) -> str:
    """The sizes growth can change, in a line."""
    return (f"hidden {model.hidden_size}, MLP {model.intermediate_size}, {model.num_heads} heads "
            f"({model.num_kv_heads} kv), {model.num_layers} layers, P = {model.parscale_n}")


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What the update that makes step `step` needs of the schedule."""

    step: int
    phase: Phase  # the model and ramp it runs in
    seed: int | None  # of the new weights, where a stage begins with it
    flops_per_token: float  # training FLOPs of a token through the phase's model
    flops: float  # training FLOPs of the run once it is done

    def eval_masks(self) -> GrowthMasks | None:
        """The masks to evaluate the state it makes with: None when none is below 1."""
        return None if self.phase.ramp is None else self.phase.ramp.settled_masks(self.step)


class Schedule:
    """`train.growth` of a config, as functions of the step."""

    def __init__(self, config: Config):
        self.stages: tuple[GrowthStage, ...] = config.train.growth
        self.models = stage_models(config)  # [before any stage, after stage 0, ...]
        self.seed = config.train.seed
        self.tokens_per_step = config.train.batch_size * config.data.seq_len
        self.seq_len = config.data.seq_len

    def _stages_begun(self, step: int) -> int:
        """How many stages have begun by the update from `step`."""
        return sum(stage.step <= step for stage in self.stages)

    def phase(self, step: int) -> Phase:
        k = self._stages_begun(step)
        if k == 0:
            return Phase(self.models[0], None)
        stage = self.stages[k - 1]
        if step >= stage.step + stage.ramp_steps:
            return Phase(self.models[k], None)
        return Phase(self.models[k], Ramp(stage.step, stage.ramp_steps, self.models[k - 1], self.models[k]))

    def model_at(self, step: int) -> ModelConfig:
        """The shape of the state after `step` updates (a stage at `step` has not grown it yet)."""
        return self.models[0] if step == 0 else self.phase(step - 1).model

    def masks_at(self, step: int) -> GrowthMasks | None:
        """The masks to evaluate the state of `step` with: None when none is below 1."""
        ramp = None if step == 0 else self.phase(step - 1).ramp
        return None if ramp is None else ramp.settled_masks(step)

    def require_settled(self, step: int, what: str, checkpoints: Sequence[int] = (), chosen: bool = True
                        ) -> ModelConfig:
        """`model_at(step)`, or a ConfigError where the state of `step` still has masks below 1 that
        suggests one of `checkpoints` outside a ramp; `chosen`: the step was asked for with --step
        (else it is the newest checkpoint)."""
        if self.masks_at(step) is not None:
            end = self.phase(step - 1).ramp.start + self.phase(step - 1).ramp.steps
            outside = [s for s in checkpoints if self.masks_at(s) is None]
            which = f"step {step}" if chosen else f"the newest checkpoint, step {step},"
            instead = f"pass --step {max(outside)} (the newest checkpoint outside a ramp) or " if outside else ""
            raise ConfigError("--step" if chosen else "--run-dir",
                              f"{which} lies inside a growth ramp (train.growth, masks below 1 until step {end}), "
                              f"which {what} cannot take: {instead}train on to step {end} or later")
        return self.model_at(step)

    def seed_at(self, step: int) -> int:
        """The seed of the new weights of the stage that begins at `step`."""
        i, stage = next((i, stage) for i, stage in enumerate(self.stages) if stage.step == step)
        return self.seed + 1 + i if stage.seed is None else stage.seed

    def at(self, step: int) -> StepPlan:
        """The plan of the update from `step - 1` to `step`."""
        begins = any(stage.step == step - 1 for stage in self.stages)
        phase = self.phase(step - 1)
        return StepPlan(step, phase, self.seed_at(step - 1) if begins else None,
                        train_flops_per_token(phase.model, self.seq_len), self.flops(step))

    def flops(self, step: int) -> float:
        """Training FLOPs of the updates before `step`, each counted at its phase's model size."""
        bounds = [0, *(stage.step for stage in self.stages if stage.step < step), step]
        return sum((end - begin) * self.tokens_per_step * train_flops_per_token(model, self.seq_len)
                   for begin, end, model in zip(bounds, bounds[1:], self.models))
