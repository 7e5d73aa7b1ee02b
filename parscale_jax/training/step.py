"""The optimizer, the objective, the jitted train step, and the train state they update: made at
step 0, restored from a checkpoint (`resume`), or grown to a larger model (`Trainer.grow`).

A batch is a dict of int32 `[B, S]` arrays (data/packing.py): tokens, targets, segment_ids,
positions, loss_mask. The train state is a plain dict {step, params, opt_state, skipped_steps};
params are the trained parameters as a nested dict, turned back into the NNX model inside the loss
with `nnx.merge`. `Trainer` holds what trains one shape of model and makes its state and step: the
loop (loop.py), `plan` and `bench train` all build them here.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from parscale_jax.checkpoint import Checkpointer
from parscale_jax.config import Config, TrainConfig
from parscale_jax.errors import CheckpointError
from parscale_jax.evaluate import (
    Batch,
    cross_entropy_sums,
    jit_eval_step,
    model_logits,
    target_log_probs,
)
from parscale_jax.growth import Ramp
from parscale_jax.layout import Layout, with_shardings
from parscale_jax.model import (DECAYED, GrowthMasks, abstract_params, init_params, merge_params, model_graphdef,
                                param_info, partition_trainable)
from parscale_jax.model.config import ModelConfig
from parscale_jax.runs import Run
from parscale_jax.sharding import constrain
from parscale_jax.transforms.grow import grow_state

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
# Objective and step


def aux_loss_weights(t: TrainConfig) -> dict[str, float]:
    """The weight of each auxiliary loss the model may report (one not named here weighs 1)."""
    return {"moe_balance": t.moe_aux_loss, "router_z": t.router_z_loss}


def loss_sums(params: dict, graphdef: nnx.GraphDef, batch: Batch, z_loss: float, masks: GrowthMasks | None = None,
              aux_weights: dict[str, float] | None = None):
    """(objective summed over target tokens, (cross-entropy sum, target-token count, the model's Aux)).

    Sums rather than means, so micro-batches add up to exactly the full batch. The model's auxiliary
    losses are means over tokens; each counts once per target token, like the cross-entropy, times
    its weight in `aux_weights` (`aux_loss_weights`). `masks`: while a grown model's new parts fade
    in (growth.py).
    """
    logits_BSV, aux = model_logits(params, graphdef, batch, masks)
    log_probs_BS, log_z_BS = target_log_probs(logits_BSV, batch["targets"])
    ce_sum, n_tokens = cross_entropy_sums(log_probs_BS, batch["loss_mask"])
    objective = ce_sum + z_loss * jnp.sum(jnp.square(log_z_BS) * batch["loss_mask"].astype(jnp.float32))
    if aux.losses:
        weights = aux_weights or {}
        objective += n_tokens * sum(weights.get(name, 1.0) * loss for name, loss in aux.losses.items())
    return objective, (ce_sum, n_tokens, aux)


def _step_metrics(ce_sum, n_tokens, grad_norm, lr, flags: dict, skipped_steps, aux) -> dict:
    return {"loss": ce_sum / n_tokens, "grad_norm": grad_norm, "lr": lr, "tokens": n_tokens, **flags,
            "skipped_steps": skipped_steps, **{f"aux/{name}": value for name, value in aux.losses.items()},
            **{f"stat/{name}": value for name, value in aux.stats.items()}}


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
        return loss_sums(merge_params(frozen, params), graphdef, batch, t.z_loss, masks, aux_loss_weights(t))

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
        flags = {"loss_finite": loss_finite, "grads_finite": grads_finite, "halted": halted}
        return new_state, _step_metrics(ce_sum, n_tokens, grad_norm, schedule(state["step"]), flags,
                                        new_state["skipped_steps"], aux)

    return train_step


# ---------------------------------------------------------------------------------------------
# The train state of one shape of model


def shardings_of(tree):
    """The shardings of a tree of arrays, as they are laid out."""
    return jax.tree.map(lambda x: x.sharding, tree)


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The optimizer and train step of one shape of model under a run's config: the config's own
    model, or a grown one's (`train.growth`), whose weight decay follows its declared parameters."""

    config: Config
    model: ModelConfig
    graphdef: nnx.GraphDef
    optimizer: optax.GradientTransformation

    @classmethod
    def of(cls, config: Config, model: ModelConfig | None = None) -> Trainer:
        model = model or config.model
        decay_mask, _ = partition_trainable(weight_decay_mask(param_info(model)), model, config.train.trainable)
        return cls(config, model, model_graphdef(model), make_optimizer(config.train, decay_mask))

    def create_state(self, params: dict) -> dict:
        """The train state at step 0 of the trained parameters `params`."""
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.optimizer.init(params),
                "skipped_steps": jnp.zeros((), jnp.int32)}

    def abstract_state(self, layout: Layout) -> dict:
        """The train state's shapes and dtypes, with the shardings it has on `layout`."""
        trained, _ = partition_trainable(abstract_params(self.model), self.model, self.config.train.trainable)
        abstract = jax.eval_shape(self.create_state, trained)
        return with_shardings(abstract, layout.for_model(self.model).state_shardings(abstract))

    def init_state(self, layout: Layout, trained: dict) -> dict:
        """The train state of `trained` (parameters on the mesh), made on the mesh."""
        return jax.jit(self.create_state, out_shardings=shardings_of(self.abstract_state(layout)))(trained)

    def grow(self, layout: Layout, state: dict, old: ModelConfig, seed: int) -> dict:
        """A train state of `old`'s shape carried over to this trainer's model: new weights from
        `seed` (the stage's), parameters and Adam moments in their leading blocks."""
        new, shardings = self.model, shardings_of(self.abstract_state(layout))

        def grown(state):
            return grow_state(state, self.create_state(init_params(new, seed)), old, new)

        return jax.jit(grown, out_shardings=shardings)(state)

    def train_step(self, layout: Layout, state_shardings: dict, frozen_shardings: dict, ramp: Ramp | None = None):
        """The train step compiled for `layout`: the state stays where the rules put it and is donated."""
        step = make_train_step(self.graphdef, self.optimizer, self.config.train, ramp)
        return jax.jit(step, donate_argnums=0,
                       in_shardings=(state_shardings, frozen_shardings, layout.batch_sharding(), layout.replicated()),
                       out_shardings=(state_shardings, layout.replicated()))

    def phase_steps(self, layout: Layout, state: dict, frozen: dict, ramp: Ramp | None) -> PhaseSteps:
        """The train and eval steps of a growth phase (`ramp`: its masks, if they ramp), compiled for
        `state` and `frozen` as they are laid out."""
        return PhaseSteps(layout, self.config, self.train_step(layout, shardings_of(state), shardings_of(frozen), ramp),
                          jit_eval_step(self.graphdef, layout, merge_params(frozen, state["params"])))


@dataclasses.dataclass(frozen=True)
class PhaseSteps:
    """The steps of one phase of a run, compiled: batches go in as this process's rows (numpy), the
    state stays on the mesh."""

    layout: Layout
    config: Config
    train_step: Callable
    eval_step: Callable

    def train(self, state: dict, frozen: dict, local_batch: dict, halted: jax.Array) -> tuple[dict, dict]:
        """(the state after one update on `local_batch`, the step's metrics)."""
        return self.train_step(state, frozen, self.layout.put_batch(local_batch, self.config.train.batch_size), halted)


def resume(run: Run, layout: Layout, checkpointer: Checkpointer, train_iter, fallback: bool) -> tuple[int, dict, dict]:
    """(step, train state, frozen parameters) to start from: the newest checkpoint, with `train_iter`
    moved to its position, or step 0. With `fallback`, a damaged checkpoint is set aside and the
    one before it is tried."""
    step = checkpointer.latest_step()
    while True:
        trainer = Trainer.of(run.config, run.model_at(step or 0))
        abstract_state = trainer.abstract_state(layout)
        trained, frozen = run.start_weights(layout, fresh=step is None)
        if step is None:
            return 0, jax.jit(trainer.create_state, out_shardings=shardings_of(abstract_state))(trained), frozen
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
