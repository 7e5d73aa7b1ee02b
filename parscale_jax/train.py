"""Training: the loss, the jitted train and eval steps, and the loop that logs and checkpoints.

A batch is a dict of int32 `[B, S]` arrays from `data.py`: tokens, targets, segment_ids, positions,
loss_mask. The train state is a plain dict {step, params, opt_state}; params are the model's
parameters as a nested dict, turned back into the NNX model inside the loss with `nnx.merge`.
"""

from __future__ import annotations

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
import yaml
from flax import nnx
from tqdm import tqdm

from parscale_jax import data
from parscale_jax.checkpoint import Checkpointer, complete_steps, restore_params
from parscale_jax.config import (
    Config,
    ConfigError,
    ModelConfig,
    TrainConfig,
    config_differences,
    from_dict,
    read_yaml,
    to_dict,
)
from parscale_jax.counting import train_flops_per_token
from parscale_jax.errors import CheckpointError, NonFiniteError
from parscale_jax.files import write_atomic
from parscale_jax.logger import MetricsLogger
from parscale_jax.model import abstract_params, init_params, merge_params, model_graphdef, split_params
from parscale_jax.preemption import StopRequests
from parscale_jax.sharding import Layout, constrain, with_shardings

Batch = dict[str, jax.Array]


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


def weight_decay_mask(params: dict) -> dict:
    """Decay matrices and embeddings; not norm gains (named `weight`) nor biases."""

    def decays(path, _leaf) -> bool:
        name = str(path[-1].key)
        return not (name == "weight" or name.endswith("bias"))

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(t: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate_schedule(t), b1=t.b1, b2=t.b2, eps=1e-8,
                        weight_decay=t.weight_decay, mask=weight_decay_mask)
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw) if t.grad_clip > 0 else adamw


# ---------------------------------------------------------------------------------------------
# Loss and steps


def loss_sums(params: dict, graphdef: nnx.GraphDef, batch: Batch, z_loss: float):
    """(objective summed over target tokens, (cross-entropy sum, target-token count)).

    Sums rather than means, so micro-batches add up to exactly the full batch.
    """
    model = nnx.merge(graphdef, nnx.State(params))
    logits_BSV = model(batch["tokens"], batch["positions"], batch["segment_ids"]).astype(jnp.float32)
    log_z_BS = jax.nn.logsumexp(logits_BSV, axis=-1)
    target_logit_BS = jnp.take_along_axis(logits_BSV, batch["targets"][..., None], axis=-1)[..., 0]
    mask_BS = batch["loss_mask"].astype(jnp.float32)
    ce_sum = jnp.sum((log_z_BS - target_logit_BS) * mask_BS)
    objective = ce_sum + z_loss * jnp.sum(jnp.square(log_z_BS) * mask_BS)
    return objective, (ce_sum, jnp.sum(mask_BS))


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    t: TrainConfig) -> Callable[[dict, dict, Batch], tuple[dict, dict]]:
    """`train_step(state, frozen, batch)`: only `state["params"]` is trained; `frozen` holds the
    parameters that are not (the backbone under `train.trainable=parscale`, else nothing)."""
    schedule = learning_rate_schedule(t)

    def objective(params: dict, frozen: dict, batch: Batch):
        return loss_sums(merge_params(frozen, params), graphdef, batch, t.z_loss)

    grad_fn = jax.grad(objective, has_aux=True)

    def train_step(state: dict, frozen: dict, batch: Batch) -> tuple[dict, dict]:
        params = state["params"]
        # Gradient accumulation: scan over micro-batches, summing float32 gradients. Micro-batch a
        # takes rows a, a+A, a+2A, ..., so each one stays spread over the `data` devices as is.
        micro_batches = jax.tree.map(
            lambda x: constrain(jnp.swapaxes(x.reshape(-1, t.grad_accum, *x.shape[1:]), 0, 1),
                                (None, "batch", "length")), batch)

        def accumulate(carry, micro_batch):
            grads, ce_sum, n_tokens = carry
            g, (ce, n) = grad_fn(params, frozen, micro_batch)
            grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
            return (grads, ce_sum + ce, n_tokens + n), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (grads, ce_sum, n_tokens), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), micro_batches)
        n_tokens = jnp.maximum(n_tokens, 1.0)
        grads = jax.tree.map(lambda g, p: (g / n_tokens).astype(p.dtype), grads, params)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        grad_norm = optax.tree.norm(grads)
        loss_finite, grads_finite = jnp.isfinite(ce_sum), jnp.isfinite(grad_norm)
        updated = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                   "opt_state": opt_state, "skipped_steps": state["skipped_steps"]}
        # A non-finite loss or gradient never reaches the parameters or the Adam moments. Skipping
        # counts the step as done; stopping leaves the state exactly as before, for the loop to save.
        if t.on_nonfinite == "skip":
            unchanged = {**state, "step": state["step"] + 1, "skipped_steps": state["skipped_steps"] + 1}
        else:
            unchanged = state
        new_state = jax.tree.map(functools.partial(jnp.where, loss_finite & grads_finite), updated, unchanged)
        metrics = {"loss": ce_sum / n_tokens, "grad_norm": grad_norm, "lr": schedule(state["step"]),
                   "tokens": n_tokens, "loss_finite": loss_finite, "grads_finite": grads_finite,
                   "skipped_steps": new_state["skipped_steps"]}
        return new_state, metrics

    return train_step


