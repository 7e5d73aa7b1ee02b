"""Downstream tasks during training (`train.eval_tasks`): scored on their own cadence and logged like
the held-out loss; an unknown task fails before the first step; a failing task stops nothing and
is reported once."""

from __future__ import annotations

import json
import sys

from conftest import TINY

from parscale_jax.cli import main
from parscale_jax.inference import harness

TASKS = ["train.eval_tasks=[shakespeare_mc,facts_qa]", "train.eval_tasks_limit=8"]


def logged(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tasks_are_scored_on_their_cadence_and_logged(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    real = harness.evaluate_tasks

    def facts_fail(model, names, *args, **kwargs):
        if names == ["facts_qa"]:
            raise RuntimeError("a broken task")
        return real(model, names, *args, **kwargs)

    monkeypatch.setattr(harness, "evaluate_tasks", facts_fail)
    assert main(["train", "--run-dir", str(run_dir), "--no-progress", *TINY, "train.steps=5", *TASKS,
                 "train.eval_tasks_every=2"]) == 0
    scored = {r["step"]: r for r in logged(run_dir) if any(k.startswith("tasks/") for k in r)}
    assert sorted(scored) == [2, 4, 5]  # every 2 steps, and the last
    for record in scored.values():
        assert 0.0 <= record["tasks/shakespeare_mc/acc"] <= 1.0 and "tasks/facts_qa/acc" not in record
        assert "loss" in record or record["step"] != 5
    out = capsys.readouterr().out
    assert out.count("train.eval_tasks: facts_qa failed (RuntimeError: a broken task)") == 1
    events = next((run_dir / "tensorboard").glob("events.*")).read_bytes()
    assert b"tasks/shakespeare_mc/acc" in events
    # The scores of the last step are what `eval --tasks` gives for the finished run.
    monkeypatch.setattr(harness, "evaluate_tasks", real)
    assert main(["eval", "--run-dir", str(run_dir), "--tasks", "shakespeare_mc", "--limit", "8"]) == 0
    result = json.loads((run_dir / "eval_tasks_step5.json").read_text())
    for score in result["scores"]:
        assert scored[5][f"tasks/shakespeare_mc/{score['metric']}"] == score["value"]


def test_tasks_without_the_extra_fail_before_the_first_step(tmp_path, monkeypatch, capsys):
    """Without the lm-evaluation-harness, `train.eval_tasks` is refused in one line, naming the setting,
    before anything trains (unknown names fail there too: `resolve_tasks`, tested through `eval`)."""
    monkeypatch.delitem(sys.modules, "parscale_jax.inference.harness")
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", None)  # as if lm_eval were not installed
    run_dir = tmp_path / "run"
    assert main(["train", "--run-dir", str(run_dir), "--no-progress", *TINY, "train.steps=2",
                 "train.eval_tasks=[shakespeare_mc]"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error: train.eval_tasks: needs the lm-evaluation-harness" in err, err
    assert "pip install 'parscale-jax[eval]'" in err and not (run_dir / "checkpoints").exists()
