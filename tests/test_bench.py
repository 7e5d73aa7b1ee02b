"""Benchmarks run end to end on tiny sizes and report consistent figures (no timing is asserted)."""

from __future__ import annotations

import json
import math

import pytest

from parscale_jax.analysis import bench
from parscale_jax.cli import main
from parscale_jax.config import load_config
from parscale_jax.model.counting import non_embedding_params
from conftest import TINY as BASE

TINY = [*BASE, "train.batch_size=2"]


@pytest.mark.parametrize("P", [2, 4, 8])
def test_dense_equivalent_has_the_parameters_the_law_predicts(P):
    base = load_config().model
    dense = bench.dense_equivalent(base, P)
    target = non_embedding_params(base) * (bench.STACK_V2_K * math.log(P) + 1)
    assert abs(non_embedding_params(dense) - target) / target < 0.06
    assert dense.num_layers == base.num_layers and dense.num_heads == base.num_heads
    assert dense.hidden_size > base.hidden_size and dense.parscale_n == 1


def test_bench_command_writes_tables_json_and_plots(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "all", "--config", "default", "--out", str(out), "--streams", "1,2", "--batches", "1,2",
                 "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1", "--steps", "1", *TINY]) == 0
    printed = capsys.readouterr().out
    for name in ("decode", "equal-loss", "train"):
        assert f"== {name}" in printed
        assert (out / f"{name}.png").stat().st_size > 1000
    decode = json.loads((out / "decode.json").read_text())
    assert decode["device"] and decode["rows"]
    rows = {(r["P"], r["batch"]): r for r in decode["rows"]}
    assert set(rows) == {(1, 1), (2, 1), (1, 2), (2, 2)}
    for batch in (1, 2):
        assert rows[1, batch]["latency_ratio"] == rows[1, batch]["memory_ratio"] == 1.0
        # Two streams hold two KV caches and two prefix sets: the compiled step needs more memory.
        assert rows[2, batch]["memory_bytes"] > rows[1, batch]["memory_bytes"]
    equal = json.loads((out / "equal-loss.json").read_text())["rows"]
    assert [r["P"] for r in equal] == [2, 2]  # P = 1 is the base, not a comparison
    assert all(r["dense_params"] > r["base_params"] for r in equal)
    train = json.loads((out / "train.json").read_text())["rows"]
    assert [r["P"] for r in train] == [1, 2] and train[0]["throughput_ratio"] == 1.0
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] for r in train)


@pytest.mark.parametrize("args,fragment", [
    (["--new-tokens", "1"], "--new-tokens: must be >= 2"),
    (["--prompt-len", "5000"], "exceed model.max_position_embeddings"),
])
def test_bench_errors(tmp_path, capsys, args, fragment):
    assert main(["bench", "decode", "--out", str(tmp_path), *args]) == 2
    assert fragment in capsys.readouterr().err


def test_bench_without_matplotlib_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    from parscale_jax.analysis import plotting

    def no_matplotlib():
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(plotting, "pyplot", no_matplotlib)
    assert main(["bench", "train", "--config", "default", "--out", str(tmp_path), "--streams", "1", "--steps", "1",
                 *TINY]) == 0
    printed = capsys.readouterr().out
    assert "plot skipped: matplotlib is not installed" in printed and "Traceback" not in printed
    assert (tmp_path / "train.json").is_file() and not (tmp_path / "train.png").exists()


def test_bench_measures_the_torch_peer_side_by_side(tmp_path, capsys):
    out = tmp_path / "bench"
    for name in ("train", "decode"):
        assert main(["bench", name, "--config", "default", "--out", str(out), "--streams", "1,2", "--batches", "1",
                     "--prompt-len", "8", "--new-tokens", "8", "--repeats", "3", "--steps", "1", "--peer", "torch",
                     *TINY]) == 0
    printed = capsys.readouterr().out
    assert "ours / torch" in printed and "torch / ours" in printed
    train = json.loads((out / "train.json").read_text())["rows"]
    assert all(r["peer_tokens_per_s"] > 0 and r["vs_peer"] == r["tokens_per_s"] / r["peer_tokens_per_s"]
               for r in train)
    decode = json.loads((out / "decode.json").read_text())["rows"]
    assert all(r["peer_latency_s"] > 0 and r["floor_s"] > 0 for r in decode)


def test_bench_moe_compares_with_the_dense_model_of_equal_active_parameters(tmp_path, capsys):
    """Every part on a tiny model: speed side by side, held-out losses of dense, MoE and MoE with
    streams on equal tokens, upcycling against continued training; a finished run is not retrained."""
    args = ["bench", "moe", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--no-progress",
            "--experts", "2", "--top-k", "1", "--seq-lens", "32", "--tokens-per-step", "64", "--upcycle-steps", "1",
            *BASE, "model.num_layers=1", "train.steps=2", "train.warmup_steps=0", "train.eval_every=2",
            "train.eval_batches=1", "train.batch_size=2"]
    assert main(args) == 0
    result = json.loads((tmp_path / "out" / "moe.json").read_text())
    (speed,) = result["speed"]
    assert speed["seq_len"] == 32 and speed["batch"] == 2 and speed["throughput_ratio"] > 0
    quality = result["quality"]
    assert list(quality) == ["dense", "moe2", "moe2-p2"]
    assert quality["moe2"]["active_params"] < quality["moe2"]["params"]
    assert quality["moe2"]["train_flops_per_token"] == pytest.approx(quality["dense"]["train_flops_per_token"], rel=0.05)
    assert all(len(r["curve"]) == 1 and r["curve"][0]["tokens"] == 2 * 2 * 32 for r in quality.values())
    assert set(result["upcycling"]) == {"dense-continued", "upcycled"}
    assert "upcycling" in capsys.readouterr().out
    # Again: a finished run is not trained again (the benchmark's runs resume like any run).
    from parscale_jax.analysis.bench_moe import train_or_finish
    from parscale_jax.runs import Run

    records = train_or_finish(Run.open(tmp_path / "work" / "moe2").config, tmp_path / "work" / "moe2", progress=False)
    assert capsys.readouterr().out.strip() == "moe2: finished already" and records[-1]["step"] == 2


