"""Evaluation: next-token cross-entropy from the log-probabilities of the targets, apart from the
model call that gives them.

Two functions carry it: `target_log_probs` (a model's logits -> log p(target) at every position, and
the log-normalizer) and `cross_entropy_sums` (log-probabilities and a batch's loss mask -> the
summed cross-entropy and the number of target tokens). Sums rather than means, so batches and
micro-batches add up exactly. A model goes through `model_logits`; an ensemble of models (a mixture
of their probabilities: the log of a weighted sum of exponentials of theirs) or a downstream-task
scorer (sums over a continuation's tokens) combines log-probabilities before the same sums. The
training objective (training/step.py) is built from them too.

Shape suffixes: B batch, S sequence, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from parscale_jax.config import Config
from parscale_jax.data import pipeline
from parscale_jax.data.packing import Rows
from parscale_jax.data.tokenizer import load_tokenizer
from parscale_jax.errors import DataError
from parscale_jax.layout import Layout
from parscale_jax.model import Aux, GrowthMasks, model_graphdef
from parscale_jax.runs import Run

Batch = dict[str, jax.Array]  # data.packing.ROW_KEYS -> int32 [B, S]


def model_logits(params: dict, graphdef: nnx.GraphDef, batch: Batch,
                 masks: GrowthMasks | None = None) -> tuple[jax.Array, Aux]:
    """(logits `[B, S, V]` in float32, the model's Aux) of one model on a batch. `masks`: while a
    grown model's new parts fade in (growth.py)."""
    model = nnx.merge(graphdef, nnx.State(params))
    logits_BSV, aux = model(batch["tokens"], batch["positions"], batch["segment_ids"], masks)
    return logits_BSV.astype(jnp.float32), aux


def target_log_probs(logits_BSV: jax.Array, targets_BS: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log p(target) `[B, S]`, log of the softmax's normalizer `[B, S]`) from float32 logits."""
    log_z_BS = jax.nn.logsumexp(logits_BSV, axis=-1)
    target_logit_BS = jnp.take_along_axis(logits_BSV, targets_BS[..., None], axis=-1)[..., 0]
    return target_logit_BS - log_z_BS, log_z_BS


def cross_entropy_sums(log_probs_BS: jax.Array, loss_mask_BS: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(cross-entropy summed over the target tokens, how many there are)."""
    mask_BS = loss_mask_BS.astype(jnp.float32)
    return -jnp.sum(log_probs_BS * mask_BS), jnp.sum(mask_BS)


def eval_sums(params: dict, graphdef: nnx.GraphDef, batch: Batch,
              masks: GrowthMasks | None = None) -> tuple[jax.Array, jax.Array]:
    """`cross_entropy_sums` of one model on a batch."""
    logits_BSV, _ = model_logits(params, graphdef, batch, masks)
    log_probs_BS, _ = target_log_probs(logits_BSV, batch["targets"])
    return cross_entropy_sums(log_probs_BS, batch["loss_mask"])


def jit_eval_step(graphdef: nnx.GraphDef, layout: Layout, params: dict) -> Callable:
    """`eval_sums` compiled for `params` as laid out on `layout`."""
    shardings = jax.tree.map(lambda x: x.sharding, params)
    return jax.jit(lambda params, batch, masks: eval_sums(params, graphdef, batch, masks),
                   in_shardings=(shardings, layout.batch_sharding(), layout.replicated()),
                   out_shardings=layout.replicated())


def mean_loss(eval_step: Callable, params: dict, batches: Iterable[Batch],
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


def held_out_loss(eval_step: Callable, params: dict, batches: list[Rows], layout: Layout,
                  masks: GrowthMasks | None = None) -> float:
    """The mean loss on held-out `batches` (this process's rows of each: the periodic evaluation)."""
    return mean_loss(eval_step, params, layout.placed(batches, len(batches[0]["tokens"])), masks)[0]


def placed_eval_batches(config: Config, layout: Layout, rows: Rows | None = None,
                        limit: int = 0) -> Iterable[Batch]:
    """`pipeline.eval_batches` as global arrays on the mesh, each process supplying its own rows."""
    batches = pipeline.eval_batches(config, rows, limit)  # a bad corpus fails here, not mid-loop
    return layout.placed(batches, config.train.batch_size)


def text_rows(run: Run, path: str) -> Rows:
    """Every token of a text file, as rows of the run's length."""
    data = run.config.data
    return pipeline.text_file_rows(path, load_tokenizer(data), data.seq_len)


def evaluate_run(run: Run, rows: Rows | None = None, limit: int = 0, step: int | None = None) -> dict[str, Any]:
    """Mean loss of a run's latest checkpoint (or `step`; 0: its starting weights) on `rows`
    (default: the held-out split); `limit` > 0 caps the batches."""
    run = run.settled(step, "eval")
    layout = Layout.create(run.config)
    with jax.set_mesh(layout.mesh):
        batches = placed_eval_batches(run.config, layout, rows, limit)
        params, step = run.params(layout, step)
        eval_step = jit_eval_step(model_graphdef(run.config.model), layout, params)
        loss, target_tokens = mean_loss(eval_step, params, batches)
    return {"step": step, "loss": loss, "target_tokens": target_tokens}

