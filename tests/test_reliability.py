"""Reliability: preemption, crashes, damaged checkpoints, a full disk and non-finite numbers lose
nothing. Faults are injected into real training subprocesses; every resumed run must log exactly
the losses of a run that was never interrupted (bitwise: the same program on the same CPU)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from parscale_jax.data import pipeline
from parscale_jax.training import loop as train_module
from parscale_jax.training import step as step_module
from parscale_jax.checkpoint import Checkpointer
from parscale_jax.cli import main
from parscale_jax.config import load_config
from parscale_jax.errors import ConfigError
from parscale_jax.errors import CheckpointError, NonFiniteError
from parscale_jax.training.preemption import StopRequests
from parscale_jax.runs import Run
from conftest import SUBPROCESS_TIMEOUT, TINY as BASE

STEPS = 40
TINY = [*BASE, "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1", f"train.steps={STEPS}",
        "checkpoint.every=4", "checkpoint.keep=2"]


def logged(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(m["step"], m["loss"]) for m in map(json.loads, lines)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[tuple[int, float]]:
    """The losses of the uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train_module.train(load_config(None, TINY), run_dir, progress=False)
    return logged(run_dir)


def subprocess_env() -> dict[str, str]:
    """The test process's platform and compilation cache (conftest.py), so a restart compiles nothing."""
    return {**os.environ, "JAX_PLATFORMS": "cpu"}


def start_training(run_dir: Path, *overrides: str, options: tuple[str, ...] = (), shell_setup: str = "",
                   **popen) -> subprocess.Popen:
    """`parscale-jax train` on the tiny config in a subprocess; `shell_setup` runs in bash first."""
    command = [sys.executable, "-m", "parscale_jax.cli", "train", "--run-dir", str(run_dir), "--no-progress",
               *options, *TINY, *overrides]
    if shell_setup:
        command = ["bash", "-c", f'{shell_setup}; exec "$@"', "bash", *command]
    popen.setdefault("env", subprocess_env())
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=SUBPROCESS_TIMEOUT)
    return process.returncode, out, err


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    """Until the run has logged `step` (the process must still be running, and get there in time)."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, finish(process)
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no step {step} logged in {timeout} s: {finish(process)}")
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if lines and lines[-1].endswith("}") and json.loads(lines[-1])["step"] >= step:
            return
        time.sleep(0.005)


# --- Crashes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_losses(seed, reference, tmp_path):
    rng = random.Random(seed)
    run_dir = tmp_path / "run"
    for _ in range(2):  # two kills, each at a random step and a random moment within it
        done = logged(run_dir)[-1][0] if (run_dir / "metrics.jsonl").exists() else 0
        process = start_training(run_dir)
        wait_for_step(run_dir, rng.randint(done + 1, done + STEPS // 3), process)
        time.sleep(rng.uniform(0, 0.03))
        process.send_signal(signal.SIGKILL)
        assert finish(process)[0] == -signal.SIGKILL, "the run ended before it could be killed"
    code, out, err = finish(start_training(run_dir))
    assert code == 0, err
    assert logged(run_dir) == reference  # every step once, each loss bitwise equal
    assert not list((run_dir / "checkpoints").glob("*tmp*")), "a partly written checkpoint was left behind"


# --- Preemption ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_exits_0_and_the_run_resumes_exactly(sig, reference, tmp_path):
    run_dir = tmp_path / "run"
    process = start_training(run_dir)
    wait_for_step(run_dir, 5, process)
    process.send_signal(sig)
    code, out, err = finish(process)
    assert code == 0, err
    stopped = json.loads(out.splitlines()[1])["step"]
    assert f"stopped by {sig.name} after step {stopped}, checkpointed; resume with:" in out
    assert f"parscale-jax train --run-dir {run_dir}" in out
    assert stopped < STEPS and stopped in Checkpointer(run_dir / "checkpoints").all_steps()
    code, _, err = finish(start_training(run_dir))
    assert code == 0, err
    assert logged(run_dir) == reference


def test_a_second_signal_exits_at_once_and_corrupts_nothing(reference, tmp_path):
    run_dir = tmp_path / "run"
    process = start_training(run_dir)
    wait_for_step(run_dir, 5, process)
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGINT)
    code, _, err = finish(process)  # Python runs pending handlers in signal-number order: either is second
    assert code in (128 + signal.SIGINT, 128 + signal.SIGTERM) and "again: exiting now" in err
    code, _, err = finish(start_training(run_dir))
    assert code == 0, err
    assert logged(run_dir) == reference


def test_stop_requests_are_flags_until_the_second_signal(monkeypatch):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    with StopRequests() as requests:
        assert requests.agreed() is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert requests.agreed() == "SIGTERM" and exits == []
        os.kill(os.getpid(), signal.SIGTERM)
        assert exits == [128 + signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # put back


def test_two_processes_agree_on_the_step_they_save(tmp_path):
    """SIGTERM reaches only process 1; both stop after the same step and save it together."""
    run_dir = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Checkpoints only where the stop puts one (and at the end): saving every 4 steps would be most of the time.
    extra = ["mesh.data=-1", "mesh.stream=2", f"train.steps={4 * STEPS}", f"checkpoint.every={4 * STEPS}"]

    def both() -> list[subprocess.Popen]:
        processes = []
        for index in range(2):
            env = {"PARSCALE_COORDINATOR": f"127.0.0.1:{port}", "PARSCALE_NUM_PROCESSES": "2",
                   "PARSCALE_PROCESS_ID": str(index),
                   "XLA_FLAGS": f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=2"}
            processes.append(start_training(run_dir, *extra, env={**subprocess_env(), **env}))
        return processes

    processes = both()
    wait_for_step(run_dir, 3, processes[0])
    processes[1].send_signal(signal.SIGTERM)
    results = [finish(p) for p in processes]
    assert [code for code, _, _ in results] == [0, 0], results
    (summary,) = [json.loads(line) for line in results[0][1].splitlines() if "stopped_by" in line]
    stopped = summary["step"]
    assert stopped < 4 * STEPS
    data_iter = run_dir / "checkpoints" / str(stopped) / "data_iter"
    assert sorted(p.name for p in data_iter.glob("*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]
    results = [finish(p) for p in both()]
    assert [code for code, _, _ in results] == [0, 0], results
    assert [step for step, _ in logged(run_dir)] == list(range(1, 4 * STEPS + 1))


# --- Damaged checkpoints and a full disk -------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory, reference) -> Path:
    """A finished run with checkpoints of steps 36 and 40."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train_module.train(load_config(None, TINY), run_dir, progress=False)
    return run_dir