def jit_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, t: TrainConfig,
                   layout: Layout, state_shardings: dict, frozen_shardings: dict):
    """The train step compiled for `layout`: state stays where the rules put it and is donated."""
    return jax.jit(make_train_step(graphdef, optimizer, t), donate_argnums=0,
                   in_shardings=(state_shardings, frozen_shardings, layout.batch_sharding()),
                   out_shardings=(state_shardings, layout.replicated()))


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[[dict, Batch], tuple[jax.Array, jax.Array]]:
    def eval_step(params: dict, batch: Batch):
        _, (ce_sum, n_tokens) = loss_sums(params, graphdef, batch, 0.0)
        return ce_sum, n_tokens

    return eval_step


def mean_loss(eval_step, params: dict, batches: Iterable[dict[str, np.ndarray]]) -> tuple[float, int]:
    """(mean next-token cross-entropy, number of target tokens) over `batches`."""
    ce_total, n_total = 0.0, 0.0
    for batch in batches:
        ce_sum, n_tokens = eval_step(params, batch)
        ce_total += float(ce_sum)
        n_total += float(n_tokens)
    if n_total == 0:
        raise data.DataError("the evaluation data holds no target tokens")
    return ce_total / n_total, int(n_total)


# ---------------------------------------------------------------------------------------------
# State


def partition_trainable(params: dict, config: Config) -> tuple[dict, dict]:
    """(trained, frozen) parameters: with `train.trainable=parscale` only the prefixes and the
    aggregator train and the backbone is frozen; otherwise everything trains."""
    if config.train.trainable == "parscale":
        return split_params(params, config.model)
    return params, {}


def create_state_fn(config: Config):
    """(graphdef, optimizer, `create_state(trained_params)` building the initial train state)."""
    optimizer = make_optimizer(config.train)

    def create_state(params: dict) -> dict:
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params),
                "skipped_steps": jnp.zeros((), jnp.int32)}

    return model_graphdef(config.model), optimizer, create_state


def checkpoint_dir(config: Config, run_dir: Path) -> Path:
    """Where the step checkpoints go. A PEFT run keeps one folder per P, every one of them sharing
    the imported backbone: several prefix+aggregator sets on one frozen model (dynamic P)."""
    if config.train.trainable == "parscale":
        return run_dir / f"checkpoints_p{config.model.parscale_n}"
    return run_dir / "checkpoints"


def imported_dir(run_dir: Path) -> Path:
    """`parscale-jax import` writes `backbone/` here, and `parscale_p<P>/` if the checkpoint had streams."""
    return run_dir / "imported"


