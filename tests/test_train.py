"""Training: gradient accumulation, schedules, learning on real text, exact resumption, eval."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from parscale_jax import cli
from parscale_jax.checkpoint import Checkpointer
from parscale_jax.config import TrainConfig, load_config
from parscale_jax.model import init_params, model_graphdef, param_info
from parscale_jax.training.loop import train
from parscale_jax.training.step import Trainer, learning_rate_schedule, loss_sums, make_train_step, weight_decay_mask
from conftest import TINY as BASE

TINY = [*BASE, "model.vocab_size=320", "train.eval_every=4", "train.eval_batches=2", "checkpoint.every=3"]


def tiny_config(*overrides):
    return load_config(None, TINY + list(overrides))


def random_batch(B, S, vocab, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (B, S + 1)).astype(np.int32)
    segment_ids = np.where(np.arange(S) < S // 3, 1, 2).repeat(B).reshape(S, B).T.astype(np.int32)
    loss_mask = np.ones((B, S), np.int32)
    loss_mask[:, S // 3 - 1] = 0
    loss_mask[1, :] = 0  # a row with no target token
    positions = np.where(segment_ids == 1, np.arange(S), np.arange(S) - S // 3).astype(np.int32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids,
            "positions": positions, "loss_mask": loss_mask}


def test_gradient_accumulation_equals_one_full_batch():
    results = []
    for accum in (1, 4):
        config = tiny_config(f"train.grad_accum={accum}", "train.z_loss=1e-3")
        trainer = Trainer.of(config)
        step = jax.jit(make_train_step(trainer.graphdef, trainer.optimizer, config.train))
        state = jax.jit(lambda: trainer.create_state(init_params(config.model, 0)))()
        state, metrics = step(state, {}, random_batch(8, 32, 320), False)
        results.append((state["params"], metrics))
    (params_full, metrics_full), (params_micro, metrics_micro) = results
    np.testing.assert_allclose(metrics_micro["loss"], metrics_full["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics_micro["grad_norm"], metrics_full["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params_full), jax.tree.leaves(params_micro)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_z_loss_adds_the_squared_log_partition():
    config = tiny_config()
    graphdef = model_graphdef(config.model)
    params = jax.jit(lambda: init_params(config.model, 0))()
    batch = random_batch(8, 32, 320)
    plain, (ce, _, _) = loss_sums(params, graphdef, batch, 0.0)
    with_z, (ce_z, _, _) = loss_sums(params, graphdef, batch, 1e-2)
    assert float(ce) == float(ce_z) == float(plain)
    # log Z of every target position, from the logits in float64, weighted by the loss mask.
    logits, _ = nnx.merge(graphdef, nnx.State(params))(batch["tokens"], batch["positions"], batch["segment_ids"])
    logits = np.asarray(logits, np.float64)
    top = logits.max(axis=-1)
    log_z = top + np.log(np.exp(logits - top[..., None]).sum(axis=-1))
    expected = 1e-2 * np.sum(log_z**2 * batch["loss_mask"])
    assert expected > 1.0  # log Z is about ln(320) at initialization: the term is not negligible
    np.testing.assert_allclose(float(with_z) - float(plain), expected, rtol=1e-4)


def test_schedules():
    cosine = learning_rate_schedule(TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1))
    assert float(cosine(0)) == 0.0 and float(cosine(5)) == pytest.approx(0.5)
    assert float(cosine(10)) == pytest.approx(1.0) and float(cosine(100)) == pytest.approx(0.1)
    assert 0.1 < float(cosine(55)) < 1.0
    wsd = learning_rate_schedule(TrainConfig(steps=100, lr=1.0, warmup_steps=10, schedule="wsd",
                                             decay_fraction=0.2, min_lr_ratio=0.0))
    assert [float(wsd(s)) for s in (10, 50, 82)] == [1.0, 1.0, 1.0]
    assert float(wsd(91)) == pytest.approx(0.5) and float(wsd(100)) == pytest.approx(0.0)


def test_no_weight_decay_on_norms_and_biases():
    config = tiny_config()
    mask = weight_decay_mask(param_info(config.model))
    assert mask["layers"]["self_attn"]["q_proj"] == {"kernel": True, "bias": False}
    assert mask["layers"]["input_layernorm"]["weight"] is False and mask["norm"]["weight"] is False
    assert mask["aggregate_in_bias"] is False and mask["aggregate_in_kernel"] is True
    assert mask["embed_tokens"]["embedding"] is True and mask["layers"]["self_attn"]["prefix_k"] is True


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_on_real_text_lowers_the_loss_and_leaves_its_artifacts(tmp_path):
    config = tiny_config("train.steps=24", "train.lr=1e-2")
    last = train(config, tmp_path, progress=False)
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(1, 25))
    assert metrics[0]["loss"] > 5.0  # about ln(320) at initialization
    assert last["loss"] < metrics[0]["loss"] - 1.5
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    assert len(evals) == 6 and evals[-1] < evals[0]
    assert all(m["tokens_per_s"] > 0 and m["tflops_per_s"] > 0 for m in metrics)
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [18, 21, 24]  # checkpoint.keep = 3
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "config.yaml").is_file()


def test_a_stopped_run_resumes_exactly(tmp_path):
    """Stopping at step 5 and running again gives the uninterrupted run's losses, bit for bit."""
    config = tiny_config("train.steps=10")
    train(config, tmp_path / "straight", progress=False)
    train(config, tmp_path / "resumed", progress=False, stop_at=5)
    assert [m["step"] for m in read_metrics(tmp_path / "resumed")][-1] == 5
    train(config, tmp_path / "resumed", progress=False)
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    keys = ("step", "loss", "grad_norm", "lr", "eval_loss")
    assert [{k: m.get(k) for k in keys} for m in resumed] == [{k: m.get(k) for k in keys} for m in straight]


