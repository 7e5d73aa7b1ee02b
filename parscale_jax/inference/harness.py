"""Downstream tasks through the EleutherAI lm-evaluation-harness (`lm_eval`, the optional extra
`eval`): a run as one of the harness's models, and `parscale-jax eval --tasks`.

`HarnessModel` is an `lm_eval` model (registered as `parscale`, so `lm_eval --model parscale
--model_args run_dir=RUN` works once this module is imported) that answers the harness's three kinds
of request from a `Scorer`:

- `loglikelihood` (context, continuation) -> (log p(continuation | context), whether every
  continuation token is the argmax): the pair is tokenized as the harness's own `hf` model does it
  (`TemplateLM`: the whole text, then split where the context's tokens end; trailing spaces of the
  context go to the continuation; an empty context is the prefix token), cut from the left to the
  model's length;
- `loglikelihood_rolling` (a text) -> its log-likelihood, in disjoint windows of the model's length
  (the harness's `get_rolling_token_windows`, as `hf` does);
- `generate_until` (context, settings) -> greedy text, through the KV-cache generator
  (generate.py), cut at the first stop string.

A scorer gives the summed log-probability of each row's scored tokens, from
`evaluate.model_logits` and `evaluate.target_log_probs`: `RunScorer` is one run (any P, grown,
up-scaled, Mixture-of-Experts) at a checkpoint, on its own mesh; `EnsembleScorer` is several runs
as one model (inference/ensemble.py: `eval --ensemble RUN1,RUN2 --tasks ...`). Rows
are sorted by length, longest first, cut into batches of `batch_size` rows (the last filled with
empty rows) and right-padded to a few lengths (powers of 2), so a task compiles a handful of
programs. Rows are what the model trains on: positions from 0, segment 1 for the tokens, 0 for the
padding, which no token sees.

Tasks: the harness's own (which it downloads from the Hugging Face hub), the small local ones
shipped in `parscale_jax/tasks/` (always found), and those of `--include-path` folders.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from parscale_jax.errors import ConfigError

INSTALL = "needs the lm-evaluation-harness, an optional extra: install it with pip install 'parscale-jax[eval]'"

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:
    raise ConfigError("--tasks", INSTALL) from None

from parscale_jax.config import SamplingConfig
from parscale_jax.data.packing import Rows
from parscale_jax.data.tokenizer import Tokenizer, load_tokenizer
from parscale_jax.evaluate import model_logits, target_log_probs, text_rows
from parscale_jax.inference.ensemble import (EnsembleDecoding, Expert, ensemble_log_probs, estimate_prior,
                                             load_experts, mixture_log_probs, open_runs, parse_weighting)
from parscale_jax.inference.generate import Advance, Generator
from parscale_jax.layout import Layout
from parscale_jax.model import model_graphdef
from parscale_jax.model.config import ModelConfig
from parscale_jax.runs import Run
from parscale_jax.tasks import TASKS_DIR

MIN_BUCKET = 16  # the shortest padded row


def bucket(length: int, max_length: int) -> int:
    """The padded length of a row of `length` tokens: the next power of 2 (at least MIN_BUCKET), at most
    `max_length`."""
    return min(max_length, max(MIN_BUCKET, 1 << math.ceil(math.log2(max(length, 1)))))


def scoring_rows(sequences: Sequence[tuple[list[int], int]], length: int, batch: int) -> Rows:
    """`batch` rows of `length` from (tokens, n): inputs `tokens[:-1]`, targets `tokens[1:]`, the last
    n targets scored (loss_mask 1); padding after them (segment 0), and empty rows after the last."""
    rows = {key: np.zeros((batch, length), np.int32) for key in ("tokens", "targets", "segment_ids", "positions",
                                                                  "loss_mask")}
    for r, (tokens, scored) in enumerate(sequences):
        n = len(tokens) - 1
        rows["tokens"][r, :n] = tokens[:-1]
        rows["targets"][r, :n] = tokens[1:]
        rows["segment_ids"][r, :n] = 1
        rows["positions"][r, :n] = np.arange(n)
        rows["loss_mask"][r, n - scored:n] = 1
    return rows


# ---------------------------------------------------------------------------------------------
# Scorers: what answers the requests


class Scorer(Protocol):
    """What `HarnessModel` needs of a model: `RunScorer` is one run, `EnsembleScorer` several."""

    tokenizer: Tokenizer
    max_length: int  # positions a row may take
    step: int  # the checkpoint scored (what the results record)

    def describe(self) -> dict[str, Any]:
        """What the harness's results record of the model."""

    def rows_per_batch(self, batch_size: int) -> int:
        """The rows of each batch `score` gets, for `batch_size` asked."""

    def score(self, rows: Rows) -> tuple[np.ndarray, np.ndarray]:
        """(summed log p of each row's scored targets `[B]`, whether each of them is the argmax `[B]`)."""

    def generate(self, prompts: list[list[int]], max_new_tokens: int, pad_to: int,
                 done: Callable[[int, list[int]], bool]) -> list[list[int]]:
        """Greedy continuations of `prompts` (left-padded to `pad_to`), up to `max_new_tokens` each, until
        `done(row, tokens so far)` holds for every row."""


