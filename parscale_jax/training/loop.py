"""The training loop: resume, step, log, evaluate, checkpoint, and grow the model where the config
says (`train.growth`). The step itself and the train state are step.py's; where a run starts from
(its config checks, starting weights and checkpoints) is runs.py's.

The loop keeps `STEPS_IN_FLIGHT` steps dispatched ahead of the one whose non-finite flags it reads;
under `train.on_nonfinite=stop` the device-side `halted` flag makes every step after a bad one leave
the state alone, so the last good state is still exact.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from parscale_jax.checkpoint import Checkpointer
from parscale_jax.config import Config, to_dict
from parscale_jax.data import pipeline
from parscale_jax.evaluate import held_out_loss
from parscale_jax.errors import ConfigError, NonFiniteError
from parscale_jax.growth import Phase, Schedule, StepPlan, describe
from parscale_jax.layout import Layout
from parscale_jax.model import merge_params
from parscale_jax.runs import Run
from parscale_jax.training.logger import MetricsLogger
from parscale_jax.training.preemption import StopRequests
from parscale_jax.training.step import Trainer, resume

STEPS_IN_FLIGHT = 2  # dispatched steps whose flags the host has not read yet
FLAGS = ("loss_finite", "grads_finite", "halted")  # step metrics the loop acts on rather than logs


def train(config: Config, run_dir: str | Path, progress: bool = True, stop_at: int | None = None,
          fallback: bool = False, override_config: bool = False) -> dict[str, Any]:
    """Train (or resume) the run in `run_dir`; returns the last logged metrics, with "stopped_by"
    naming the signal if SIGTERM or SIGINT ended it early (checkpointed).

    `stop_at` ends the session early at that step, checkpointed, for time-sliced jobs; running
    again continues exactly as if it had never stopped. `fallback` resumes from the newest good
    checkpoint when the newest is damaged; `override_config` continues a run under changed settings.
    """
    if stop_at is not None and stop_at < 1:
        raise ConfigError("--stop-at", f"must be a step >= 1, got {stop_at}")
    run = Run(Path(run_dir), config)
    run.check_config(override_config)
    layout = Layout.create(config)  # checks the mesh against the devices before anything compiles
    tasks = periodic_tasks(run) if config.train.eval_tasks else None  # and the tasks' names
    if jax.process_index() == 0:
        print(f"run directory: {run.directory.absolute()}", flush=True)
    my_rows = layout.process_rows(config.train.batch_size)
    with jax.set_mesh(layout.mesh), StopRequests() as stop_requests:  # the mesh: for the model's constraints
        train_iter, held_out = pipeline.datasets(config, my_rows)
        checkpointer = run.checkpointer()
        start, state, frozen = resume(run, layout, checkpointer, train_iter, fallback)
        run.save_config()
        if start == 0:
            run.record_fresh_start()
        loop = _Loop(run, layout, checkpointer, train_iter, held_out, stop_requests, progress, tasks)
        last = loop.train_steps(start, min(stop_at or config.train.steps, config.train.steps), state, frozen)
        loop.close()
        return last


def periodic_tasks(run: Run):
    """`train.eval_tasks` resolved before the first step (inference/harness.py, the optional `eval` extra)."""
    try:
        from parscale_jax.inference.harness import PeriodicTasks
    except ConfigError as err:  # the extra is missing
        raise ConfigError("train.eval_tasks", str(err).removeprefix(f"{err.key}: ")) from None
    return PeriodicTasks(run)


@dataclasses.dataclass
class _Stop(Exception):
    """A non-finite step under `train.on_nonfinite=stop`, found by reading the steps' flags."""

    step: int
    what: str
    position: Any  # the data position before it