def starting_params(config: Config, run_dir: Path, layout: Layout) -> tuple[dict, dict]:
    """(trained, frozen) parameters of a run's step 0, on their shardings.

    Imported weights where `run_dir/imported` has them; fresh ones (seeded by train.seed) for the
    rest, e.g. the new prefixes and aggregator when P was raised on a P = 1 checkpoint.
    """
    cfg, seed = config.model, config.train.seed
    params = jax.jit(lambda: init_params(cfg, seed), out_shardings=layout.param_shardings(abstract_params(cfg)))()
    parscale, backbone = split_params(params, cfg)
    source = imported_dir(run_dir)
    if (source / "backbone").exists():
        backbone = restore_params(source / "backbone", _on_layout(backbone, layout))
        if (source / f"parscale_p{cfg.parscale_n}").exists():
            parscale = restore_params(source / f"parscale_p{cfg.parscale_n}", _on_layout(parscale, layout))
    elif config.train.trainable == "parscale":
        raise ConfigError("train.trainable", "'parscale' trains new streams on a pretrained backbone, and "
                          f"{run_dir} has none: start from `parscale-jax import --hf DIR --out {run_dir}`")
    return partition_trainable(merge_params(backbone, parscale), config)


def frozen_params(config: Config, run_dir: Path, layout: Layout) -> dict:
    """The parameters a run does not train, read again on every start: they are never checkpointed."""
    if config.train.trainable != "parscale":
        return {}
    _, backbone = split_params(abstract_params(config.model), config.model)
    return restore_params(imported_dir(run_dir) / "backbone", _on_layout(backbone, layout))


def _on_layout(params: dict, layout: Layout) -> dict:
    return with_shardings(params, layout.param_shardings(params))


def restore_latest(config: Config, run_dir: Path, layout: Layout,
                   step: int | None = None) -> tuple[nnx.GraphDef, dict, int]:
    """(graphdef, all parameters on `layout`, step) of a run's newest complete checkpoint, or of `step`."""
    graphdef, _, create_state = create_state_fn(config)
    checkpointer = Checkpointer(checkpoint_dir(config, run_dir), config.checkpoint)
    steps = checkpointer.all_steps()
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise FileNotFoundError(f"no checkpoint of step {step} in {checkpointer.directory} (it has {steps})")
    trained, _ = partition_trainable(abstract_params(config.model), config)
    # Only the parameters: the optimizer state stays on disk.
    params = checkpointer.restore_part(step, {"params": _on_layout(trained, layout)})["params"]
    checkpointer.close()
    return graphdef, merge_params(frozen_params(config, run_dir, layout), params), step


def jit_eval_step(graphdef: nnx.GraphDef, layout: Layout, params: dict):
    """The eval step compiled for `params` as laid out on `layout`."""
    shardings = jax.tree.map(lambda x: x.sharding, params)
    return jax.jit(make_eval_step(graphdef), in_shardings=(shardings, layout.batch_sharding()),
                   out_shardings=layout.replicated())


def evaluate_run(config: Config, run_dir: Path, rows: data.Rows | None = None, limit: int = 0,
                 step: int | None = None) -> dict[str, Any]:
    """Mean loss of a run's latest checkpoint (or `step`) on `rows` (default: the held-out split)."""
    layout = Layout.create(config)
    with jax.set_mesh(layout.mesh):
        batches = placed_eval_batches(config, layout, rows, limit)
        graphdef, params, step = restore_latest(config, run_dir, layout, step)
        loss, target_tokens = mean_loss(jit_eval_step(graphdef, layout, params), params, batches)
    return {"step": step, "loss": loss, "target_tokens": target_tokens}


def placed_eval_batches(config: Config, layout: Layout, rows: data.Rows | None = None,
                        limit: int = 0) -> Iterable[Batch]:
    """`data.eval_batches` as global arrays on the mesh, each process supplying its own rows."""
    batch_size = config.train.batch_size
    mine = layout.process_rows(batch_size)
    batches = data.eval_batches(config, rows, limit)  # a bad corpus fails here, not mid-loop
    return (layout.put_batch(data.take_rows(batch, mine), batch_size) for batch in batches)