def greedy_until(advance: Advance, new_tokens: int, done: Callable[[int, list[int]], bool]) -> list[list[int]]:
    """Each row's greedy tokens from `advance` (a `generate.Decoding`'s or an ensemble's), up to
    `new_tokens`, until `done(row, tokens so far)` holds for every row (checked on the host each step)."""
    token_B, _ = advance(None, jax.random.key(0))  # greedy: the key is not used
    out: list[list[int]] = [[] for _ in range(len(np.asarray(token_B)))]
    finished = [False] * len(out)
    for step in range(new_tokens):
        for b, token in enumerate(np.asarray(token_B).tolist()):
            if not finished[b]:
                out[b].append(token)
                finished[b] = done(b, out[b])
        if all(finished) or step == new_tokens - 1:
            break
        token_B, _ = advance(np.asarray(token_B), jax.random.key(0))
    return out


class RunScorer:
    """One run at a checkpoint on its mesh: summed log-probabilities of rows, and greedy generation."""

    def __init__(self, run: Run, step: int | None = None, weights: tuple[dict, Layout, ModelConfig] | None = None):
        """`weights`: (parameters, the layout of the mesh they are on, their model) in memory instead of
        a checkpoint's, e.g. a training run's at `step` (whose model may have grown: training/loop.py;
        scoring needs only the mesh, generation lays its cache out for the model)."""
        if weights is None:
            run = run.settled(step, "eval")
            self.layout = Layout.create(run.config)
            with jax.set_mesh(self.layout.mesh):
                self.params, self.step = run.params(self.layout, step)
            model = run.config.model
        else:
            self.params, self.layout, model = weights
            self.step = step
        self.run, self.config = run, dataclasses.replace(run.config, model=model)
        self.tokenizer: Tokenizer = load_tokenizer(run.config.data)
        self.graphdef = model_graphdef(model)
        self.max_length = model.max_position_embeddings
        shardings = jax.tree.map(lambda x: x.sharding, self.params)

        def score(params, batch):
            logits_BSV, _ = model_logits(params, self.graphdef, batch)
            log_p_BS, _ = target_log_probs(logits_BSV, batch["targets"])
            scored_BS = batch["loss_mask"] > 0
            greedy_BS = jnp.argmax(logits_BSV, axis=-1) == batch["targets"]
            return jnp.sum(jnp.where(scored_BS, log_p_BS, 0.0), axis=-1), jnp.all(greedy_BS | ~scored_BS, axis=-1)

        self._score = jax.jit(score, in_shardings=(shardings, self.layout.batch_sharding()),
                              out_shardings=self.layout.replicated())
        self._generators: dict[tuple[int, int, int], Generator] = {}

    def describe(self) -> dict[str, Any]:
        return {"run_dir": str(self.run.directory), "step": self.step, "parscale_n": self.config.model.parscale_n,
                "tokenizer": str(self.config.data.tokenizer)}

    def rows_per_batch(self, batch_size: int) -> int:
        """`batch_size` rounded up to a multiple of the mesh's `data` axis."""
        data = self.layout.mesh.shape.get("data", 1)
        return -(-batch_size // data) * data

    def score(self, rows: Rows) -> tuple[np.ndarray, np.ndarray]:
        """(summed log p of each row's scored targets `[B]`, whether each of them is the argmax `[B]`)."""
        with jax.set_mesh(self.layout.mesh):
            log_p_B, greedy_B = self._score(self.params, next(self.layout.placed([rows], len(rows["tokens"]))))
        return np.asarray(log_p_B, np.float64), np.asarray(greedy_B)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, pad_to: int,
                 done: Callable[[int, list[int]], bool]) -> list[list[int]]:
        """Greedy continuations of `prompts` (left-padded to `pad_to`), up to `max_new_tokens` each, until
        `done(row, tokens so far)` holds for every row."""
        B, max_len = len(prompts), min(self.max_length, pad_to + max_new_tokens)
        key = (B, max_len, max_new_tokens)
        with jax.set_mesh(self.layout.mesh):
            if key not in self._generators:
                self._generators[key] = Generator(self.graphdef, self.config.model,
                                                  self.layout.for_model(self.config.model), B, max_len,
                                                  SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0))
            decoding = self._generators[key].start(self.params, prompts, pad_to)
            return greedy_until(decoding.advance, decoding.new_tokens, done)


