"""Ensembles of runs as one model (inference/ensemble.py): a mixture of probabilities, posterior
weights reset at document boundaries, the domain expert winning its domain, generation with one KV
cache per expert, and the command's one-line errors."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from conftest import TINY

from parscale_jax.cli import main
from parscale_jax.config import SamplingConfig, load_config
from parscale_jax.data.corpus import shakespeare_files
from parscale_jax.data.packing import pack_documents
from parscale_jax.data.tokenizer import ByteTokenizer
from parscale_jax.evaluate import evaluate_run, text_rows
from parscale_jax.inference.ensemble import (Weighting, ensemble_sums, evaluate_ensemble, load_experts, open_runs,
                                             posterior_log_weights)
from parscale_jax.inference.generate import Generator
from parscale_jax.runs import Run
from parscale_jax.training.loop import train
from parscale_jax.transforms.branch import BUILT_IN, branch, train_experts

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CODE_FILES = ("textwrap.py", "string.py", "bisect.py", "heapq.py", "functools.py", "fnmatch.py", "glob.py",
              "shlex.py", "queue.py", "copy.py")


@pytest.fixture(scope="module")
def domains(tmp_path_factory) -> dict[str, Path]:
    """Two tiny runs, one trained on Shakespeare and one on Python source from the standard library,
    and a text of each domain that neither trained on as such (a Python file outside the training
    folder; a stretch of a play)."""
    root = tmp_path_factory.mktemp("ensemble")
    source = root / "stdlib"
    source.mkdir()
    for name in CODE_FILES:  # `.txt`: the files corpus reads text files
        shutil.copy(STDLIB / name, source / f"{name}.txt")
    (root / "code.txt").write_text((STDLIB / "calendar.py").read_text()[:3000])
    (root / "play.txt").write_text(shakespeare_files()[-1].read_text()[5000:8000])
    (root / "mixed.txt").write_text("\n\n".join(text[i:i + 400] for i in range(0, 2000, 400)
                                                for text in ((root / "code.txt").read_text(),
                                                             (root / "play.txt").read_text())))
    # Branch-Train-Merge: a seed (a few steps on Shakespeare), then one expert per domain from it.
    train(load_config(overrides=[*TINY, "train.steps=10", "train.log_every=100"]), root / "seed", progress=False)
    branch(root / "seed", root / "btm", [f"shake={BUILT_IN}", f"python={source}"], ["train.steps=60"])
    train_experts(root / "btm", lambda config, run_dir: train(config, run_dir, progress=False))
    return {"shake": root / "btm" / "shake", "python": root / "btm" / "python", "seed": root / "seed",
            "code.txt": root / "code.txt", "play.txt": root / "play.txt", "mixed.txt": root / "mixed.txt",
            "root": root}


@pytest.mark.parametrize("weighting", ["posterior", "uniform", "fixed:2"])
def test_an_ensemble_of_one_run_is_the_run(domains, weighting):
    run = Run.open(domains["shake"])
    alone = evaluate_run(run, text_rows(run, str(domains["play.txt"])))
    together = evaluate_ensemble([str(domains["shake"])], weighting, str(domains["play.txt"]))
    assert together["target_tokens"] == alone["target_tokens"]
    assert abs(together["loss"] - alone["loss"]) < 1e-6
    assert together["experts"][0]["loss"] == pytest.approx(alone["loss"], abs=1e-6)
    assert together["mean_weights"] == pytest.approx([1.0])


@pytest.fixture(scope="module")
def packed_batch(domains):
    """Both experts' log p(target) `[J, B, S]` on rows of several packed documents (boundaries mid-row)."""
    tokenizer = ByteTokenizer()
    texts = [domains["code.txt"].read_text()[:45], domains["play.txt"].read_text()[:20],
             domains["play.txt"].read_text()[100:170], domains["code.txt"].read_text()[200:230]]
    rows = pack_documents([tokenizer.encode(t) for t in texts], 32, tokenizer.eos_id, keep_tail=True)
    batch = {key: np.pad(value, ((0, 8 - len(value)), (0, 0))) for key, value in rows.items()}  # a padded row too
    assert any(len(np.unique(s[s > 0])) > 1 for s in batch["segment_ids"])  # a boundary inside a row
    paths = [str(domains["shake"]), str(domains["python"])]
    experts = load_experts(paths, open_runs(paths))
    log_probs_JBS = np.stack([np.asarray(e.log_probs(batch)) for e in experts])
    return batch, log_probs_JBS


