"""Several runs used as one model (Branch-Train-Merge, Li et al. 2022): a mixture of their next-token
probabilities, weighted by each expert's posterior given the document so far, or by fixed weights.

    p(x_t | x_<t) = sum_j w_j(t) p_j(x_t | x_<t)

a mixture of probabilities (the log-sum-exp of log w_j + log p_j), not an average of logits. With
the `posterior` weighting, w_j(t) is expert j's posterior given the earlier tokens of the same
document: proportional to prior_j * prod_{s<t} p_j(x_s | x_<s), reset at every document boundary of
a packed row (the first position of a document gets the prior). `uniform` and `fixed:w1,w2,...`
keep the same weights everywhere. The prior is uniform, or estimated on held-out text as the mean
over its sequences of the final posterior (BTM's cached prior).

Each expert is a run at its newest checkpoint with its own mesh and its own jitted step; the
ensemble sees only their log-probabilities: `evaluate.model_logits` and `evaluate.target_log_probs`
per expert, combined here, then `evaluate.cross_entropy_sums`. Generation keeps one KV cache per
expert (`generate.Decoding`) and samples from the mixture, updating the posterior with each
expert's log-probability of the chosen token. The experts must share a tokenizer and vocabulary;
they may differ in anything else (P, width, depth).

Shape suffixes: J experts, B batch, S sequence, V vocabulary, R rows.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from parscale_jax.config import SamplingConfig
from parscale_jax.data import pipeline
from parscale_jax.data.packing import Rows, batches_of
from parscale_jax.data.prepared import tokenizer_sha256
from parscale_jax.data.tokenizer import load_tokenizer
from parscale_jax.errors import ConfigError, DataError
from parscale_jax.evaluate import Batch, cross_entropy_sums, model_logits, target_log_probs, text_rows
from parscale_jax.files import write_atomic
from parscale_jax.inference.generate import Decoding, Generator, decode_loop, encode_prompts, sample, \
    show_continuations
from parscale_jax.layout import Layout
from parscale_jax.model import (ParScaleParam, attention_mask, merge_params, model_graphdef, prefix_slots,
                                split_params)
from parscale_jax.runs import Run

WEIGHTINGS = ("posterior", "uniform", "fixed:w1,w2,...")

# ---------------------------------------------------------------------------------------------
# The weights, and the mixture


@dataclasses.dataclass(frozen=True)
class Weighting:
    """How the experts are weighted: `posterior` (from `prior`, updated by the document so far),
    `uniform`, or `fixed` (`weights`, normalized)."""

    kind: str
    weights: tuple[float, ...] = ()

    def log_base(self, experts: int, prior: np.ndarray | None = None) -> np.ndarray:
        """The log-weights `[J]` every document starts from: the prior, the equal or the fixed weights."""
        if self.kind == "fixed":
            w = np.asarray(self.weights, np.float64)
        elif self.kind == "posterior" and prior is not None:
            w = np.asarray(prior, np.float64)
        else:
            w = np.ones(experts)
        with np.errstate(divide="ignore"):
            return np.log(w / w.sum()).astype(np.float32)


def parse_weighting(text: str, experts: int) -> Weighting:
    """`posterior`, `uniform` or `fixed:w1,...,wJ` (J = the number of experts, weights >= 0, not all 0)."""
    if text in ("posterior", "uniform"):
        return Weighting(text)
    if not text.startswith("fixed:"):
        raise ConfigError("--weighting", f"expected one of {', '.join(WEIGHTINGS)}, got '{text}'")
    try:
        weights = tuple(float(w) for w in text.removeprefix("fixed:").split(","))
    except ValueError:
        raise ConfigError("--weighting", f"expected fixed:w1,w2,... with numbers, got '{text}'") from None
    if len(weights) != experts:
        raise ConfigError("--weighting", f"{len(weights)} fixed weights for {experts} experts")
    if min(weights) < 0 or not sum(weights) > 0 or not all(np.isfinite(weights)):
        raise ConfigError("--weighting", f"fixed weights must be finite, >= 0 and not all 0, got '{text}'")
    return Weighting("fixed", weights)


def segment_starts(segment_ids_BS: jax.Array) -> jax.Array:
    """Where a packed row's documents start `[B, S]`: the row's first position and every change of segment."""
    changes_BS = segment_ids_BS[:, 1:] != segment_ids_BS[:, :-1]
    return jnp.concatenate([jnp.ones_like(changes_BS[:, :1]), changes_BS], axis=1)


def posterior_log_weights(log_prior_J: jax.Array, log_probs_JBS: jax.Array, loss_mask_BS: jax.Array,
                          segment_ids_BS: jax.Array) -> jax.Array:
    """log w_j(t) `[J, B, S]`: log prior_j + sum over the earlier positions s < t of the same document of
    log p_j(target_s) (only targets inside the document count: the loss mask), normalized over j."""
    seen_JBS = jnp.where(loss_mask_BS > 0, log_probs_JBS, 0.0)
    starts_BS = segment_starts(segment_ids_BS)
    starts_JBS = jnp.broadcast_to(starts_BS, seen_JBS.shape)

    def add(a, b):  # a segmented sum: a start discards what came before it
        (x, start_x), (y, start_y) = a, b
        return jnp.where(start_y, y, x + y), start_x | start_y

    through_JBS, _ = jax.lax.associative_scan(add, (seen_JBS, starts_JBS), axis=-1)
    before_JBS = jnp.where(starts_JBS, 0.0, jnp.roll(through_JBS, 1, axis=-1))  # sums over s < t
    return jax.nn.log_softmax(log_prior_J[:, None, None] + before_JBS, axis=0)


def mixture_log_probs(log_weights_JBS: jax.Array, log_probs_JBS: jax.Array) -> jax.Array:
    """log sum_j w_j p_j: the mixture of the experts' probabilities (any trailing shape)."""
    return jax.nn.logsumexp(log_weights_JBS + log_probs_JBS, axis=0)