# ---------------------------------------------------------------------------------------------
# An ensemble of runs (ensemble.py) as a scorer


def scored_positions(loss_mask_BS: jax.Array, K: int) -> jax.Array:
    """The positions `[B, K]` of each row's scored targets, in order, first K (after them: unscored ones)."""
    return jnp.argsort(loss_mask_BS <= 0, axis=-1, stable=True)[:, :K]


@functools.partial(jax.jit, static_argnames="posterior")
def mixture_scores(log_probs_JBS: jax.Array, log_p_JBKV: jax.Array, batch: dict[str, jax.Array],
                   log_base_J: jax.Array, posterior: bool) -> tuple[jax.Array, jax.Array]:
    """(summed mixture log p of each row's scored targets `[B]`, whether each of them is the argmax of the
    mixture over the vocabulary `[B]`) from each expert's log p(target) `[J, B, S]` and its log-probabilities
    over the vocabulary at the scored positions `[J, B, K, V]` (`scored_positions`). The posterior weights
    count every earlier token of the row as evidence, the context's too (not only the scored ones, which is
    what `loss_mask` marks): a row is one document."""
    evidence = {**batch, "loss_mask": (batch["segment_ids"] > 0).astype(jnp.int32)}
    log_p_BS, log_w_JBS = ensemble_log_probs(log_probs_JBS, evidence, log_base_J, posterior)
    scored_BS = batch["loss_mask"] > 0
    K = log_p_JBKV.shape[2]
    at_BK = scored_positions(batch["loss_mask"], K)
    counted_BK = jnp.arange(K)[None, :] < jnp.sum(scored_BS, axis=-1, keepdims=True)
    mixture_BKV = mixture_log_probs(jnp.take_along_axis(log_w_JBS, at_BK[None], axis=-1)[..., None], log_p_JBKV)
    greedy_BK = jnp.argmax(mixture_BKV, axis=-1) == jnp.take_along_axis(batch["targets"], at_BK, axis=-1)
    return jnp.sum(jnp.where(scored_BS, log_p_BS, 0.0), axis=-1), jnp.all(greedy_BK | ~counted_BK, axis=-1)