class _Loop:
    """One session of the loop over a run's steps: the compiled steps of the current growth phase,
    the steps in flight, the logger and the progress bar."""

    def __init__(self, run: Run, layout: Layout, checkpointer: Checkpointer, train_iter, held_out: list[dict],
                 stop_requests, progress, tasks=None):
        self.run, self.config, self.layout, self.tasks = run, run.config, layout, tasks
        self.checkpointer, self.train_iter, self.held_out = checkpointer, train_iter, held_out
        self.stop_requests = stop_requests
        self.progress = progress
        self.schedule = Schedule(run.config)
        self.is_main = jax.process_index() == 0
        self.pending: collections.deque[tuple[int, dict, Any]] = collections.deque()  # dispatched, not yet read
        self.logger: MetricsLogger | None = None
        self.bar: tqdm | None = None

    def say(self, text: str) -> None:
        if self.is_main:
            (self.bar.write if self.bar else print)(text)

    def train_steps(self, start: int, end: int, state: dict, frozen: dict) -> dict[str, Any]:
        t = self.config.train
        if start >= t.steps:
            self.say(f"{self.run.directory} is complete: {start} of {t.steps} steps (train.steps); nothing to "
                     "train. Continue it with a larger train.steps and --override-config.")
            return {"step": start}
        if start >= end:
            self.say(f"{self.run.directory} is at step {start} already, at or past --stop-at {end}; nothing to train")
            return {"step": start}
        if start > 0:
            self.say(f"resuming at step {start} of {t.steps} from {self.checkpointer.directory}")
        self.logger = MetricsLogger(self.run.directory, enabled=self.is_main, resume_step=start)
        self.bar = tqdm(total=t.steps, initial=start, disable=not (self.progress and self.is_main), unit="step",
                        dynamic_ncols=True)
        self.state, self.frozen, self.model, self.phase = state, frozen, self.run.model_at(start), None
        self.halted = np.zeros((), bool)  # placed on the mesh by the step (replicated), like its output
        last: dict[str, Any] = {}
        # Throughput over the steps since the last log, without the time spent evaluating.
        self.window_start, self.window_tokens, self.window_eval_s = time.perf_counter(), 0, 0.0
        for step in range(start + 1, end + 1):
            record, stop_signal = self.one_step(step, end)
            if record:
                self.logger.log(record)
                last = {**last, **record}
            if stop_signal:
                return {**last, "step": step, "stopped_by": stop_signal}
        return last

    def one_step(self, step: int, end: int) -> tuple[dict[str, Any], str | None]:
        """Dispatch the update to `step`; log, evaluate and save where due: (what to log, a stop signal)."""
        t, plan = self.config.train, self.schedule.at(step)
        try:
            if plan.phase != self.phase:  # the first step, a growth stage, or the end of a ramp
                self.begin_phase(step, plan)
            # Where a stop on a non-finite step rewinds the data to.
            position = self.train_iter.get_state() if t.on_nonfinite == "stop" else None
            self.state, metrics = self.steps.train(self.state, self.frozen, next(self.train_iter), self.halted)
            self.halted = metrics["halted"]
            self.pending.append((step, metrics, position))
            self.window_tokens += t.batch_size * self.config.data.seq_len
            self.bar.update(1)
            logs = step % t.log_every == 0 or step == t.steps
            evaluates = t.eval_every and (step % t.eval_every == 0 or step == t.steps)
            scores_tasks = self.tasks and (step == t.steps or (t.eval_tasks_every and step % t.eval_tasks_every == 0))
            stop_signal = self.stop_requests.agreed()
            saves = step % self.config.checkpoint.every == 0 or step == end or stop_signal
            # The host reads each step's flags a few steps late, so that the device never waits for it;
            # everything is read before a step is logged, evaluated or saved.
            self.read_flags(0 if logs or evaluates or scores_tasks or saves else STEPS_IN_FLIGHT)
            record = self.logged(step, metrics, plan) if logs else {}
            if evaluates or scores_tasks:
                record.update(self.evaluated(step, plan, bool(evaluates), bool(scores_tasks)))
            if saves:
                self.checkpointer.save(step, self.state, self.train_iter, to_dict(self.config))
            return record, stop_signal
        except _Stop as stop:  # the steps after the bad one left the state alone (`halted`): save it, stop
            self.train_iter.set_state(stop.position)
            if stop.step - 1 not in self.checkpointer.all_steps():
                self.checkpointer.save(stop.step - 1, self.state, self.train_iter, to_dict(self.config))
            self.checkpointer.wait()
            raise NonFiniteError(f"step {stop.step}: non-finite {stop.what}; stopped (train.on_nonfinite=stop) "
                                 f"with the state of step {stop.step - 1} saved in {self.checkpointer.directory}")

    def begin_phase(self, step: int, plan: StepPlan) -> None:
        """Compile the steps of the phase the update to `step` runs in, growing the state first when
        the phase's model is larger."""
        self.read_flags(0)
        self.phase = plan.phase
        trainer = Trainer.of(self.config, self.phase.model)
        if self.phase.model != self.model:
            self.state = trainer.grow(self.layout, self.state, self.model, plan.seed)
            self.model = self.phase.model
            self.say(f"step {step - 1}: grew the model to {describe(self.model)}")
        self.steps = trainer.phase_steps(self.layout, self.state, self.frozen, self.phase.ramp)

    def read_flags(self, keep: int) -> None:
        """Read the flags of the dispatched steps until `keep` remain in flight."""
        while len(self.pending) > keep:
            self.check(*self.pending.popleft())

    def check(self, step: int, metrics: dict, position: Any) -> None:
        """Act on one finished step's flags: name a skipped update, or stop (`_Stop`, which `one_step`
        turns into the last good state saved and a NonFiniteError)."""
        loss_finite, grads_finite = jax.device_get((metrics["loss_finite"], metrics["grads_finite"]))
        if loss_finite and grads_finite:
            return
        what = "loss" if not loss_finite else "gradients"
        if self.config.train.on_nonfinite == "stop":
            raise _Stop(step, what, position)
        if self.is_main:
            self.bar.write(f"step {step}: non-finite {what}; update skipped "
                           f"({int(metrics['skipped_steps'])} skipped so far)", file=sys.stderr)

    def logged(self, step: int, metrics: dict, plan: StepPlan) -> dict[str, Any]:
        """The record of a logged step; restarts the throughput window."""
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items() if k not in FLAGS}
        tokens_per_s = self.window_tokens / (time.perf_counter() - self.window_start - self.window_eval_s)
        record = {"step": step, "loss": metrics["loss"], "lr": metrics["lr"], "grad_norm": metrics["grad_norm"],
                  "skipped_steps": int(metrics["skipped_steps"]), "tokens_per_s": tokens_per_s,
                  "tflops_per_s": tokens_per_s * plan.flops_per_token / 1e12, "flops": plan.flops,
                  **{k: v for k, v in metrics.items() if k.startswith(("aux/", "stat/"))}}
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}")
        self.window_start, self.window_tokens, self.window_eval_s = time.perf_counter(), 0, 0.0
        return record

    def evaluated(self, step: int, plan: StepPlan, loss: bool, tasks: bool) -> dict[str, Any]:
        """The held-out loss (`loss`) and the downstream tasks' scores (`tasks`) of the state after `step`
        updates; their time is left out of the throughput."""
        start = time.perf_counter()
        params = merge_params(self.frozen, self.state["params"])
        record = {"step": step, "flops": plan.flops}
        if loss:
            record["eval_loss"] = held_out_loss(self.steps.eval_step, params, self.held_out, self.layout,
                                                plan.eval_masks())
        if tasks:
            record.update(self.tasks.scores(step, params, self.layout, self.model, self.say))
        self.window_eval_s += time.perf_counter() - start
        return record

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.checkpointer.wait()
        self.checkpointer.close()
        if self.logger is not None:
            self.logger.close()