def ensemble_log_probs(log_probs_JBS: jax.Array, batch: Batch, log_base_J: jax.Array,
                       posterior: bool) -> tuple[jax.Array, jax.Array]:
    """(the mixture's log p(target) `[B, S]`, the log-weights `[J, B, S]`) from each expert's."""
    if posterior:
        log_w_JBS = posterior_log_weights(log_base_J, log_probs_JBS, batch["loss_mask"], batch["segment_ids"])
    else:
        log_w_JBS = jnp.broadcast_to(jax.nn.log_softmax(log_base_J)[:, None, None], log_probs_JBS.shape)
    return mixture_log_probs(log_w_JBS, log_probs_JBS), log_w_JBS


@functools.partial(jax.jit, static_argnames="posterior")
def ensemble_sums(log_probs_JBS: jax.Array, batch: Batch, log_base_J: jax.Array, posterior: bool):
    """(the mixture's summed cross-entropy, the number of target tokens, each expert's summed
    cross-entropy `[J]`, the weights `[J, B, S]`)."""
    log_p_BS, log_w_JBS = ensemble_log_probs(log_probs_JBS, batch, log_base_J, posterior)
    ce, n = cross_entropy_sums(log_p_BS, batch["loss_mask"])
    expert_ce_J = jax.vmap(lambda lp: cross_entropy_sums(lp, batch["loss_mask"])[0])(log_probs_JBS)
    return ce, n, expert_ce_J, jnp.exp(log_w_JBS)


# ---------------------------------------------------------------------------------------------
# The experts


@dataclasses.dataclass
class Expert:
    """One run of an ensemble at its newest checkpoint, on its own mesh."""

    path: str
    run: Run
    layout: Layout
    params: dict
    step: int
    shared: StreamSets | None = None  # this expert's stream set and its siblings' on one backbone

    @property
    def graphdef(self) -> nnx.GraphDef:
        return model_graphdef(self.run.config.model)

    @functools.cached_property
    def log_probs(self) -> Callable[[dict[str, np.ndarray]], jax.Array]:
        """log p(target) `[B, S]` of this expert on a host batch (placed on its mesh), compiled once."""
        graphdef, layout = self.graphdef, self.layout
        shardings = jax.tree.map(lambda x: x.sharding, self.params)
        step = jax.jit(lambda params, batch: target_log_probs(model_logits(params, graphdef, batch)[0],
                                                              batch["targets"])[0],
                       in_shardings=(shardings, layout.batch_sharding()), out_shardings=layout.replicated())

        def log_probs(batch: dict[str, np.ndarray]) -> jax.Array:
            rows = len(batch["tokens"])
            with jax.set_mesh(layout.mesh):
                return step(self.params, next(layout.placed([batch], rows)))

        return log_probs