class EnsembleScorer:
    """Several runs as one model (`--ensemble RUN1,RUN2 --weighting ...`, inference/ensemble.py): the
    mixture of their next-token probabilities, each run at its newest checkpoint on its own mesh.

    `score`: each expert's log p(target) and, at the scored positions only, its log-probabilities over
    the vocabulary (one pass of each model, `evaluate.model_logits` and `evaluate.target_log_probs`);
    then on the host's default device the mixture (`ensemble.ensemble_log_probs`, the posterior weights
    reset at every row) and the argmax of the mixture over the vocabulary for the greedy flag.
    `generate`: greedy decoding from the mixture, one KV cache per expert (`ensemble.EnsembleDecoding`).
    Stream sets on one backbone (`branch --streams-only`) each run the backbone here."""

    def __init__(self, paths: Sequence[str], weighting: str = "posterior", overrides: Sequence[str] = (),
                 prior_text: str | None = None):
        runs = open_runs(paths, overrides)
        self.weighting = weighting
        how = parse_weighting(weighting, len(runs))
        if prior_text is not None and how.kind != "posterior":
            raise ConfigError("--prior-text", f"a prior is what the posterior weighting starts from, not '{weighting}'")
        self.posterior = how.kind == "posterior"
        self.tokenizer: Tokenizer = load_tokenizer(runs[0].config.data)
        prior_rows = text_rows(runs[0], prior_text) if prior_text else None
        self.experts: list[Expert] = load_experts([str(p) for p in paths], runs)
        self.prior = None if prior_rows is None else estimate_prior(self.experts, prior_rows,
                                                                    runs[0].config.train.batch_size)
        self.log_base_J = how.log_base(len(self.experts), self.prior)
        self.max_length = min(e.run.config.model.max_position_embeddings for e in self.experts)
        self.step = self.experts[0].step  # the first run's: `describe` has every run's
        self._steps: dict[tuple[int, int], Callable] = {}
        self._generators: dict[tuple[int, int, int], list[Generator]] = {}

    def describe(self) -> dict[str, Any]:
        return {"ensemble": [{"run_dir": e.path, "step": e.step, "parscale_n": e.run.config.model.parscale_n}
                             for e in self.experts],
                "weighting": self.weighting, "prior": None if self.prior is None else [float(p) for p in self.prior],
                "tokenizer": str(self.experts[0].run.config.data.tokenizer)}

    def rows_per_batch(self, batch_size: int) -> int:
        """`batch_size` rounded up to a multiple of every expert's mesh's `data` axis."""
        data = math.lcm(*(e.layout.mesh.shape.get("data", 1) for e in self.experts))
        return -(-batch_size // data) * data

    def _expert_step(self, j: int, K: int) -> Callable:
        """Expert j's (log p(target) `[B, S]`, log-probabilities over the vocabulary at the K scored
        positions `[B, K, V]`) on a placed batch, compiled once per K."""
        if (j, K) not in self._steps:
            expert = self.experts[j]
            graphdef, layout = expert.graphdef, expert.layout

            def step(params, batch):
                logits_BSV, _ = model_logits(params, graphdef, batch)
                log_p_BS, log_z_BS = target_log_probs(logits_BSV, batch["targets"])
                at_BK = scored_positions(batch["loss_mask"], K)
                log_p_BKV = (jnp.take_along_axis(logits_BSV, at_BK[..., None], axis=1)
                             - jnp.take_along_axis(log_z_BS, at_BK, axis=1)[..., None])
                return log_p_BS, log_p_BKV

            shardings = jax.tree.map(lambda x: x.sharding, expert.params)
            self._steps[j, K] = jax.jit(step, in_shardings=(shardings, layout.batch_sharding()),
                                        out_shardings=layout.replicated())
        return self._steps[j, K]

    def score(self, rows: Rows) -> tuple[np.ndarray, np.ndarray]:
        """(summed mixture log p of each row's scored targets `[B]`, whether each is the mixture's argmax `[B]`)."""
        K = bucket(int((rows["loss_mask"] > 0).sum(axis=1).max()), rows["loss_mask"].shape[1])
        log_probs, log_p_vocab = [], []
        for j, expert in enumerate(self.experts):
            with jax.set_mesh(expert.layout.mesh):
                log_p_BS, log_p_BKV = self._expert_step(j, K)(
                    expert.params, next(expert.layout.placed([rows], len(rows["tokens"]))))
            log_probs.append(np.asarray(log_p_BS))
            log_p_vocab.append(np.asarray(log_p_BKV))
        log_p_B, greedy_B = mixture_scores(np.stack(log_probs), np.stack(log_p_vocab), dict(rows),
                                           jnp.asarray(self.log_base_J), self.posterior)
        return np.asarray(log_p_B, np.float64), np.asarray(greedy_B)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, pad_to: int,
                 done: Callable[[int, list[int]], bool]) -> list[list[int]]:
        """Greedy continuations of `prompts` by the mixture (left-padded to `pad_to`), up to `max_new_tokens`
        each, until `done(row, tokens so far)` holds for every row."""
        B, max_len = len(prompts), min(self.max_length, pad_to + max_new_tokens)
        greedy = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
        key = (B, max_len, max_new_tokens)
        if key not in self._generators:
            self._generators[key] = []
            for expert in self.experts:
                with jax.set_mesh(expert.layout.mesh):
                    self._generators[key].append(Generator(expert.graphdef, expert.run.config.model, expert.layout,
                                                           B, max_len, greedy, score_prompt=self.posterior))
        decodings = [g.start(e.params, prompts, pad_to) for g, e in zip(self._generators[key], self.experts)]
        mixture = EnsembleDecoding(self.experts, decodings, self.log_base_J, self.posterior, greedy)
        return greedy_until(mixture.advance, decodings[0].new_tokens, done)