# ---------------------------------------------------------------------------------------------
# The loop


def save_run_config(config: Config, run_dir: Path) -> None:
    if jax.process_index() != 0:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))


# Where the run is laid out, saved and reported: a resumed run computes the same either way.
FREE_TO_CHANGE = ("mesh.", "checkpoint.", "train.log_every", "train.eval_every", "train.eval_batches")


def saved_config_changes(config: Config, run_dir: Path) -> tuple[dict[str, tuple[Any, Any]], bool]:
    """({dotted key: (old, new)} where `config` differs in what the run computes from the config the
    run in `run_dir` started with, whether the parameters' shapes differ too). Nothing differs
    before the run's first checkpoint: until then (e.g. just after `parscale-jax import`) the saved
    config is only a starting point."""
    saved = run_dir / "config.yaml"
    if not saved.is_file() or not complete_steps(checkpoint_dir(config, run_dir)):
        return {}, False
    old_config = from_dict(read_yaml(saved))
    differ = {key: change for key, change in config_differences(to_dict(old_config), to_dict(config)).items()
              if not key.startswith(FREE_TO_CHANGE)}
    old_model = old_config.model
    if config.train.trainable == "parscale":  # each P of a PEFT run is its own stream set
        differ.pop("model.parscale_n", None)
        old_model = dataclasses.replace(old_model, parscale_n=config.model.parscale_n)
    model_changed = any(key.startswith("model.") for key in differ)
    return differ, model_changed and _param_shapes(old_model) != _param_shapes(config.model)


def check_saved_config(config: Config, run_dir: Path, override: bool) -> None:
    """Resuming under other settings than a run was started with needs `override`; the model's
    shape can never change (its checkpoints would not fit)."""
    differ, reshaped = saved_config_changes(config, run_dir)
    changes = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in differ.items())
    if reshaped:
        raise ConfigError(next(k for k in differ if k.startswith("model.")), f"{run_dir} holds a model of another "
                          f"shape ({changes}); its checkpoints cannot take the new one: train in a new --run-dir")
    if differ and not override:
        raise ConfigError(next(iter(differ)), f"{run_dir} was started with other settings ({changes}); "
                          "pass --override-config to continue it with the new ones")


def _param_shapes(cfg: ModelConfig) -> dict:
    return jax.tree.map(lambda x: x.shape, abstract_params(cfg))


def resume_state(config: Config, run_dir: Path, layout: Layout, checkpointer: Checkpointer, train_iter,
                 fallback: bool) -> tuple[int, dict, dict]:
    """(step, train state, frozen parameters) to start from: the newest checkpoint, with `train_iter`
    moved to its position, or step 0. With `fallback`, a damaged checkpoint is set aside and the one
    before it is tried."""
    _, _, create_state = create_state_fn(config)
    step = checkpointer.latest_step()
    if step is None:
        trained, frozen = starting_params(config, run_dir, layout)
        state_shardings = layout.state_shardings(jax.eval_shape(create_state, trained))
        return 0, jax.jit(create_state, out_shardings=state_shardings)(trained), frozen
    frozen = frozen_params(config, run_dir, layout)
    abstract_state = jax.eval_shape(create_state, partition_trainable(abstract_params(config.model), config)[0])
    abstract_state = with_shardings(abstract_state, layout.state_shardings(abstract_state))
    while True:
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