@dataclasses.dataclass
class StreamSets:
    """Stream-level experts (`branch --streams-only`): J stream sets (prefixes and aggregator) trained
    on one frozen backbone. One pass of the backbone runs every set's streams side by side, J·P
    streams on the stream axis; each set's aggregator then mixes its own P streams. What is held is
    one backbone and J stream sets: `load_experts` gives every expert the first one's backbone."""

    experts: list[Expert]
    backbone: dict
    sets: list[dict]

    @classmethod
    def of(cls, experts: Sequence[Expert]) -> StreamSets | None:
        """The experts as stream sets on one backbone, or None when they are not (other shapes, a
        trained backbone, backbones that differ)."""
        cfg = experts[0].run.config.model
        if len(experts) < 2 or cfg.parscale_n < 2 or any(
                e.run.config.train.trainable != "parscale" or e.run.config.model != cfg for e in experts):
            return None
        parts = [split_params(e.params, cfg) for e in experts]
        backbone = parts[0][1]
        same = all(all(a is b or np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                       zip(jax.tree.leaves(backbone), jax.tree.leaves(other))) for _, other in parts[1:])
        return cls(list(experts), backbone, [streams for streams, _ in parts]) if same else None

    @functools.cached_property
    def log_probs(self) -> Callable[[dict[str, np.ndarray]], jax.Array]:
        """log p(target) `[J, B, S]` of every set on a host batch, from one pass of the backbone."""
        cfg, layout = self.experts[0].run.config.model, self.experts[0].layout
        graphdef, P = model_graphdef(cfg), cfg.parscale_n

        def all_sets(backbone, sets, batch):
            models = [nnx.merge(graphdef, nnx.State(merge_params(backbone, streams))) for streams in sets]
            side_by_side = jax.tree.map(lambda *prefixes: jnp.concatenate(prefixes, axis=1),  # the stream axis
                                        *[nnx.split(model.layers, ParScaleParam, ...)[1] for model in models])
            mask = attention_mask(batch["segment_ids"], prefix_slots(cfg))
            h_XBSD, _, _ = models[0].hidden_streams(batch["tokens"], batch["positions"], mask,
                                                    prefix_state=side_by_side)  # X: J·P streams
            log_probs = []
            for j, model in enumerate(models):
                h_BSD, _ = model.aggregate(h_XBSD[j * P:(j + 1) * P])
                log_probs.append(target_log_probs(model.lm_logits(h_BSD).astype(jnp.float32), batch["targets"])[0])
            return jnp.stack(log_probs)

        shardings = jax.tree.map(lambda x: x.sharding, (self.backbone, self.sets))
        step = jax.jit(all_sets, in_shardings=(*shardings, layout.batch_sharding()), out_shardings=layout.replicated())

        def log_probs(batch: dict[str, np.ndarray]) -> jax.Array:
            with jax.set_mesh(layout.mesh):
                return step(self.backbone, self.sets, next(layout.placed([batch], len(batch["tokens"]))))

        return log_probs


def held_bytes(experts: Sequence[Expert]) -> int:
    """Bytes of the parameters an ensemble holds (an array shared by several experts counted once)."""
    arrays = {id(x): x for e in experts for x in jax.tree.leaves(e.params)}
    return sum(x.nbytes for x in arrays.values())


def open_runs(paths: Sequence[str], overrides: Sequence[str] = (), what: str = "eval") -> list[Run]:
    """The runs of `--ensemble` (each under `overrides`), checked to share a tokenizer and vocabulary."""
    if not paths:
        raise ConfigError("--ensemble", "name at least one run directory (RUN1,RUN2,...)")
    for path in paths:
        if not (Path(path) / "config.yaml").is_file():
            raise ConfigError("--ensemble", f"{path} is not a run directory (it holds no config.yaml)")
    runs = [Run.open(path, list(overrides)).settled(None, what) for path in paths]
    check_same_vocabulary(dict(zip(paths, runs)))
    return runs