# ---------------------------------------------------------------------------------------------
# The harness's model


@register_model("parscale")
class HarnessModel(TemplateLM):
    """A `Scorer` as a model of the lm-evaluation-harness (see the module's docstring).

    `lm_eval --model parscale --model_args run_dir=RUN[,step=N,batch_size=16,max_length=N,...]`, or
    `HarnessModel(scorer=...)` from code. `prefix_token_id`: what an empty context and the first
    rolling window start from (default: the tokenizer's end-of-text token, as the run's documents
    are separated in training)."""

    def __init__(self, run_dir: str | None = None, step: int | None = None, batch_size: int | str = 16,
                 max_length: int | None = None, max_gen_toks: int = 256, prefix_token_id: int | None = None,
                 scorer: Scorer | None = None, **_ignored: Any):
        super().__init__()
        if scorer is None:
            if run_dir is None:
                raise ConfigError("run_dir", "the parscale model needs run_dir=RUN")
            scorer = RunScorer(Run.open(run_dir), None if step is None else int(step))
        self.scorer = scorer
        self._tokenizer = scorer.tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto": our default
        self.rows = scorer.rows_per_batch(self.batch_size)
        self._max_length = int(max_length or scorer.max_length)
        self.max_gen_toks = int(max_gen_toks)
        eos = self._tokenizer.eos_id
        self._prefix = int(prefix_token_id) if prefix_token_id is not None else eos
        if self._prefix is None:
            raise ConfigError("prefix_token_id", "the run's tokenizer has no end-of-text token: name the token an "
                              "empty context starts from")

    # -- what TemplateLM asks

    @property
    def eot_token_id(self) -> int | None:
        return self._tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.scorer.describe().get("tokenizer", "parscale"))

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self._tokenizer.encode(string).tolist()  # our tokenizers add no special tokens

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self._tokenizer.decode(list(tokens))

    def get_model_info(self) -> dict[str, Any]:
        return self.scorer.describe()

    # -- scoring

    def score_sequences(self, sequences: Sequence[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """(log p, all greedy) of the last n tokens of each (tokens, n), given the ones before them:
        cut from the left to max_length + 1 tokens, batched longest first, padded to a few lengths."""
        cut = [(tokens[-(self.max_length + 1):], n) for tokens, n in sequences]
        order = sorted(range(len(cut)), key=lambda i: -len(cut[i][0]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(cut)
        for start in range(0, len(order), self.rows):
            chunk = order[start:start + self.rows]
            length = bucket(len(cut[chunk[0]][0]) - 1, self.max_length)
            log_p, greedy = self.scorer.score(scoring_rows([cut[i] for i in chunk], length, self.rows))
            for r, i in enumerate(chunk):
                results[i] = (float(log_p[r]), bool(greedy[r]))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        for _, context, continuation in requests:
            if not context or not continuation or len(continuation) > self.max_length:
                raise ValueError(f"cannot score a continuation of {len(continuation)} tokens after {len(context)} "
                                 f"within {self.max_length} positions")
        results = self.score_sequences([(context + continuation, len(continuation))
                                        for _, context, continuation in requests])
        for (strings, _, _), answer in zip(requests, results):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, predicted in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((context + predicted, len(predicted)))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (log_p, _) in zip(owners, self.score_sequences(windows)):
            totals[i] += log_p
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = None if self.eot_token_id is None else self.tok_decode([self.eot_token_id])
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):  # one batch settings at a time
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        results: list[str] = [""] * len(requests)
        for indices in groups.values():
            settings = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(settings.pop("until", None), eos=eos)
            max_new = int(settings.pop("max_gen_toks"))
            if settings.get("do_sample") or settings.get("temperature", 0.0) > 0:
                logging.getLogger(__name__).warning("generate_until: sampling settings ignored, decoding greedily")
            room = self.max_length - max_new
            if room < 1:
                raise ValueError(f"max_gen_toks {max_new} leaves no room for a context in {self.max_length} positions")
            prompts = {i: self.tok_encode(requests[i].args[0])[-room:] or [self.prefix_token_id] for i in indices}
            order = sorted(indices, key=lambda i: -len(prompts[i]))
            for start in range(0, len(order), self.rows):
                chunk = order[start:start + self.rows]
                batch = [prompts[i] for i in chunk]
                batch += [batch[-1]] * (self.rows - len(batch))  # filler rows, thrown away
                pad_to = min(room, bucket(len(batch[0]), self.max_length))

                def done(row: int, tokens: list[int]) -> bool:
                    return tokens[-1] == self.eot_token_id or any(s and s in self.tok_decode(tokens) for s in until)

                outputs = self.scorer.generate(batch, max_new, pad_to, done)
                for i, tokens in zip(chunk, outputs):
                    text = postprocess_generated_text(self.tok_decode(tokens), until, None)
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results


# ---------------------------------------------------------------------------------------------
# Tasks, and a whole evaluation


def check_task_files(folder: Path) -> None:
    """Every YAML file under `folder` parses as the harness reads it (it skips those that do not, in
    silence); else one line naming the file."""
    from lm_eval.tasks._yaml_loader import load_yaml

    if not folder.is_dir():
        raise ConfigError("--include-path", f"not a folder: {folder}")
    for path in sorted(folder.glob("**/*.yaml")):
        try:
            config = load_yaml(path, resolve_func=False, recursive=True)
        except Exception as err:  # the YAML parser's, or an include that is missing
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError("--include-path", f"{path} does not parse as a task file: {first}") from None
        if not isinstance(config, dict):
            raise ConfigError("--include-path", f"{path} does not parse as a task file: not a mapping")


@functools.lru_cache(maxsize=4)
def task_manager(include_paths: tuple[str, ...], defaults: bool):
    """The harness's task index over our tasks, `include_paths` and (with `defaults`) its own (a few
    seconds to build: kept for the process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(TASKS_DIR), *include_paths], include_defaults=defaults)


def resolve_tasks(names: Sequence[str], include_paths: Sequence[str] = ()):
    """The task manager that knows every name in `names` (our tasks and `include_paths` alone when they
    suffice; else the harness's too), or a ConfigError naming the unknown ones and close names."""
    for folder in include_paths:
        check_task_files(Path(folder))
    paths = tuple(str(Path(p).absolute()) for p in include_paths)

    def unknown(manager) -> list[str]:
        return [n for n in names if n not in manager.all_tasks and not (n.endswith(".yaml") and Path(n).is_file())]

    manager = task_manager(paths, False)
    if not unknown(manager):
        return manager
    manager = task_manager(paths, True)
    missing = unknown(manager)
    if missing:
        hints = []
        for name in missing:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
            hints.append(f"'{name}'" + (f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""))
        raise ConfigError("--tasks", f"unknown task {', '.join(hints)}; the harness's `lm-eval ls tasks` lists them, "
                          f"local ones: {', '.join(local_tasks())}")
    return manager


def local_tasks() -> list[str]:
    """The names of the tasks shipped with the package."""
    return sorted(task_manager((), False).all_subtasks)


@dataclasses.dataclass(frozen=True)
class TaskScore:
    task: str
    metric: str  # with its filter when that is not the default: "exact_match,strict-match"
    value: float
    stderr: float | None


def scores_of(results: dict[str, Any]) -> list[TaskScore]:
    """Every (task, metric, value, stderr) of the harness's results."""
    scores = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            name = metric if filter_name == "none" else f"{metric},{filter_name}"
            scores.append(TaskScore(task, name, float(value),
                                    float(stderr) if isinstance(stderr, (int, float)) else None))
    return scores


def table(scores: Sequence[TaskScore]) -> str:
    """The scores as an aligned text table."""
    rows = [("task", "metric", "value", "stderr")] + [
        (s.task, s.metric, f"{s.value:.4f}", "" if s.stderr is None else f"{s.stderr:.4f}") for s in scores]
    widths = [max(len(row[c]) for row in rows) for c in range(4)]
    return "\n".join("  ".join(cell.ljust(w) if c < 2 else cell.rjust(w) for c, (cell, w) in
                               enumerate(zip(row, widths))).rstrip() for row in rows)


def evaluate_tasks(model: HarnessModel, names: Sequence[str], num_fewshot: int | None = None,
                   limit: float | None = None, include_paths: Sequence[str] = ()) -> dict[str, Any]:
    """The harness's evaluation of `model` on the tasks `names`: {"results", "versions", "n-shot",
    "n-samples", "higher_is_better", "scores": [{task, metric, value, stderr}]}."""
    from lm_eval import simple_evaluate

    manager = resolve_tasks(names, include_paths)
    out = simple_evaluate(model=model, tasks=list(names), num_fewshot=num_fewshot, limit=limit,
                          task_manager=manager, log_samples=False, torch_random_seed=None)
    keep = ("results", "versions", "n-shot", "n-samples", "higher_is_better")
    result = {key: out[key] for key in keep if key in out}
    result["scores"] = [dataclasses.asdict(s) for s in scores_of(out)]
    return result


def evaluate_run_tasks(run: Run, names: Sequence[str], num_fewshot: int | None = None, limit: float | None = None,
                       include_paths: Sequence[str] = (), batch_size: int = 16,
                       step: int | None = None) -> dict[str, Any]:
    """`evaluate_tasks` of a run at its newest checkpoint (or `step`)."""
    resolve_tasks(names, include_paths)  # a bad name fails before the weights load
    model = HarnessModel(scorer=RunScorer(run, step), batch_size=batch_size)
    result = evaluate_tasks(model, names, num_fewshot, limit, include_paths)
    return {"step": model.scorer.step, "tasks": list(names), "num_fewshot": num_fewshot, "limit": limit, **result}


def evaluate_ensemble_tasks(paths: Sequence[str], names: Sequence[str], num_fewshot: int | None = None,
                            limit: float | None = None, include_paths: Sequence[str] = (), batch_size: int = 16,
                            weighting: str = "posterior", overrides: Sequence[str] = (),
                            prior_text: str | None = None) -> dict[str, Any]:
    """`evaluate_tasks` of the ensemble of the runs `paths` (each at its newest checkpoint, under
    `overrides`), weighted by `weighting` (posterior, uniform, fixed:w1,...)."""
    resolve_tasks(names, include_paths)  # a bad name fails before the weights load
    scorer = EnsembleScorer(paths, weighting, overrides, prior_text)
    result = evaluate_tasks(HarnessModel(scorer=scorer, batch_size=batch_size), names, num_fewshot, limit,
                            include_paths)
    described = scorer.describe()
    return {"ensemble": described["ensemble"], "weighting": weighting, "prior": described["prior"],
            "tasks": list(names), "num_fewshot": num_fewshot, "limit": limit, **result}


class PeriodicTasks:
    """`train.eval_tasks` during training (training/loop.py): the tasks resolved once, before the first
    step (an unknown name fails then), and each evaluation scoring the loop's current weights. Each
    task is evaluated on its own; one that fails is reported once and stops nothing."""

    def __init__(self, run: Run):
        t = run.config.train
        self.run, self.names = run, list(t.eval_tasks)
        self.limit = None if t.eval_tasks_limit == 0 else int(t.eval_tasks_limit) if t.eval_tasks_limit >= 1 \
            else t.eval_tasks_limit
        try:
            resolve_tasks(self.names)
        except ConfigError as err:  # named by the setting, not by `eval`'s flag
            raise ConfigError("train.eval_tasks", str(err).removeprefix(f"{err.key}: ")) from None
        self.scorer: RunScorer | None = None
        self.reported: set[str] = set()
        logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its notes on every task it builds, at every evaluation

    def scores(self, step: int, params: dict, layout: Layout, model: ModelConfig,
               report: Callable[[str], None]) -> dict[str, float]:
        """{"tasks/<task>/<metric>": value} of `params` (a `model` on `layout`) after `step` updates."""
        if self.scorer is None or self.scorer.config.model != model:  # first, or the model grew
            self.scorer = RunScorer(self.run, step, (params, layout, model))
        self.scorer.params, self.scorer.step = params, step
        harness_model = HarnessModel(scorer=self.scorer)
        record = {}
        for name in self.names:
            try:
                scores = evaluate_tasks(harness_model, [name], limit=self.limit)["scores"]
            except Exception as err:  # a task's failure is the task's: training goes on
                if name not in self.reported:
                    self.reported.add(name)
                    report(f"step {step}: train.eval_tasks: {name} failed ({type(err).__name__}: {err}); training "
                           "goes on without it (reported once)")
                continue
            record.update({f"tasks/{s['task']}/{s['metric']}": s["value"] for s in scores})
        return record
