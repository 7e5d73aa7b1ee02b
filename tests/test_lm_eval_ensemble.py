"""An ensemble of runs through the lm-evaluation-harness adapter (`EnsembleScorer` in
inference/harness.py, `parscale-jax eval --ensemble RUN1,RUN2 --tasks ...`).

An ensemble of one run scores what the run scores; fixed weights 1,0 are the first run; the
posterior mixture of two runs is the one written out here from each run's per-token log-probabilities
(the weights reset at every request, the context counting as evidence); two runs go through the
command end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import step0_logits

from parscale_jax.cli import main
from parscale_jax.inference.harness import EnsembleScorer, HarnessModel, RunScorer, evaluate_tasks, scoring_rows
from parscale_jax.runs import Run

TOLERANCE = 1e-6


class Recording(HarnessModel):
    """A harness model that keeps every (log-likelihood, greedy) it answers, in the harness's order."""

    answers: list[tuple[float, bool]]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        answers = super()._loglikelihood_tokens(requests, disable_tqdm, **kwargs)
        self.answers = [*getattr(self, "answers", []), *answers]
        return answers


@pytest.fixture(scope="module")
def runs(dense_runs) -> list[Path]:
    """Two different tiny byte-level runs (conftest's): P = 2 and P = 1, 2 steps each."""
    return [dense_runs[2], dense_runs[1]]


def scored(scorer, tasks: list[str], limit: int) -> tuple[dict, np.ndarray, list[bool]]:
    model = Recording(scorer=scorer)
    results = evaluate_tasks(model, tasks, limit=limit)["results"]
    return results, np.array([a[0] for a in model.answers]), [a[1] for a in model.answers]


@pytest.fixture(scope="module")
def first_alone(runs) -> tuple[dict, np.ndarray, list[bool]]:
    return scored(RunScorer(Run.open(runs[0])), ["shakespeare_mc", "facts_gen"], 10)


def test_an_ensemble_of_one_run_scores_what_the_run_scores(runs, first_alone):
    results, log_likelihoods, greedy = scored(EnsembleScorer([str(runs[0])]), ["shakespeare_mc"], 10)
    alone, alone_ll, alone_greedy = first_alone
    assert len(log_likelihoods) == 40  # 10 questions, 4 choices
    print(f"one-run ensemble: max |difference| of log-likelihoods {np.abs(log_likelihoods - alone_ll[:40]).max():.2e}")
    np.testing.assert_allclose(log_likelihoods, alone_ll[:40], rtol=0, atol=TOLERANCE)
    assert greedy == alone_greedy[:40]
    assert results["shakespeare_mc"] == alone["shakespeare_mc"]


def test_fixed_weights_1_0_are_the_first_run(runs, first_alone):
    """Scoring and greedy generation (facts_gen) alike."""
    results, log_likelihoods, greedy = scored(EnsembleScorer([str(r) for r in runs], "fixed:1,0"),
                                              ["shakespeare_mc", "facts_gen"], 10)
    alone, alone_ll, alone_greedy = first_alone
    print(f"fixed:1,0: max |difference| of log-likelihoods {np.abs(log_likelihoods - alone_ll).max():.2e}")
    np.testing.assert_allclose(log_likelihoods, alone_ll, rtol=0, atol=TOLERANCE)
    assert greedy == alone_greedy
    assert results == alone


def test_the_posterior_mixture_is_written_out_here(runs):
    """Rows of a context and a scored continuation: the summed log-probability is the mixture's with
    weights proportional to prior_j * prod p_j(each earlier token of the row), context included; the
    greedy flag is whether every scored token is the mixture's argmax; and what the mixture generates
    greedily, scored after its prompt, is greedy."""
    scorer = EnsembleScorer([str(r) for r in runs], "posterior")
    sequences = [(list(b"\nTo be, or not to be"), 6), (list(b"\nAll the world's a stage"), 9), (list(b"\nab"), 1)]
    rows = scoring_rows(sequences, 32, scorer.rows_per_batch(4))
    log_p, greedy = scorer.score(rows)

    # Each expert's log-probabilities over the vocabulary at every position, from its logits.
    tokens = np.zeros((len(sequences), 32), np.int32)
    for r, (sequence, _) in enumerate(sequences):
        tokens[r, :len(sequence) - 1] = sequence[:-1]  # right of them: padding no earlier position sees
    logits = np.stack([step0_logits(run, tokens).astype(np.float64) for run in runs])  # [J, B, S, V]
    vocab = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    for r, (sequence, n) in enumerate(sequences):
        real = len(sequence) - 1
        targets = vocab[:, r, np.arange(real), sequence[1:]]  # [J, real]
        mixture, all_greedy = 0.0, True
        for t in range(real - n, real):
            log_w = np.log(0.5) + targets[:, :t].sum(axis=1)
            log_w -= np.logaddexp.reduce(log_w)
            mixture += np.logaddexp.reduce(log_w + targets[:, t])
            mixture_V = np.logaddexp.reduce(log_w[:, None] + vocab[:, r, t], axis=0)
            all_greedy &= int(np.argmax(mixture_V)) == sequence[t + 1]
        assert log_p[r] == pytest.approx(mixture, abs=1e-4)
        assert greedy[r] == all_greedy

    prompts = [list(b"\nTo be, or not"), list(b"\nAll the world")]
    generated = scorer.generate(prompts + [prompts[-1]] * (len(rows["tokens"]) - 2), 6, 16, lambda row, tokens: False)
    _, greedy = scorer.score(scoring_rows([(p + g, len(g)) for p, g in zip(prompts, generated)], 32,
                                          len(rows["tokens"])))
    assert [len(g) for g in generated[:2]] == [6, 6] and greedy[:2].all()


def test_two_runs_through_the_command(runs, tmp_path, capsys):
    """`eval --ensemble A,B --tasks`: the table, and the JSON with --out; bad weightings are one line."""
    ensemble = f"{runs[0]},{runs[1]}"
    assert main(["eval", "--ensemble", ensemble, "--tasks", "shakespeare_mc,facts_gen", "--limit", "10",
                 "--weighting", "uniform", "--out", str(tmp_path / "ensemble.json")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["task", "metric", "value", "stderr"]
    assert "shakespeare_mc  acc_norm" in out and "facts_gen       exact_match" in out
    written = json.loads((tmp_path / "ensemble.json").read_text())
    assert [e["run_dir"] for e in written["ensemble"]] == [str(r) for r in runs]
    assert written["weighting"] == "uniform" and written["n-samples"]["shakespeare_mc"]["effective"] == 10
    assert not list(runs[0].glob("eval_tasks_*.json"))  # an ensemble's result goes only to --out

    for args, message in ((["--weighting", "fixed:1"], "1 fixed weights for 2 experts"),
                          (["--weights-out", str(tmp_path / "w.npy")], "--weights-out: does not go with --tasks")):
        assert main(["eval", "--ensemble", ensemble, "--tasks", "shakespeare_mc", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err