def array_files(step_dir: Path) -> list[Path]:
    """The checkpoint's array data files, largest first."""
    return sorted((step_dir / "state").rglob("ocdbt.process_0/d/*"), key=lambda p: -p.stat().st_size)


def truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:100])
    return path


def test_each_truncated_or_deleted_file_is_named(finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    checkpoints = run_dir / "checkpoints"
    files = sorted(p for p in (checkpoints / "40").rglob("*") if p.is_file())
    assert len(files) > 13  # 13 of metadata, the rest array data: 22 to 25 in all, as TensorStore splits them
    for index, path in enumerate(files):
        original = path.read_bytes()
        if index % 2:
            path.unlink()
            expected = f"{path} is missing"
        else:
            path.write_bytes(original[: len(original) // 2])
            expected = f"{path} is truncated or altered ({len(original) // 2} of {len(original)} bytes)"
        with pytest.raises(CheckpointError) as caught:
            Checkpointer(checkpoints).verify(40)
        assert str(caught.value) == (f"checkpoint of step 40 is damaged: {expected}; run again with --fallback "
                                     "to resume from step 36, the previous checkpoint")
        path.write_bytes(original)
    Checkpointer(checkpoints).verify(40)


def test_a_damaged_checkpoint_stops_commands_with_one_line(finished, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    victim = truncate(array_files(run_dir / "checkpoints" / "40")[0])
    commands = (["train", "train.steps=44", "--override-config"], ["eval"], ["export", "--out", str(tmp_path / "hf")])
    for command in commands:
        assert main([command[0], "--run-dir", str(run_dir), *command[1:]]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"parscale-jax {command[0]}: error: checkpoint of step 40 is damaged: {victim}")
        assert "\n" not in err and "Traceback" not in err


def test_without_its_file_record_a_damaged_checkpoint_is_still_caught(finished, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    (run_dir / "checkpoints" / ".manifests" / "40.json").unlink()
    # Every data file: `eval` restores only the parameters, and which files hold them varies from save to save.
    for path in array_files(run_dir / "checkpoints" / "40"):
        truncate(path)
    assert main(["eval", "--run-dir", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert f"checkpoint of step 40 is damaged: {run_dir / 'checkpoints' / '40'} cannot be read" in err


def test_fallback_sets_the_damaged_step_aside_and_retrains_identically(finished, reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    (run_dir / "checkpoints" / "40" / "state" / "_METADATA").unlink()
    assert main(["train", "--run-dir", str(run_dir), "--no-progress", "--fallback"]) == 0
    assert "moved to" in capsys.readouterr().err
    assert (run_dir / "checkpoints.damaged" / "40" / "state").is_dir()  # kept, not deleted
    assert logged(run_dir) == reference  # steps 37-40 trained again from step 36
    assert Checkpointer(run_dir / "checkpoints").all_steps() == [36, 40]


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(reference, tmp_path):
    """A file-size limit of 16 kB makes bigger writes fail, as a full disk would, even for root."""
    run_dir = tmp_path / "run"
    code, _, err = finish(start_training(run_dir, "checkpoint.keep=1", options=("--stop-at", "8")))
    assert code == 0, err
    # Ignoring SIGXFSZ makes an oversized write fail with EFBIG instead of killing the process. The
    # compilation cache stays off: its own failed writes would add warnings of their own.
    env = {**subprocess_env(), "JAX_ENABLE_COMPILATION_CACHE": "false"}
    code, _, err = finish(start_training(run_dir, "checkpoint.keep=1", shell_setup="trap '' XFSZ; ulimit -f 16",
                                         env=env))
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"parscale-jax train: error: saving step 12 in {run_dir / 'checkpoints'} failed (")
    assert "File too large" in line and line.endswith("the checkpoint of step 8 is intact. Free space or fix the "
                                                      "cause, then run the same command to resume")
    assert Checkpointer(run_dir / "checkpoints").all_steps() == [8]  # keep=1, yet not deleted for step 12
    code, _, err = finish(start_training(run_dir, "checkpoint.keep=1"))
    assert code == 0, err
    assert logged(run_dir) == reference


ABANDONED_WORK = """
import asyncio, sys, threading
from parscale_jax import cli
if sys.argv[1] == "quiet":
    cli._quiet_library_errors()
# Orbax's and TensorStore's work as a failed save leaves it (code in their files): a write never
# awaited, collected at exit, and a background thread that fails.
library = {}
exec(compile("async def write_fragment():\\n    pass\\ndef fail():\\n    1 / 0\\n",
             "/site-packages/orbax/checkpoint/_abandoned.py", "exec"), library)
abandoned = library["write_fragment"]()
thread = threading.Thread(target=library["fail"])
thread.start()
thread.join()
# A TensorStore write that failed after the save did, its error set from native code (no traceback).
loop = asyncio.new_event_loop()
loop.create_future().set_exception(ValueError("OUT_OF_RANGE: Error writing local file: File too large"))
if sys.argv[2] == "ours":  # and failures of our own: in a thread, and where Python cannot raise
    thread = threading.Thread(target=lambda: {}["missing key"])
    thread.start()
    thread.join()
    class Leaky:
        def __del__(self):
            raise ValueError("from __del__")
    Leaky()
    try:  # an error of ours that no one awaited
        raise ValueError("never retrieved")
    except ValueError as err:
        loop.create_future().set_exception(err)
import gc; gc.collect()
"""


@pytest.mark.parametrize("mode, failures", [("quiet", "library"), ("debug", "library"), ("quiet", "ours")])
def test_only_what_a_failed_save_leaves_behind_is_silent_without_debug(mode, failures):
    """The full-disk error must stay one line however the interpreter's exit collects the leftovers,
    and a real failure in a thread of ours must still be reported."""
    err = subprocess.run([sys.executable, "-c", ABANDONED_WORK, mode, failures], capture_output=True, text=True,
                         env=subprocess_env(), timeout=SUBPROCESS_TIMEOUT).stderr
    if mode == "debug":
        assert "ZeroDivisionError" in err and "was never awaited" in err and "OUT_OF_RANGE" in err
    elif failures == "library":
        assert err == ""
    else:
        assert "ZeroDivisionError" not in err and "never awaited" not in err and "OUT_OF_RANGE" not in err
        assert "KeyError: 'missing key'" in err and "ValueError: from __del__" in err
        assert "ValueError: never retrieved" in err


# --- Non-finite loss or gradients ---------------------------------------------------------------


def poison_token(config, steps: int) -> tuple[int, list[int]]:
    """A token that occurs in a few of the first `steps` batches, and those steps."""
    batches = iter(pipeline.train_dataset(config))
    batches = [next(batches)["tokens"] for _ in range(steps)]
    for token in range(256):
        steps_with = [i + 1 for i, tokens in enumerate(batches) if np.any(tokens == token)]
        if 2 <= len(steps_with) <= steps // 3:
            return token, steps_with
    raise AssertionError("no suitable token")


def poison(monkeypatch, token: int, what: str) -> None:
    """Make the objective (and, for "loss", the reported loss too) NaN on batches holding `token`."""
    real = step_module.loss_sums

    def poisoned(params, graphdef, batch, *args):
        objective, (ce_sum, n_tokens, aux) = real(params, graphdef, batch, *args)
        factor = jnp.where(jnp.any(batch["tokens"] == token), jnp.nan, 1.0)
        return objective * factor, (ce_sum * factor if what == "loss" else ce_sum, n_tokens, aux)

    monkeypatch.setattr(step_module, "loss_sums", poisoned)


@pytest.mark.parametrize("what", ["loss", "gradients"])
def test_non_finite_steps_are_skipped_counted_and_logged(what, tmp_path, monkeypatch, capsys):
    config = load_config(None, [*TINY, "train.steps=12"])
    token, bad_steps = poison_token(config, 12)
    poison(monkeypatch, token, what)
    train_module.train(config, tmp_path / "run", progress=False)
    err = capsys.readouterr().err
    for count, step in enumerate(bad_steps, 1):
        assert f"step {step}: non-finite {what}; update skipped ({count} skipped so far)" in err
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_steps"] for m in metrics] == [sum(b <= m["step"] for b in bad_steps) for m in metrics]
    assert all(np.isfinite(m["loss"]) for m in metrics if m["step"] not in bad_steps)
    assert Checkpointer(tmp_path / "run" / "checkpoints").all_steps() == [8, 12]  # and saved as usual


def test_stop_on_non_finite_saves_the_last_good_state_and_resumes_exactly(tmp_path, monkeypatch):
    config = load_config(None, [*TINY, "train.steps=12", "train.on_nonfinite=stop"])
    clean = tmp_path / "clean"
    train_module.train(config, clean, progress=False)
    token, bad_steps = poison_token(config, 12)
    with monkeypatch.context() as patch:
        poison(patch, token, "loss")
        with pytest.raises(NonFiniteError) as caught:
            train_module.train(config, tmp_path / "run", progress=False)
    first = bad_steps[0]
    assert str(caught.value) == (f"step {first}: non-finite loss; stopped (train.on_nonfinite=stop) with the state "
                                 f"of step {first - 1} saved in {tmp_path / 'run' / 'checkpoints'}")
    assert max(Checkpointer(tmp_path / "run" / "checkpoints").all_steps()) == first - 1
    train_module.train(config, tmp_path / "run", progress=False)  # the cause removed: on from step first - 1
    assert logged(tmp_path / "run") == logged(clean)  # same state, same data position


# --- A run directory's settings -----------------------------------------------------------------


def test_resuming_under_changed_settings_needs_override_config(finished, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    assert main(["train", "--run-dir", str(run_dir), "--no-progress", "train.steps=44", "train.lr=1e-3"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"error: train.lr: {run_dir} was started with other settings (train.lr 0.003 -> 0.001, train.steps 40 -> 44); "
        "pass --override-config to continue it with the new ones")
    assert main(["train", "--run-dir", str(run_dir), "--no-progress", "model.hidden_size=64", "--override-config"]) == 2
    assert "holds a model of another shape (model.hidden_size 32 -> 64)" in capsys.readouterr().err
    assert main(["train", "--run-dir", str(run_dir), "--no-progress", "train.steps=44", "--override-config"]) == 0
    assert logged(run_dir)[-1][0] == 44


def test_layout_and_logging_settings_may_change_on_resume(finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    config = load_config(None, [*TINY, "train.steps=42", "mesh.data=1", "checkpoint.every=1", "train.log_every=2"])
    with pytest.raises(ConfigError, match=r"train.steps: .* \(train.steps 40 -> 42\)"):
        Run(run_dir, config).check_config(override=False)
    Run(run_dir, load_config(None, [*TINY, "mesh.data=1", "checkpoint.every=1"])).check_config(False)
    # Settings of the model that leave its parameters' shapes alone are like any other setting.
    remat = load_config(None, [*TINY, "model.remat=full", "model.parscale_attn_smooth=0.2"])
    with pytest.raises(ConfigError, match=r"model.parscale_attn_smooth: .* pass --override-config"):
        Run(run_dir, remat).check_config(override=False)
    Run(run_dir, remat).check_config(override=True)
