"""`parscale-jax sweep`: a grid of (width, P) runs on equal tokens, resumable, fitted by the law."""

from __future__ import annotations

import csv
import json

import pytest

from parscale_jax.analysis import sweep
from parscale_jax.cli import main
from parscale_jax.config import load_config, packaged_config_path
from parscale_jax.errors import ConfigError
from parscale_jax.model.counting import non_embedding_params

BASE = ["model.hidden_size=32", "model.intermediate_size=88", "model.num_layers=1", "model.num_heads=4",
        "model.num_kv_heads=2", "model.parscale_n_tokens=4", "data.seq_len=32", "train.batch_size=8",
        "train.steps=10", "train.warmup_steps=2", "train.eval_every=0", "checkpoint.every=4"]
SWEEP = ["sweep", "--config", "sweep", "--sizes", "16,32", "--parscale", "1,2", "--tokens", "2048", "--no-progress"]


def test_widths_keep_the_base_models_shape():
    base = load_config(None, BASE).model  # head size 8, two query heads per KV head, MLP 2.75 x width
    wide = sweep.scaled_model(base, 64, 4)
    assert (wide.hidden_size, wide.num_heads, wide.num_kv_heads, wide.head_dim) == (64, 8, 4, 8)
    assert (wide.intermediate_size, wide.parscale_n, wide.num_layers) == (176, 4, 1)
    narrow = sweep.scaled_model(base, 8, 1)
    assert (narrow.num_heads, narrow.num_kv_heads) == (1, 1)
    with pytest.raises(ConfigError, match="width 12 is not a multiple of the base model's head size 8"):
        sweep.scaled_model(base, 12, 1)
    moe = load_config(None, [*BASE, "model.ffn=moe", "model.num_experts=4", "model.moe_intermediate_size=40",
                             "model.moe_shared_expert_size=24"]).model
    wide = sweep.scaled_model(moe, 64, 2)
    assert (wide.moe_intermediate_size, wide.moe_shared_expert_size, wide.num_experts) == (80, 48, 4)
    assert sweep.scaled_model(base, 64, 1).moe_intermediate_size == 0  # 0 stays "the MLP's width"


def test_every_run_trains_on_the_same_tokens():
    runs = sweep.grid(load_config(None, BASE), (16, 32), (1, 4), tokens=5000)
    assert list(runs) == ["d16_p1", "d16_p4", "d32_p1", "d32_p4"]
    assert {(c.train.steps, c.train.warmup_steps) for c in runs.values()} == {(20, 4)}  # 5000 / (8 x 32)
    with pytest.raises(ConfigError, match="--tokens"):
        sweep.grid(load_config(None, BASE), (16,), (1,), tokens=100)


def test_the_table_compares_with_p1_at_equal_width_and_at_equal_n():
    rows = [{"hidden_size": w, "P": p, "non_embedding_params": n, "eval_loss": loss}
            for w, p, n, loss in [(32, 1, 1000, 3.0), (32, 2, 2000, 2.9), (64, 1, 4000, 2.5), (64, 2, 8000, 2.3)]]
    # N = 2000 lies halfway between 1000 and 4000 in log N: the P = 1 loss there is 2.75.
    assert sweep.dense_loss_at(2000, {1000: 3.0, 4000: 2.5}) == pytest.approx(2.75)
    assert sweep.dense_loss_at(8000, {1000: 3.0, 4000: 2.5}) is None  # beyond the P = 1 runs
    lines = sweep.format_table(rows).splitlines()
    assert lines[2].split()[-2:] == ["-0.1000", "+0.1500"]  # better than its width, worse than its N
    assert lines[4].split()[-1] == "-0.2000"  # nothing to compare at equal N
    assert len(lines[1].split()) == 4  # P = 1 rows compare with nothing


def test_sweep_trains_the_grid_fits_the_law_and_skips_finished_runs(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    assert main([*SWEEP, "--out", str(out), *BASE]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["hidden_size"], r["P"]) for r in rows] == [("16", "1"), ("16", "2"), ("32", "1"), ("32", "2")]
    runs = sweep.grid(load_config(packaged_config_path("sweep"), BASE), (16, 32), (1, 2), 2048)
    for row, config in zip(rows, runs.values()):
        assert int(row["non_embedding_params"]) == int(row["active_params"]) == non_embedding_params(config.model)
        assert (int(row["tokens"]), int(row["steps"])) == (2048, 8)
        assert 3.0 < float(row["eval_loss"]) < 6.0  # trained a little from ln 320 = 5.77
        assert json.loads((out / row["run"] / "result.json").read_text())["eval_loss"] == float(row["eval_loss"])
    fit = json.loads((out / "fit.json").read_text())
    assert set(fit) == {"E", "A", "k", "alpha", "r2"}
    assert "== all: E = " in printed and "vs P = 1: same width   same N" in printed
    assert (out / "results.law.png").stat().st_size > 1000

    # Again: nothing is trained, except a run whose result was lost, which resumes from its checkpoint.
    (out / "d32_p2" / "result.json").unlink()
    trained = []
    real_run_one = sweep.run_one
    monkeypatch.setattr(sweep, "run_one", lambda name, *a, **k: trained.append(name) or real_run_one(name, *a, **k))
    assert main([*SWEEP, "--out", str(out), *BASE]) == 0
    assert trained == ["d32_p2"]
    assert capsys.readouterr().out.count("finished already") == 3
    again = list(csv.DictReader((out / "results.csv").open()))
    assert again[3]["eval_loss"] == rows[3]["eval_loss"]  # the same checkpoint, evaluated again

    # A different grid in the same directory would mix two sweeps: refused before any training.
    assert main([*SWEEP[:-2], "4096", "--no-progress", "--out", str(out), *BASE]) == 2
    err = capsys.readouterr().err
    assert "run d16_p1" in err and "train.steps" in err and "new --out" in err