def check_same_vocabulary(runs: dict[str, Run]) -> None:
    """Every run reads text with the same tokenizer into the same vocabulary; else a ConfigError
    naming the first difference."""
    (first, reference), *others = runs.items()
    ref_data, ref_tokenizer = reference.config.data, tokenizer_sha256(reference.config.data.tokenizer)
    for name, run in others:
        data = run.config.data
        if tokenizer_sha256(data.tokenizer) != ref_tokenizer:
            raise ConfigError("--ensemble", f"{name} uses tokenizer {data.tokenizer} but {first} uses "
                              f"{ref_data.tokenizer}: an ensemble's runs must share one")
        if run.config.model.vocab_size != reference.config.model.vocab_size:
            raise ConfigError("--ensemble", f"{name} has model.vocab_size {run.config.model.vocab_size} but "
                              f"{first} has {reference.config.model.vocab_size}: an ensemble's runs must share one")


def load_experts(paths: Sequence[str], runs: Sequence[Run]) -> list[Expert]:
    """The runs (from `open_runs`) at their newest checkpoints, each on its own mesh."""
    experts = []
    for path, run in zip(paths, runs):
        layout = Layout.create(run.config)
        with jax.set_mesh(layout.mesh):
            params, step = run.params(layout)
        experts.append(Expert(str(path), run, layout, params, step))
    shared = StreamSets.of(experts)
    if shared is not None:  # keep one copy of the backbone
        for expert, streams in zip(experts, shared.sets):
            expert.params, expert.shared = merge_params(shared.backbone, streams), shared
    return experts


def expert_log_probs(experts: Sequence[Expert], batches: Iterable[dict[str, np.ndarray]]):
    """(host batch, its log p(target) under every expert `[J, B, S]`) for each batch: stream sets on
    one backbone in one pass of it (`StreamSets`), other experts each on its own."""
    shared = experts[0].shared
    for batch in batches:
        if shared is not None:
            yield batch, jnp.asarray(np.asarray(shared.log_probs(batch)))
        else:
            yield batch, jnp.stack([jnp.asarray(np.asarray(expert.log_probs(batch))) for expert in experts])


def estimate_prior(experts: Sequence[Expert], rows: Rows, batch_size: int) -> np.ndarray:
    """BTM's cached prior `[J]`: the mean over the sequences of `rows` (each document of each row)
    of the experts' posterior after the whole sequence, from a uniform prior."""
    finals = []
    for batch, log_probs_JBS in expert_log_probs(experts, batches_of(rows, batch_size)):
        log_probs_JBS = np.asarray(log_probs_JBS, np.float64)
        for b, segments_S in enumerate(batch["segment_ids"]):
            for segment in np.unique(segments_S[segments_S > 0]):
                counted_S = (segments_S == segment) & (batch["loss_mask"][b] > 0)
                if counted_S.any():
                    total_J = log_probs_JBS[:, b, counted_S].sum(axis=-1)
                    finals.append(np.exp(total_J - np.logaddexp.reduce(total_J)))
    if not finals:
        raise DataError("--prior-text: the text holds no target tokens")
    return np.mean(finals, axis=0)


# ---------------------------------------------------------------------------------------------
# Evaluation


