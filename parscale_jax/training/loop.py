"""Training: the optimizer, the loss, the jitted train and eval steps, and the loop that logs,
evaluates and checkpoints. Where a run starts from and how it resumes is runs.py's job.

A batch is a dict of int32 `[B, S]` arrays from `data.py`: tokens, targets, segment_ids, positions,
loss_mask. The train state is a plain dict {step, params, opt_state, skipped_steps}; params are the
model's parameters as a nested dict, turned back into the NNX model inside the loss with `nnx.merge`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from parscale_jax import growth
from parscale_jax.data import pipeline as data
from parscale_jax.data.packing import Rows, take_rows
from parscale_jax.config import Config, TrainConfig, to_dict
from parscale_jax.model.counting import train_flops_per_token
from parscale_jax.errors import DataError, NonFiniteError
from parscale_jax.growth import Phase, Ramp, Schedule
from parscale_jax.layout import Layout
from parscale_jax.training.logger import MetricsLogger
from parscale_jax.model import DECAYED, GrowthMasks, init_params, merge_params, model_graphdef, param_info
from parscale_jax.model.config import ModelConfig
from parscale_jax.training.preemption import StopRequests
from parscale_jax.runs import Run, partition_trainable
from parscale_jax.sharding import constrain
from parscale_jax.transforms.grow import grow_state

Batch = dict[str, jax.Array]
STEPS_IN_FLIGHT = 2  # dispatched steps whose flags the host has not read yet
FLAGS = ("loss_finite", "grads_finite", "halted")  # step metrics the loop acts on rather than logs


# ---------------------------------------------------------------------------------------------
# Optimizer


def learning_rate_schedule(t: TrainConfig) -> optax.Schedule:
    """Linear warmup, then cosine decay, warmup-stable-decay (linear cool-down) or constant."""
    peak, floor = t.lr, t.lr * t.min_lr_ratio
    remaining = max(t.steps - t.warmup_steps, 1)
    if t.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, remaining, alpha=t.min_lr_ratio)
    elif t.schedule == "wsd":
        decay_steps = max(round(remaining * t.decay_fraction), 1)
        after = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay_steps)],
            [remaining - decay_steps])
    else:
        after = optax.constant_schedule(peak)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, t.warmup_steps), after], [t.warmup_steps])


def weight_decay_mask(info: dict) -> dict:
    """Which parameters weight decay applies to, by their declared kind: matrices, embeddings and
    prefixes, not norm gains nor biases. `info` is `model.param_info(cfg)` (or a part of it)."""
    return jax.tree.map(lambda leaf: leaf.kind in DECAYED, info)


def make_optimizer(t: TrainConfig, decay_mask: dict) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate_schedule(t), b1=t.b1, b2=t.b2, eps=1e-8,
                        weight_decay=t.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw) if t.grad_clip > 0 else adamw


# ---------------------------------------------------------------------------------------------
# Loss and steps


def loss_sums(params: dict, graphdef: nnx.GraphDef, batch: Batch, z_loss: float, masks: GrowthMasks | None = None):
    """(objective summed over target tokens, (cross-entropy sum, target-token count, the model's Aux)).

    Sums rather than means, so micro-batches add up to exactly the full batch. The model's auxiliary
    losses are means over tokens; they count once per target token, like the cross-entropy.
    `masks`: while a grown model's new parts fade in (growth.py).
    """
    model = nnx.merge(graphdef, nnx.State(params))
    logits_BSV, aux = model(batch["tokens"], batch["positions"], batch["segment_ids"], masks)
    logits_BSV = logits_BSV.astype(jnp.float32)
    log_z_BS = jax.nn.logsumexp(logits_BSV, axis=-1)
    target_logit_BS = jnp.take_along_axis(logits_BSV, batch["targets"][..., None], axis=-1)[..., 0]
    mask_BS = batch["loss_mask"].astype(jnp.float32)
    ce_sum, n_tokens = jnp.sum((log_z_BS - target_logit_BS) * mask_BS), jnp.sum(mask_BS)
    objective = ce_sum + z_loss * jnp.sum(jnp.square(log_z_BS) * mask_BS)
    if aux.losses:
        objective += n_tokens * sum(aux.losses.values())
    return objective, (ce_sum, n_tokens, aux)


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, t: TrainConfig,
                    ramp: Ramp | None = None) -> Callable[[dict, dict, Batch, jax.Array], tuple[dict, dict]]:
    """`train_step(state, frozen, batch, halted)`: only `state["params"]` is trained; `frozen` holds
    the parameters that are not (the backbone under `train.trainable=parscale`, else nothing).

    `halted` (a device bool) is the previous step's `metrics["halted"]`: under
    `train.on_nonfinite=stop` a non-finite step sets it, and every step after leaves the state as
    it was, so the loop can read the flags a few steps late and still save the last good state.

    With a growth `ramp`, the model's new parts are masked by its value at the state's step.
    """
    schedule = learning_rate_schedule(t)

    def objective(params: dict, frozen: dict, batch: Batch, masks):
        return loss_sums(merge_params(frozen, params), graphdef, batch, t.z_loss, masks)

    grad_fn = jax.grad(objective, has_aux=True)

    def train_step(state: dict, frozen: dict, batch: Batch, halted: jax.Array) -> tuple[dict, dict]:
        params = state["params"]
        masks = None if ramp is None else ramp.masks(state["step"])
        # Gradient accumulation: scan over micro-batches, summing float32 gradients. Micro-batch a
        # takes rows a, a+A, a+2A, ..., so each one stays spread over the `data` devices as is.
        micro_batches = jax.tree.map(
            lambda x: constrain(jnp.swapaxes(x.reshape(-1, t.grad_accum, *x.shape[1:]), 0, 1),
                                (None, "batch", "length")), batch)

        def accumulate(carry, micro_batch):
            grads, ce_sum, n_tokens = carry
            g, (ce, n, aux) = grad_fn(params, frozen, micro_batch, masks)
            grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
            return (grads, ce_sum + ce, n_tokens + n), aux

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (grads, ce_sum, n_tokens), aux = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), micro_batches)
        aux = aux.mean()  # over the micro-batches
        n_tokens = jnp.maximum(n_tokens, 1.0)
        grads = jax.tree.map(lambda g, p: (g / n_tokens).astype(p.dtype), grads, params)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        grad_norm = optax.tree.norm(grads)
        loss_finite, grads_finite = jnp.isfinite(ce_sum), jnp.isfinite(grad_norm)
        updated = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                   "opt_state": opt_state, "skipped_steps": state["skipped_steps"]}
        # A non-finite loss or gradient never reaches the parameters or the Adam moments. Skipping
        # counts the step as done; stopping leaves the state exactly as before, for the loop to save.
        finite = loss_finite & grads_finite
        if t.on_nonfinite == "skip":
            unchanged = {**state, "step": state["step"] + 1, "skipped_steps": state["skipped_steps"] + 1}
        else:
            unchanged = state
            finite, halted = finite & ~halted, halted | ~finite
        new_state = jax.tree.map(functools.partial(jnp.where, finite), updated, unchanged)
        metrics = {"loss": ce_sum / n_tokens, "grad_norm": grad_norm, "lr": schedule(state["step"]),
                   "tokens": n_tokens, "loss_finite": loss_finite, "grads_finite": grads_finite, "halted": halted,
                   "skipped_steps": new_state["skipped_steps"],
                   **{f"aux/{name}": value for name, value in aux.losses.items()},
                   **{f"stat/{name}": value for name, value in aux.stats.items()}}
        return new_state, metrics

    return train_step


def jit_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, t: TrainConfig,
                   layout: Layout, state_shardings: dict, frozen_shardings: dict, ramp: Ramp | None = None):
    """The train step compiled for `layout`: state stays where the rules put it and is donated."""
    return jax.jit(make_train_step(graphdef, optimizer, t, ramp), donate_argnums=0,
                   in_shardings=(state_shardings, frozen_shardings, layout.batch_sharding(), layout.replicated()),
                   out_shardings=(state_shardings, layout.replicated()))


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[..., tuple[jax.Array, jax.Array]]:
    def eval_step(params: dict, batch: Batch, masks: GrowthMasks | None = None):
        _, (ce_sum, n_tokens, _) = loss_sums(params, graphdef, batch, 0.0, masks)
        return ce_sum, n_tokens

    return eval_step


def mean_loss(eval_step, params: dict, batches: Iterable[dict[str, np.ndarray]],
              masks: GrowthMasks | None = None) -> tuple[float, int]:
    """(mean next-token cross-entropy, number of target tokens) over `batches`."""
    ce_total, n_total = 0.0, 0.0
    for batch in batches:
        ce_sum, n_tokens = eval_step(params, batch, masks)
        ce_total += float(ce_sum)
        n_total += float(n_tokens)
    if n_total == 0:
        raise DataError("the evaluation data holds no target tokens")
    return ce_total / n_total, int(n_total)


# ---------------------------------------------------------------------------------------------
# State and evaluation


def create_state_fn(config: Config, model: ModelConfig | None = None):
    """(graphdef, optimizer, `create_state(trained_params)` building the initial train state) of
    `model` (default: the config's; a grown one under `train.growth`)."""
    config = config if model is None else dataclasses.replace(config, model=model)
    decay_mask, _ = partition_trainable(weight_decay_mask(param_info(config.model)), config)
    optimizer = make_optimizer(config.train, decay_mask)

    def create_state(params: dict) -> dict:
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params),
                "skipped_steps": jnp.zeros((), jnp.int32)}

    return model_graphdef(config.model), optimizer, create_state


def jit_eval_step(graphdef: nnx.GraphDef, layout: Layout, params: dict):
    """The eval step compiled for `params` as laid out on `layout`."""
    shardings = jax.tree.map(lambda x: x.sharding, params)
    return jax.jit(make_eval_step(graphdef), in_shardings=(shardings, layout.batch_sharding(), layout.replicated()),
                   out_shardings=layout.replicated())


def placed_eval_batches(config: Config, layout: Layout, rows: Rows | None = None,
                        limit: int = 0) -> Iterable[Batch]:
    """`data.eval_batches` as global arrays on the mesh, each process supplying its own rows."""
    batch_size = config.train.batch_size
    mine = layout.process_rows(batch_size)
    batches = data.eval_batches(config, rows, limit)  # a bad corpus fails here, not mid-loop
    return (layout.put_batch(take_rows(batch, mine), batch_size) for batch in batches)


def evaluate(run: Run, rows: Rows | None = None, limit: int = 0, step: int | None = None) -> dict[str, Any]:
    """Mean loss of a run's latest checkpoint (or `step`; 0: its starting weights) on `rows`
    (default: the held-out split)."""
    run = run.settled(step, "eval")
    layout = Layout.create(run.config)
    with jax.set_mesh(layout.mesh):
        batches = placed_eval_batches(run.config, layout, rows, limit)
        params, step = run.params(layout, step)
        eval_step = jit_eval_step(model_graphdef(run.config.model), layout, params)
        loss, target_tokens = mean_loss(eval_step, params, batches)
    return {"step": step, "loss": loss, "target_tokens": target_tokens}


# ---------------------------------------------------------------------------------------------
# Growth (growth.py): the steps of each phase, and the state grown between them


def compile_steps(config: Config, layout: Layout, phase: Phase, state: dict, frozen: dict):
    """(train step, eval step) of `phase`'s model and ramp, for `state` as it is laid out."""
    graphdef, optimizer, _ = create_state_fn(config, phase.model)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
    train_step = jit_train_step(graphdef, optimizer, config.train, layout, state_shardings, frozen_shardings,
                                phase.ramp)
    return train_step, jit_eval_step(graphdef, layout, merge_params(frozen, state["params"]))


def grow(config: Config, layout: Layout, state: dict, old: ModelConfig, new: ModelConfig, seed: int) -> dict:
    """The train state of `old`'s shape carried over to `new`'s: new weights from `seed` (the
    stage's), parameters and Adam moments in their leading blocks."""
    _, _, create_state = create_state_fn(config, new)

    def grown(state):
        return grow_state(state, create_state(init_params(new, seed)), old, new)

    shardings = layout.for_model(new).state_shardings(jax.eval_shape(grown, state))
    return jax.jit(grown, out_shardings=shardings)(state)


# ---------------------------------------------------------------------------------------------
# The loop


def train(config: Config, run_dir: str | Path, progress: bool = True, stop_at: int | None = None,
          fallback: bool = False, override_config: bool = False) -> dict[str, Any]:
    """Train (or resume) the run in `run_dir`; returns the last logged metrics, with "stopped_by"
    naming the signal if SIGTERM or SIGINT ended it early (checkpointed).

    `stop_at` ends the session early at that step, checkpointed, for time-sliced jobs; running
    again continues exactly as if it had never stopped. `fallback` resumes from the newest good
    checkpoint when the newest is damaged; `override_config` continues a run under changed settings.
    """
    run = Run(Path(run_dir), config)
    t = config.train
    run.check_config(override_config)
    layout = Layout.create(config)  # checks the mesh against the devices before anything compiles
    with jax.set_mesh(layout.mesh), StopRequests() as stop_requests:  # the mesh: for the model's constraints
        my_rows = layout.process_rows(t.batch_size)
        train_iter = iter(data.train_dataset(config, my_rows))

        checkpointer = run.checkpointer()
        start, state, frozen = run.resume(layout, checkpointer, lambda model: create_state_fn(config, model)[2],
                                          train_iter, fallback)
        run.save_config()
        if start == 0:
            run.record_fresh_start()

        is_main = jax.process_index() == 0
        logger = MetricsLogger(run.directory, enabled=is_main, resume_step=start)
        schedule = Schedule(config)
        model, phase = run.model_at(start), None  # the state's shape; what the steps are compiled for

        bar = tqdm(total=t.steps, initial=start, disable=not (progress and is_main), unit="step",
                   dynamic_ncols=True)
        last: dict[str, Any] = {}
        # Throughput over the steps since the last log, without the time spent evaluating.
        window_start, window_tokens, window_eval_s = time.perf_counter(), 0, 0.0
        end = min(stop_at or t.steps, t.steps)
        halted = jax.device_put(jnp.zeros((), bool), layout.replicated())
        pending: collections.deque[tuple[int, dict, Any]] = collections.deque()  # dispatched, not yet read

        def check(step: int, metrics: dict, position: Any) -> None:
            """Act on one finished step's flags: name a skipped update, or stop with the last good state."""
            loss_finite, grads_finite = jax.device_get((metrics["loss_finite"], metrics["grads_finite"]))
            if loss_finite and grads_finite:
                return
            what = "loss" if not loss_finite else "gradients"
            if t.on_nonfinite == "stop":  # the steps after it left the state alone (`halted`)
                train_iter.set_state(position)
                if step - 1 not in checkpointer.all_steps():
                    checkpointer.save(step - 1, state, train_iter, to_dict(config))
                checkpointer.wait()
                raise NonFiniteError(f"step {step}: non-finite {what}; stopped (train.on_nonfinite=stop) "
                                     f"with the state of step {step - 1} saved in {checkpointer.directory}")
            if is_main:
                bar.write(f"step {step}: non-finite {what}; update skipped "
                          f"({int(metrics['skipped_steps'])} skipped so far)", file=sys.stderr)

        for step in range(start + 1, end + 1):
            if schedule.phase(step - 1) != phase:  # the first step, a growth stage, or the end of a ramp
                while pending:
                    check(*pending.popleft())
                phase = schedule.phase(step - 1)
                if phase.model != model:
                    state = grow(config, layout, state, model, phase.model, schedule.seed_at(step - 1))
                    model = phase.model
                    if is_main:
                        bar.write(f"step {step - 1}: grew the model to {growth.describe(model)}")
                train_step, eval_step = compile_steps(config, layout, phase, state, frozen)
                flops_per_token = train_flops_per_token(model, config.data.seq_len)
            # Where a stop on a non-finite step rewinds the data to.
            position = train_iter.get_state() if t.on_nonfinite == "stop" else None
            state, metrics = train_step(state, frozen, layout.put_batch(next(train_iter), t.batch_size), halted)
            halted = metrics["halted"]
            pending.append((step, metrics, position))
            window_tokens += t.batch_size * config.data.seq_len
            bar.update(1)
            logs = step % t.log_every == 0 or step == t.steps
            evaluates = t.eval_every and (step % t.eval_every == 0 or step == t.steps)
            stop_signal = stop_requests.agreed()
            saves = step % config.checkpoint.every == 0 or step == end or stop_signal
            # The host reads each step's flags a few steps late, so that the device never waits for it;
            # everything is read before a step is logged, evaluated or saved.
            while len(pending) > (0 if logs or evaluates or saves else STEPS_IN_FLIGHT):
                check(*pending.popleft())
            record: dict[str, Any] = {}
            if logs:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items() if k not in FLAGS}
                tokens_per_s = window_tokens / (time.perf_counter() - window_start - window_eval_s)
                record = {"step": step, "loss": metrics["loss"], "lr": metrics["lr"],
                          "grad_norm": metrics["grad_norm"], "skipped_steps": int(metrics["skipped_steps"]),
                          "tokens_per_s": tokens_per_s, "tflops_per_s": tokens_per_s * flops_per_token / 1e12,
                          "flops": schedule.flops(step),
                          **{k: v for k, v in metrics.items() if k.startswith(("aux/", "stat/"))}}
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                window_start, window_tokens, window_eval_s = time.perf_counter(), 0, 0.0
            if evaluates:
                eval_start = time.perf_counter()
                record["step"], record["flops"] = step, schedule.flops(step)
                record["eval_loss"], _ = mean_loss(eval_step, merge_params(frozen, state["params"]),
                                                   placed_eval_batches(config, layout, None, t.eval_batches),
                                                   schedule.masks_at(step))
                window_eval_s += time.perf_counter() - eval_start
            if record:
                logger.log(record)
                last = {**last, **record}
            if saves:
                checkpointer.save(step, state, train_iter, to_dict(config))
            if stop_signal:
                last = {**last, "step": step, "stopped_by": stop_signal}
                break
        bar.close()
        checkpointer.wait()
        checkpointer.close()
        logger.close()
        return last