def train(config: Config, run_dir: str | Path, progress: bool = True, stop_at: int | None = None,
          fallback: bool = False, override_config: bool = False) -> dict[str, Any]:
    """Train (or resume) the run in `run_dir`; returns the last logged metrics, with "stopped_by"
    naming the signal if SIGTERM or SIGINT ended it early (checkpointed).

    `stop_at` ends the session early at that step, checkpointed, for time-sliced jobs; running
    again continues exactly as if it had never stopped. `fallback` resumes from the newest good
    checkpoint when the newest is damaged; `override_config` continues a run under changed settings.
    """
    run_dir = Path(run_dir)
    t = config.train
    check_saved_config(config, run_dir, override_config)
    layout = Layout.create(config)  # checks the mesh against the devices before anything compiles
    with jax.set_mesh(layout.mesh), StopRequests() as stop_requests:  # the mesh: for model.py's constraints
        my_rows = layout.process_rows(t.batch_size)
        train_iter = iter(data.train_dataset(config, my_rows))

        graphdef, optimizer, create_state = create_state_fn(config)
        checkpointer = Checkpointer(checkpoint_dir(config, run_dir), config.checkpoint)
        start, state, frozen = resume_state(config, run_dir, layout, checkpointer, train_iter, fallback)
        save_run_config(config, run_dir)

        is_main = jax.process_index() == 0
        logger = MetricsLogger(run_dir, enabled=is_main, resume_step=start)
        state_shardings = jax.tree.map(lambda x: x.sharding, state)
        frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
        train_step = jit_train_step(graphdef, optimizer, t, layout, state_shardings, frozen_shardings)
        eval_step = jit_eval_step(graphdef, layout, merge_params(frozen, state["params"]))
        flops_per_token = train_flops_per_token(config.model, config.data.seq_len)

        bar = tqdm(total=t.steps, initial=start, disable=not (progress and is_main), unit="step",
                   dynamic_ncols=True)
        last: dict[str, Any] = {}
        window_start, window_tokens = time.perf_counter(), 0
        end = min(stop_at or t.steps, t.steps)
        for step in range(start + 1, end + 1):
            # Where a stop on a non-finite step rewinds the data to.
            position = train_iter.get_state() if t.on_nonfinite == "stop" else None
            state, metrics = train_step(state, frozen, layout.put_batch(next(train_iter), t.batch_size))
            window_tokens += t.batch_size * config.data.seq_len
            bar.update(1)
            # One small device-to-host read per step: which step went non-finite is known exactly.
            loss_finite, grads_finite = jax.device_get((metrics["loss_finite"], metrics["grads_finite"]))
            if not (loss_finite and grads_finite):
                what = "loss" if not loss_finite else "gradients"
                if t.on_nonfinite == "stop":
                    train_iter.set_state(position)
                    if step - 1 not in checkpointer.all_steps():
                        checkpointer.save(step - 1, state, train_iter, to_dict(config))
                    checkpointer.wait()
                    raise NonFiniteError(f"step {step}: non-finite {what}; stopped (train.on_nonfinite=stop) "
                                         f"with the state of step {step - 1} saved in {checkpointer.directory}")
                if is_main:
                    bar.write(f"step {step}: non-finite {what}; update skipped "
                              f"({int(metrics['skipped_steps'])} skipped so far)", file=sys.stderr)
            if step % t.log_every == 0 or step == t.steps:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items() if "finite" not in k}
                elapsed = time.perf_counter() - window_start
                tokens_per_s = window_tokens / elapsed
                last = {"step": step, "loss": metrics["loss"], "lr": metrics["lr"],
                        "grad_norm": metrics["grad_norm"], "skipped_steps": int(metrics["skipped_steps"]),
                        "tokens_per_s": tokens_per_s, "tflops_per_s": tokens_per_s * flops_per_token / 1e12}
                if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
                    last["eval_loss"], _ = mean_loss(eval_step, merge_params(frozen, state["params"]),
                                                     placed_eval_batches(config, layout, None, t.eval_batches))
                logger.log(last)
                bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                window_start, window_tokens = time.perf_counter(), 0
            stop_signal = stop_requests.agreed()
            if step % config.checkpoint.every == 0 or step == end or stop_signal:
                checkpointer.save(step, state, train_iter, to_dict(config))
            if stop_signal:
                last = {**last, "step": step, "stopped_by": stop_signal}
                break
        bar.close()
        checkpointer.wait()
        checkpointer.close()
        logger.close()
        return last