def save_weights(path: str | Path, weights_RSJ: np.ndarray, experts: Sequence[str], weighting: str,
                 loss_mask_RS: np.ndarray | None = None) -> None:
    """The per-position weights: `.npy` (`[rows, positions, experts]`) or JSON (with the experts, the
    weighting and, for an evaluation, the loss mask: which positions have a target that counts)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, weights_RSJ.astype(np.float32))
        return
    record = {"experts": list(experts), "weighting": weighting, "shape": ["rows", "positions", "experts"],
              "weights": np.round(weights_RSJ.astype(np.float64), 6).tolist()}
    if loss_mask_RS is not None:
        record["loss_mask"] = loss_mask_RS.astype(int).tolist()
    write_atomic(path, json.dumps(record) + "\n")


def evaluate_ensemble(paths: Sequence[str], weighting: str = "posterior", text: str | None = None,
                      limit: int = 0, prior_text: str | None = None, weights_out: str | None = None,
                      overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The ensemble's mean loss on a text file, or the first run's held-out split, with each expert's
    own loss on the same rows and the mean weights over the target tokens; `weights_out` gets the
    weights at every position."""
    runs = open_runs(paths, overrides)
    how = parse_weighting(weighting, len(runs))
    if prior_text is not None and how.kind != "posterior":
        raise ConfigError("--prior-text", f"a prior is what the posterior weighting starts from, not '{weighting}'")
    first = runs[0].config
    rows = text_rows(runs[0], text) if text else None
    prior_rows = text_rows(runs[0], prior_text) if prior_text else None
    batches = pipeline.eval_batches(first, rows, limit)  # a bad corpus fails before the weights are read
    experts = load_experts(paths, runs)
    prior = estimate_prior(experts, prior_rows, first.train.batch_size) if prior_rows is not None else None
    log_base_J = jnp.asarray(how.log_base(len(experts), prior))
    ce_total, n_total, expert_ce_J, weight_sums_J = 0.0, 0.0, np.zeros(len(experts)), np.zeros(len(experts))
    kept_weights, kept_masks = [], []
    for batch, log_probs_JBS in expert_log_probs(experts, batches):
        ce, n, ce_J, weights_JBS = ensemble_sums(log_probs_JBS, batch, log_base_J, posterior=how.kind == "posterior")
        ce_total, n_total = ce_total + float(ce), n_total + float(n)
        expert_ce_J += np.asarray(ce_J, np.float64)
        weights_JBS = np.asarray(weights_JBS)
        weight_sums_J += (weights_JBS * (batch["loss_mask"] > 0)).sum(axis=(1, 2))
        if weights_out is not None:
            real_B = batch["segment_ids"][:, 0] > 0  # not the all-padding rows that fill the last batch
            kept_weights.append(weights_JBS.transpose(1, 2, 0)[real_B])
            kept_masks.append(batch["loss_mask"][real_B])
    if n_total == 0:
        raise DataError("the evaluation data holds no target tokens")
    if weights_out is not None:
        save_weights(weights_out, np.concatenate(kept_weights), [e.path for e in experts], weighting,
                     np.concatenate(kept_masks))
    return {"loss": ce_total / n_total, "target_tokens": int(n_total), "weighting": weighting,
            "prior": None if prior is None else [float(p) for p in prior],
            "mean_weights": [float(w) for w in weight_sums_J / n_total],
            "one_backbone": experts[0].shared is not None, "held_bytes": held_bytes(experts),
            "experts": [{"run_dir": e.path, "step": e.step, "loss": float(ce / n_total)}
                        for e, ce in zip(experts, expert_ce_J)]}


# ---------------------------------------------------------------------------------------------
# Generation


@functools.partial(jax.jit, static_argnames="sampling")
def mixture_step(log_w_JB: jax.Array, logits_JBV: jax.Array, key: jax.Array, sampling: SamplingConfig):
    """(the next tokens `[B]`, sampled from the mixture, its log-probabilities `[B, V]`, the normalized
    log-weights `[J, B]`, each expert's log-probabilities `[J, B, V]`)."""
    log_p_JBV = jax.nn.log_softmax(logits_JBV.astype(jnp.float32), axis=-1)
    log_w_JB = jax.nn.log_softmax(log_w_JB, axis=0)
    mix_BV = mixture_log_probs(log_w_JB[:, :, None], log_p_JBV)
    return sample(mix_BV, key, sampling), mix_BV, log_w_JB, log_p_JBV


@jax.jit
def posterior_update(log_w_JB: jax.Array, log_p_JBV: jax.Array, token_B: jax.Array) -> jax.Array:
    """The log-weights after each expert's log-probability of the chosen tokens."""
    return log_w_JB + jnp.take_along_axis(log_p_JBV, token_B[None, :, None], axis=-1)[..., 0]