def test_metrics_logged_after_the_last_checkpoint_are_replaced_on_resume(tmp_path):
    config = tiny_config("train.steps=8", "checkpoint.every=4")
    train(config, tmp_path, progress=False, stop_at=6)  # checkpoints 4 and 6
    # Simulate a crash after step 6 had been logged but before a later checkpoint existed.
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 7, "loss": 123.0}) + "\n")
    train(config, tmp_path, progress=False)
    steps = [m["step"] for m in read_metrics(tmp_path)]
    assert steps == list(range(1, 9)) and read_metrics(tmp_path)[6]["loss"] != 123.0


def test_eval_command_reports_held_out_and_text_file_loss(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli.main(["train", "--run-dir", str(run_dir), "--no-progress", *TINY, "train.steps=4"]) == 0
    capsys.readouterr()
    assert cli.main(["eval", "--run-dir", str(run_dir)]) == 0
    held_out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert held_out["step"] == 4 and 2.0 < held_out["loss"] < 6.0 and held_out["target_tokens"] > 0
    assert json.loads((run_dir / "eval_step4.json").read_text()) == held_out
    text = tmp_path / "sample.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 20)
    assert cli.main(["eval", "--run-dir", str(run_dir), "--text", str(text), "--out", str(tmp_path / "e.json")]) == 0
    on_text = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert on_text["source"] == str(text) and on_text["loss"] != held_out["loss"]


def test_evaluation_runs_on_its_own_cadence_and_its_time_is_not_throughput(tmp_path, monkeypatch):
    """log_every=3, eval_every=4: evaluations at 4, 8, 12 (not only on logging steps), and tokens/s
    counts training time only. The clock is a fake one: evaluating costs 1000 s on it."""
    from parscale_jax import evaluate
    from parscale_jax.training import loop as train_module

    clock = [0.0]

    def perf_counter():
        clock[0] += 1e-3  # every reading moves the clock a little
        return clock[0]

    real_mean_loss = evaluate.mean_loss

    def slow_mean_loss(*args):
        clock[0] += 1000.0
        return real_mean_loss(*args)

    monkeypatch.setattr(train_module.time, "perf_counter", perf_counter)
    monkeypatch.setattr(evaluate, "mean_loss", slow_mean_loss)
    config = tiny_config("train.steps=12", "train.log_every=3", "train.eval_every=4")
    last = train(config, tmp_path, progress=False)
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [3, 4, 6, 8, 9, 12]
    assert [m["step"] for m in metrics if "eval_loss" in m] == [4, 8, 12]
    assert [m["step"] for m in metrics if "loss" in m] == [3, 6, 9, 12]
    # 3 steps x 256 tokens in well under a second of training: with an evaluation's 1000 s it would be < 1.
    assert all(m["tokens_per_s"] > 1000 for m in metrics if "tokens_per_s" in m)
    assert last["step"] == 12 and "eval_loss" in last and "loss" in last


def test_a_fresh_run_records_its_lineage(tmp_path):
    train(tiny_config("train.steps=2"), tmp_path, progress=False)
    lineage = json.loads((tmp_path / "lineage.json").read_text())
    assert lineage["made_from"] == "init" and lineage["seed"] == 0


def test_eval_of_a_text_shorter_than_one_row(tmp_path, capsys):
    """Every target of the text counts, however short: 40 bytes + end of document = 40 targets."""
    run_dir = tmp_path / "run"
    assert cli.main(["train", "--run-dir", str(run_dir), "--no-progress", *TINY, "train.steps=2",
                     "train.eval_every=0"]) == 0
    text = tmp_path / "short.txt"
    text.write_text("x" * 40)
    capsys.readouterr()
    assert cli.main(["eval", "--run-dir", str(run_dir), "--text", str(text), "data.seq_len=64"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["target_tokens"] == 40 and 0 < result["loss"] < 10


def test_the_loop_keeps_steps_in_flight(tmp_path, monkeypatch):
    """The host reads a step's non-finite flags only after the next STEPS_IN_FLIGHT steps are
    dispatched (so the device never waits for it), except where it logs or saves."""
    from parscale_jax.training import loop as train_module

    events, step_of, kept = [], {}, []  # kept: the flags stay alive, so their ids stay theirs
    real_jit, real_device_get = Trainer.train_step, jax.device_get

    def recording_jit(*args, **kwargs):
        step_fn = real_jit(*args, **kwargs)

        def dispatch(*step_args):
            state, metrics = step_fn(*step_args)
            kept.append(metrics["loss_finite"])
            events.append(("dispatch", len(kept)))
            step_of[id(metrics["loss_finite"])] = len(kept)
            return state, metrics

        return dispatch

    def recording_device_get(tree):
        if isinstance(tree, tuple) and id(tree[0]) in step_of:
            events.append(("read", step_of[id(tree[0])]))
        return real_device_get(tree)

    monkeypatch.setattr(Trainer, "train_step", recording_jit)
    monkeypatch.setattr(train_module.jax, "device_get", recording_device_get)
    train(tiny_config("train.steps=9", "train.log_every=100", "train.eval_every=0", "checkpoint.every=100"),
          tmp_path, progress=False)
    reads = [step for kind, step in events if kind == "read"]
    assert reads == list(range(1, 10))
    for step in range(1, 8):  # the last steps are read at the end, where the run saves
        dispatched_before = max(s for kind, s in events[: events.index(("read", step))] if kind == "dispatch")
        assert dispatched_before == step + train_module.STEPS_IN_FLIGHT, (step, events)