def test_the_mixture_is_of_probabilities(packed_batch):
    batch, log_probs_JBS = packed_batch
    weights = np.asarray([0.3, 0.7])
    ce, n, expert_ce_J, weights_JBS = ensemble_sums(jnp.asarray(log_probs_JBS), batch,
                                                    jnp.asarray(Weighting("fixed", (3, 7)).log_base(2)), False)
    by_hand_BS = np.log(np.einsum("j,jbs->bs", weights, np.exp(log_probs_JBS.astype(np.float64))))
    mask = batch["loss_mask"] > 0
    assert float(ce) == pytest.approx(-by_hand_BS[mask].sum(), rel=1e-6)
    assert int(n) == mask.sum()
    np.testing.assert_allclose(expert_ce_J, -(log_probs_JBS * mask).sum(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(weights_JBS, np.broadcast_to(weights[:, None, None], log_probs_JBS.shape), rtol=1e-6)
    averaged_logits = np.log(np.exp(log_probs_JBS).prod(axis=0) ** 0.5)  # not what the ensemble is
    assert not np.allclose(by_hand_BS[mask], averaged_logits[mask], atol=1e-3)


def test_posterior_weights_reset_at_every_document(packed_batch):
    batch, log_probs_JBS = packed_batch
    prior = np.asarray([0.25, 0.75])
    got = np.exp(np.asarray(posterior_log_weights(jnp.log(jnp.asarray(prior, jnp.float32)), jnp.asarray(log_probs_JBS),
                                                  batch["loss_mask"], batch["segment_ids"])))
    lp = log_probs_JBS.astype(np.float64)
    resets = 0
    for b in range(lp.shape[1]):
        for t in range(lp.shape[2]):
            if t == 0 or batch["segment_ids"][b, t] != batch["segment_ids"][b, t - 1]:
                evidence, resets = np.zeros(2), resets + (t > 0)
            log_w = np.log(prior) + evidence
            np.testing.assert_allclose(got[:, b, t], np.exp(log_w - np.logaddexp.reduce(log_w)), atol=2e-6)
            if batch["loss_mask"][b, t]:
                evidence = evidence + lp[:, b, t]
    assert resets >= 1  # and at every document's first position the weights were the prior again


@pytest.mark.parametrize("text,expert", [("code.txt", 1), ("play.txt", 0)])
def test_the_posterior_moves_to_the_domain_expert(domains, text, expert, tmp_path):
    paths = [str(domains["shake"]), str(domains["python"])]
    out = tmp_path / "weights.npy"
    posterior = evaluate_ensemble(paths, "posterior", str(domains[text]), weights_out=str(out))
    uniform = evaluate_ensemble(paths, "uniform", str(domains[text]))
    weights_RSJ = np.load(out)
    mine_RS = weights_RSJ[..., expert]
    print(text, "posterior", posterior, "uniform loss", uniform["loss"],
          "domain expert's mean weight by position", mine_RS.mean(axis=0)[::4].round(3))
    assert weights_RSJ.shape[1:] == (32, 2) and np.allclose(weights_RSJ.sum(axis=-1), 1, atol=1e-5)
    assert np.allclose(mine_RS[:, 0], 0.5)  # every row of the text starts from the prior
    assert mine_RS[:, 16:].mean() > 0.65 and mine_RS[:, -1].mean() > mine_RS[:, 4].mean() > 0.5
    assert posterior["mean_weights"][expert] > 0.6
    best = min(e["loss"] for e in posterior["experts"])
    assert posterior["experts"][expert]["loss"] == best
    assert posterior["loss"] < uniform["loss"] and posterior["loss"] < best + 0.01
    # A prior estimated on text of the domain leans to its expert.
    prior = evaluate_ensemble(paths, "posterior", str(domains[text]), prior_text=str(domains[text]))["prior"]
    print(text, "prior estimated on it", np.round(prior, 3))
    assert prior[expert] > 0.6


def test_experts_branched_from_a_seed_specialize_and_their_ensemble_beats_each(domains):
    """Each expert beats the seed on its own domain and loses to the other expert on the other's; on
    a text that alternates the two, the posterior ensemble is below every expert alone."""
    paths = {"shake": str(domains["shake"]), "python": str(domains["python"])}
    own = {"shake": "play.txt", "python": "code.txt"}
    loss = {}
    for name, path in {**paths, "seed": str(domains["seed"])}.items():
        run = Run.open(path)
        for text in ("play.txt", "code.txt"):
            loss[name, text] = evaluate_run(run, text_rows(run, str(domains[text])))["loss"]
    print({f"{name} on {text}": round(value, 4) for (name, text), value in loss.items()})
    for name, text in own.items():
        other = "python" if name == "shake" else "shake"
        assert loss[name, text] < loss["seed", text] and loss[name, text] < loss[other, text], (name, loss)
    mixed = evaluate_ensemble(list(paths.values()), "posterior", str(domains["mixed.txt"]))
    print("mixed text: ensemble", round(mixed["loss"], 4), "experts", [round(e["loss"], 4) for e in mixed["experts"]])
    assert mixed["loss"] < min(e["loss"] for e in mixed["experts"])


def test_generate_with_an_ensemble(domains, capsys, tmp_path):
    shake = str(domains["shake"])
    prompt = ["--prompt", "ROMEO:", "--max-new-tokens", "16"]
    assert main(["generate", "--run-dir", shake, *prompt]) == 0
    alone = capsys.readouterr().out
    assert main(["generate", "--ensemble", shake, *prompt]) == 0
    assert capsys.readouterr().out == alone
    weights = tmp_path / "weights.json"
    assert main(["generate", "--ensemble", f"{shake},{domains['python']}", *prompt, "--weights-out",
                 str(weights)]) == 0
    both = capsys.readouterr().out
    assert both.startswith("ROMEO:") and len(both) >= len("ROMEO:") + 16  # byte tokens: 16 more characters
    drawn = np.asarray(json.loads(weights.read_text())["weights"])
    assert drawn.shape[0] == 1 and drawn.shape[2] == 2 and np.allclose(drawn.sum(axis=-1), 1, atol=1e-5)
    assert drawn[0, 0, 0] > 0.5  # the prompt's evidence already counts: "ROMEO:" is Shakespeare's
    prompts = tmp_path / "prompts.txt"  # left-padded rows, each with its own posterior
    prompts.write_text("ROMEO:\n    def __init__(self, text):\n")
    assert main(["generate", "--ensemble", f"{shake},{domains['python']}", "--prompts", str(prompts),
                 "--max-new-tokens", "8", "--weights-out", str(tmp_path / "batch.npy")]) == 0
    assert capsys.readouterr().out.count("-" * 40) == 2
    drawn = np.load(tmp_path / "batch.npy")
    assert drawn.shape[0] == 2 and drawn[0, 0, 0] > 0.5 and drawn[1, 0, 1] > 0.5


def test_the_prefill_scores_left_padded_prompts_as_evaluation_does(domains):
    """What the posterior starts from in generation: log p(prompt token | the ones before it)."""
    (expert,) = load_experts([str(domains["shake"])], open_runs([str(domains["shake"])]))
    prompts = [ByteTokenizer().encode(text).tolist() for text in ("ROMEO: What", "To be, or not to be")]
    S = max(map(len, prompts))
    with jax.set_mesh(expert.layout.mesh):
        generator = Generator(expert.graphdef, expert.run.config.model, expert.layout, 2, 32, SamplingConfig(4),
                              score_prompt=True)
        decoding = generator.start(expert.params, prompts)
        decoding.advance(None, jax.random.key(0))
    scores_BS = np.asarray(decoding.prompt_log_probs)
    for b, prompt in enumerate(prompts):
        n = len(prompt) - 1
        batch = {"tokens": np.asarray([prompt[:-1]], np.int32), "targets": np.asarray([prompt[1:]], np.int32),
                 "positions": np.arange(n, dtype=np.int32)[None], "segment_ids": np.ones((1, n), np.int32),
                 "loss_mask": np.ones((1, n), np.int32)}
        np.testing.assert_allclose(scores_BS[b, S - 1 - n:], np.asarray(expert.log_probs(batch))[0], atol=1e-4)
        assert not scores_BS[b, : S - 1 - n].any()  # padding scores nothing


@pytest.fixture(scope="module")
def other_vocabulary(domains) -> Path:
    """A run directory whose config has another vocabulary (its weights are never read)."""
    directory = domains["root"] / "other_vocab"
    directory.mkdir()
    config = yaml.safe_load((domains["shake"] / "config.yaml").read_text())
    config["model"]["vocab_size"] = 384
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    return directory


@pytest.mark.parametrize("args,fragment", [
    (["--ensemble", "{shake},/nonexistent/run"], "--ensemble: /nonexistent/run is not a run directory"),
    (["--ensemble", "{shake},{python}", "--weighting", "bayes"], "--weighting: expected one of posterior, uniform"),
    (["--ensemble", "{shake},{python}", "--weighting", "fixed:1,2,3"], "--weighting: 3 fixed weights for 2 experts"),
    (["--ensemble", "{shake},{other}"], "model.vocab_size 384 but"),
    (["--ensemble", "{shake}", "--step", "3"], "--step: an --ensemble reads every run at its newest checkpoint"),
    (["--run-dir", "{shake}", "--weighting", "uniform"], "--weighting: goes with --ensemble"),
])
def test_ensemble_errors_are_one_line(domains, other_vocabulary, capsys, args, fragment):
    names = {"shake": domains["shake"], "python": domains["python"], "other": other_vocabulary}
    args = [a.format(**names) for a in args]
    for command in (["eval", *args, "--text", str(domains["play.txt"])], ["generate", *args, "--prompt", "x"]):
        capsys.readouterr()
        assert main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err