class EnsembleDecoding:
    """One batch of prompts continued by the mixture of several experts, each with its own cache (a
    `generate.Decoding`): `advance` as a `Decoding`'s, for `generate.decode_loop`. `weights` holds the
    weights each step's token was drawn with, `[B, J]` per step."""

    def __init__(self, experts: Sequence[Expert], decodings: Sequence[Decoding], log_base_J: np.ndarray,
                 posterior: bool, sampling: SamplingConfig):
        self.experts, self.decodings, self.posterior, self.sampling = experts, decodings, posterior, sampling
        self.log_base_J = jnp.asarray(log_base_J)
        self.log_w_JB: jax.Array | None = None
        self.log_p_JBV: jax.Array | None = None
        self.weights: list[np.ndarray] = []

    def advance(self, token_B: np.ndarray | None, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = []
        for expert, decoding in zip(self.experts, self.decodings):
            with jax.set_mesh(expert.layout.mesh):
                logits.append(np.asarray(decoding.advance(token_B, key)[1]))
        if token_B is None:  # the prior, and under the posterior weighting the prompt's evidence
            B = len(self.decodings[0].tokens_BS)
            log_w_JB = jnp.broadcast_to(self.log_base_J[:, None], (len(logits), B))
            if self.posterior:
                log_w_JB = log_w_JB + jnp.stack([np.asarray(d.prompt_log_probs).sum(axis=1) for d in self.decodings])
        elif self.posterior:
            log_w_JB = posterior_update(self.log_w_JB, self.log_p_JBV, jnp.asarray(token_B))
        else:
            log_w_JB = self.log_w_JB
        token_B, mix_BV, self.log_w_JB, self.log_p_JBV = mixture_step(log_w_JB, jnp.stack(logits), key, self.sampling)
        self.weights.append(np.exp(np.asarray(self.log_w_JB)).T)
        return token_B, mix_BV


def generate_ensemble_text(paths: Sequence[str], texts: list[str], sampling: SamplingConfig,
                           show: Callable[[str], None], weighting: str = "posterior", prior_text: str | None = None,
                           weights_out: str | None = None, overrides: Sequence[str] = ()) -> None:
    """`generate.generate_text` with the ensemble of `paths` as the model; `weights_out` gets the
    weights every generated token was drawn with (`[prompts, tokens, experts]`)."""
    runs = open_runs(paths, overrides, "generate")
    how = parse_weighting(weighting, len(runs))
    if prior_text is not None and how.kind != "posterior":
        raise ConfigError("--prior-text", f"a prior is what the posterior weighting starts from, not '{weighting}'")
    tokenizer = load_tokenizer(runs[0].config.data)
    limit = min(run.config.model.max_position_embeddings for run in runs)
    prompts, max_len = encode_prompts(tokenizer, texts, sampling, limit)
    prior_rows = text_rows(runs[0], prior_text) if prior_text else None
    experts = load_experts(paths, runs)
    prior = estimate_prior(experts, prior_rows, runs[0].config.train.batch_size) if prior_rows is not None else None
    log_base_J = how.log_base(len(experts), prior)
    own_pick = dataclasses.replace(sampling, temperature=0.0, top_k=0, top_p=1.0)  # each expert's is not used
    generators = []
    for expert in experts:
        with jax.set_mesh(expert.layout.mesh):
            generators.append(Generator(expert.graphdef, expert.run.config.model, expert.layout, len(prompts), max_len,
                                        own_pick, score_prompt=how.kind == "posterior"))
    drawn = []

    def run_prompts(prompts, stop_ids, on_tokens):
        decodings = [g.start(e.params, prompts) for g, e in zip(generators, experts)]
        mixture = EnsembleDecoding(experts, decodings, log_base_J, how.kind == "posterior", sampling)
        outputs, _ = decode_loop(mixture.advance, decodings[0].new_tokens, sampling.seed, stop_ids, on_tokens)
        drawn.append(np.stack(mixture.weights, axis=1))
        return outputs

    show_continuations(run_prompts, tokenizer, texts, prompts, show)
    if weights_out is not None:
        save_weights(weights_out, drawn[0], [e.path for e in experts], weighting)