def test_bench_btm_measures_every_method_against_the_dense_model_of_equal_compute(tmp_path, capsys):
    """Every method end to end on a tiny model and tiny domains: finite losses on each text, the
    dense run's FLOPs those of the seed and the experts by construction, the ensemble holding both
    experts; run again, nothing is trained or measured twice."""
    args = ["bench", "btm", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--no-progress",
            "--seed-steps", "2", "--expert-steps", "2", "--btx-steps", "1", "--stdlib-mb", "0.02",
            "--shakespeare-mb", "0.02", "--heldout-kb", "0.5", "--timing-repeats", "1", *BASE, "model.num_layers=1"]
    assert main(args) == 0
    result = json.loads((tmp_path / "out" / "btm.json").read_text())
    methods = result["methods"]
    assert set(methods) == {"dense", "ensemble", "ensemble-uniform", "average", "btx", "stream-btm",
                            "stream-btm-uniform", "seed"}
    assert all(math.isfinite(r["loss"][text]) for r in methods.values() for text in ("shakespeare", "stdlib", "mixed"))
    flops = methods["dense"]["train_flops_parts"]
    assert set(flops) == {"seed", "dense/mixture"}
    assert methods["dense"]["train_flops"] == pytest.approx(methods["ensemble"]["train_flops"], rel=1e-12)
    assert flops["dense/mixture"] == pytest.approx(2 * flops["seed"])  # 2 x 2 steps against 2 of the seed
    assert methods["btx"]["train_flops"] > methods["ensemble"]["train_flops"]
    assert set(methods["stream-btm"]["train_flops_parts"]) == {"seed-p2", "stream-experts/shakespeare",
                                                               "stream-experts/stdlib"}
    assert methods["ensemble"]["inference_param_bytes"] == 2 * methods["dense"]["inference_param_bytes"]
    assert methods["average"]["inference_param_bytes"] == methods["dense"]["inference_param_bytes"]
    assert set(methods["ensemble"]["experts"]) == {"shakespeare", "stdlib"}
    assert "stream-btm" in capsys.readouterr().out and result["commands"]
    assert main(args) == 0  # again: every run finished and every method measured already
    out = capsys.readouterr().out
    assert "training" not in out and out.count("measured already") == len(methods)


def test_bench_tasks_times_our_adapter_against_the_harness_transformers_model(tmp_path, capsys):
    """`bench tasks` on a tiny Llama written as a Hugging Face checkpoint: every figure of every task
    (requests, both models' requests/s and their ratio, our compilation), the same scores for ours and
    transformers' on the same model, and the recycled P = 2 run's scores."""
    import jax
    import numpy as np

    from parscale_jax.interop import hf
    from parscale_jax.model import init_params

    config = load_config(overrides=[*BASE, "model.parscale_n=1", "model.init_std=0.1", "model.qkv_bias=false"])
    hf_dir = hf.write_hf_checkpoint(tmp_path / "hf", jax.tree.map(np.asarray, init_params(config.model, 3)),
                                    config.model, "byte")
    corpus = tmp_path / "corpus.txt"  # the recycled run's contexts: a small corpus reads fast
    corpus.write_text("To be, or not to be, that is the question:\n" * 50)
    assert main(["bench", "tasks", "--hf", str(hf_dir), "--tasks", "facts_qa,facts_gen", "--limit", "4",
                 "--repeats", "1", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
                 "data.corpus=files", f"data.paths=[{corpus}]"]) == 0
    result = json.loads((tmp_path / "out" / "tasks.json").read_text())
    rows = {r["task"]: r for r in result["rows"]}
    assert list(rows) == ["facts_qa", "facts_gen"]
    assert [rows[t]["requests"] for t in rows] == [16, 4]  # 4 examples x 4 choices; 4 generations
    for r in rows.values():
        assert r["ours_requests_per_s"] > 0 and r["hf_requests_per_s"] > 0 and r["ours_compile_s"] >= 0
        assert r["ratio"] == pytest.approx(r["ours_requests_per_s"] / r["hf_requests_per_s"])
        assert r["ours_requests_per_s"] == pytest.approx(r["requests"] / r["ours_s"])
        assert len(r["ours_passes_s"]) == len(r["hf_passes_s"]) == 1
        assert r["same_scores"] and r["scores"]["ours"] == r["scores"]["hf"]
        assert set(r["scores"]["recycled"]) == set(r["scores"]["ours"])
    assert set(rows["facts_qa"]["scores"]["ours"]) == {"acc"} and set(rows["facts_gen"]["scores"]["ours"]) == {
        "exact_match"}
    assert result["options"]["streams"] == 2 and set(result["runs"]) == {"p1", "p2"}
    assert result["machine"]["torch_threads"] >= 1 and result["versions"]["lm_eval"]
    out = capsys.readouterr().out
    assert "ours req/s" in out and "scores of ours and hf the same on every task" in out
