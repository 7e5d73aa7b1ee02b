"""Sharded training equals single-device training: 8 CPU devices, four meshes, FSDP on and off.

`mesh_worker.py` trains in a subprocess with 8 devices (this process has one); the reference runs
here. Tolerance: losses and gradient norms within 1e-5 absolute (they are ~5 and ~2), every
gradient tensor within 2e-5 of its largest entry; measured differences are below 4e-6.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import mesh_worker
from conftest import SUBPROCESS_TIMEOUT
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from parscale_jax.config import load_config
from parscale_jax.errors import ConfigError
from parscale_jax.layout import Layout
from parscale_jax.sharding import RULES, rules_for
from parscale_jax.sharding import spec as partition_spec
from parscale_jax.training.loop import train

RUNS = list(mesh_worker.MESHES)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("mesh")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, str(Path(mesh_worker.__file__)), str(out)], check=True, env=env,
                   timeout=SUBPROCESS_TIMEOUT)
    return out, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("single") / "run"
    config = mesh_worker.tiny_config()
    assert jax.device_count() == 1
    train(config, run_dir, progress=False)
    return {"losses": mesh_worker.logged(run_dir, "loss"), "grad_norms": mesh_worker.logged(run_dir, "grad_norm"),
            "grads": mesh_worker.first_gradients(config)}


@pytest.mark.parametrize("run", RUNS)
def test_losses_and_gradients_equal_one_device(sharded, reference, run):
    out, results = sharded
    assert len(results[run]["losses"]) == 4
    np.testing.assert_allclose(results[run]["losses"], reference["losses"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(results[run]["grad_norms"], reference["grad_norms"], rtol=0, atol=1e-5)
    grads = np.load(out / f"{run}.npz")
    assert sorted(grads.files) == sorted(reference["grads"])
    for name, expected in reference["grads"].items():
        scale = np.max(np.abs(expected))
        assert scale > 0, name
        np.testing.assert_allclose(grads[name], expected, rtol=0, atol=2e-5 * scale, err_msg=name)


# What the rules say, written out: (data, stream, model) mesh axes per dimension.
EXPECTED_SPECS = {
    "embedding": ["model", None],  # [V, D]
    "q_proj": [None, None, "model"],  # [L, D, N*H]
    "k_proj": [None, None, "model"],  # [L, D, K*H]
    "o_proj": [None, "model", None],  # [L, N*H, D]
    "down_proj": [None, "model", None],  # [L, F, D]
    "prefix_k": [None, "stream", "model", None, None],  # [L, P, K, T, H]
    "norm": [None],
    "aggregate_in_kernel": ["stream", None],  # [P*D, D]
}
FSDP_SPECS = {  # the hidden dimension also over `data`
    "embedding": ["model", "data"],
    "q_proj": [None, "data", "model"],
    "k_proj": [None, "data", "model"],
    "o_proj": [None, "model", "data"],
    "down_proj": [None, "model", "data"],
    "aggregate_in_kernel": ["stream", "data"],
}


def test_splash_attention_on_a_mesh_equals_one_device(sharded, reference):
    """The splash kernels run per device under shard_map (rows over data, kv heads over model, the
    streams over stream): their gradients equal the einsum kernel's on one device."""
    grads = np.load(sharded[0] / "splash-2x2x2.npz")
    assert sorted(grads.files) == sorted(reference["grads"])
    for name, expected in reference["grads"].items():
        scale = np.max(np.abs(expected))
        np.testing.assert_allclose(grads[name], expected, rtol=0, atol=2e-5 * scale, err_msg=name)


@pytest.mark.parametrize("run", RUNS)
def test_parameter_and_optimizer_shardings_follow_the_rules(sharded, run):
    _, results = sharded
    expected = {**EXPECTED_SPECS, **(FSDP_SPECS if run.endswith("fsdp") else {})}
    specs = results[run]["specs"]
    for name, spec in expected.items():
        for kind in ("param", "mu", "nu"):
            got = specs[f"{kind}:{name}"]
            assert got[: len(spec)] == spec and not any(got[len(spec):]), (run, kind, name, got)


def test_checkpoint_moves_between_meshes(sharded, reference):
    """Saved at step 2 on (2,2,2) with FSDP, resumed on (1,2,4) without: the same four losses."""
    _, results = sharded
    np.testing.assert_allclose(results["resume"]["losses"], reference["losses"], rtol=0, atol=1e-5)


def test_a_run_growing_on_a_mesh_equals_one_device(sharded, tmp_path):
    _, results = sharded
    train(mesh_worker.tiny_config(*mesh_worker.GROWTH), tmp_path / "run", progress=False)
    np.testing.assert_allclose(results["growth"]["losses"], mesh_worker.logged(tmp_path / "run", "loss"),
                               rtol=0, atol=1e-5)


def test_generation_on_a_stream_and_model_sharded_mesh_equals_one_device(sharded):
    out, _ = sharded
    on_mesh = np.load(out / "generation.npz")
    alone = mesh_worker.generation(mesh_worker.tiny_config())
    np.testing.assert_array_equal(on_mesh["tokens"], alone["tokens"])
    np.testing.assert_allclose(on_mesh["logits"], alone["logits"], rtol=0, atol=1e-5)


def test_task_scores_on_a_mesh_equal_one_device(sharded):
    """shakespeare_mc through the lm-evaluation-harness adapter: the (2, 2, 2) FSDP run's checkpoint
    scored on its mesh (rows over data, streams over stream, heads over model) and here on one device
    gives the same log-likelihood for every request and the same accuracies. The log-likelihoods are
    float32 sums over a continuation's tokens (about -250, where float32's spacing is 3e-5): within 1e-6 of their
    size (measured: 1.8e-7, 3.1e-5 absolute)."""
    out, results = sharded
    alone = mesh_worker.task_scores(out / "2x2x2-fsdp", *mesh_worker.mesh_overrides((1, 1, 1), False))
    on_mesh = results["tasks"]
    assert len(on_mesh["log_likelihoods"]) == len(alone["log_likelihoods"]) == 4 * mesh_worker.TASK_LIMIT
    difference = np.abs(np.subtract(on_mesh["log_likelihoods"], alone["log_likelihoods"]))
    print(f"task log-likelihoods on (2, 2, 2) against one device: max |difference| {difference.max():.2e}, "
          f"relative {(difference / np.abs(alone['log_likelihoods'])).max():.2e}")
    np.testing.assert_allclose(on_mesh["log_likelihoods"], alone["log_likelihoods"], rtol=1e-6, atol=0)
    assert on_mesh["greedy"] == alone["greedy"]
    assert (on_mesh["acc"], on_mesh["acc_norm"]) == (alone["acc"], alone["acc_norm"])


def test_every_parameter_declares_axes_that_have_rules():
    from parscale_jax.model import abstract_params, param_info

    config = mesh_worker.tiny_config("model.tie_embeddings=false")
    params = abstract_params(config.model)
    info = param_info(config.model)
    assert jax.tree.structure(params) == jax.tree.structure(info)
    for leaf, declared in zip(jax.tree.leaves(params), jax.tree.leaves(info)):
        assert len(declared.axes) == leaf.ndim and declared.shape == leaf.shape, declared
        assert all(axis in RULES for axis in declared.axes), declared
    layout = Layout.create(config)
    with pytest.raises(KeyError, match="extra/weight_q is not a parameter of this model"):
        layout.param_shardings({"extra": {"weight_q": params["norm"]["weight"]}})
    with pytest.raises(ValueError, match="declares axes .* but has 2 dimensions"):
        layout.param_shardings({"norm": {"weight": jax.ShapeDtypeStruct((2, 64), np.float32)}})


def test_kv_heads_fewer_than_model_devices_are_replicated():
    mesh_shape = {"data": 2, "stream": 1, "model": 4}
    qwen_rules = rules_for(num_kv_heads=2, mesh_shape=mesh_shape, fsdp=True)
    assert partition_spec(("layers", "embed", "kv_heads"), qwen_rules) == PartitionSpec(None, "data", None)
    assert partition_spec(("layers", "embed", "heads"), qwen_rules) == PartitionSpec(None, "data", "model")
    rules = rules_for(num_kv_heads=8, mesh_shape=mesh_shape, fsdp=False)
    assert partition_spec(("layers", "embed", "kv_heads"), rules) == PartitionSpec(None, None, "model")


def test_a_rule_may_split_a_logical_axis_over_several_mesh_axes(monkeypatch):
    """A batch split over `data` and `expert` (as expert parallelism splits it): the mesh has both
    axes, the batch's spec names both, and the micro-batch must divide their product."""
    from parscale_jax import sharding

    monkeypatch.setitem(sharding.RULES, "batch", ("data", "expert"))
    assert sharding.mesh_axes() == ("data", "expert", "stream", "model")
    config = load_config(overrides=["mesh.data=2", "mesh.expert=2", "train.batch_size=8"])
    assert config.mesh.shape == {"data": 2, "expert": 2, "stream": 1, "model": 1}
    assert partition_spec(("batch", "length")) == PartitionSpec(("data", "expert"), None)
    with pytest.raises(ConfigError, match=r"mesh.data: mesh.data=2 x mesh.expert=3 = 6 devices do not divide the "
                                          r"micro-batch of 8 rows"):
        load_config(overrides=["mesh.data=2", "mesh.expert=3", "train.batch_size=8"])


def test_a_mesh_that_does_not_fit_the_devices_is_refused():
    with pytest.raises(ConfigError, match=r"data=2 x expert=1 x stream=1 x model=1 = 2 devices, but 1 are available"):
        Layout.create(load_config(overrides=["mesh.data=2"]))
    with pytest.raises(ConfigError, match=r"cannot fill: 1 devices do not split into data=-1 x expert=1 x stream=2"):
        Layout.create(load_config(overrides=["model.parscale_n=2", "mesh.stream=2"]))


# --- Two processes, each with two CPU devices, joined by jax.distributed.initialize on 127.0.0.1.

LAUNCH = Path(__file__).parents[1] / "launch" / "local.sh"


def two_processes(run_dir: Path, *args: str) -> None:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = ["bash", str(LAUNCH), "-n", "2", "-d", "2", "-l", str(run_dir.parent / f"{run_dir.name}-logs"),
               sys.executable, "-m", "parscale_jax.cli", "train", "--run-dir", str(run_dir), "--no-progress",
               *mesh_worker.TINY, "mesh.data=-1", "mesh.stream=2", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    logs = "\n".join(p.read_text() for p in sorted((run_dir.parent / f"{run_dir.name}-logs").glob("*.log")))
    assert result.returncode == 0, result.stdout + result.stderr + logs


@pytest.fixture(scope="module")
def multi_host(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("hosts") / "run"
    two_processes(run_dir)
    return run_dir


def test_two_processes_train_like_one(multi_host, reference):
    np.testing.assert_allclose(mesh_worker.logged(multi_host, "loss"), reference["losses"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(mesh_worker.logged(multi_host, "grad_norm"), reference["grad_norms"],
                               rtol=0, atol=1e-5)
    # Each process saved its own data-iterator position next to the shared state.
    data_iter = multi_host / "checkpoints" / "4" / "data_iter"
    assert sorted(p.name for p in data_iter.iterdir() if p.suffix == ".json") == \
        ["process_0-of-2.json", "process_1-of-2.json"]


def test_two_processes_stop_and_resume_identically(multi_host, tmp_path):
    run_dir = tmp_path / "run"
    two_processes(run_dir, "--stop-at", "2")
    assert len(mesh_worker.logged(run_dir, "loss")) == 2
    two_processes(run_dir)
    assert mesh_worker.logged(run_dir, "loss") == mesh_worker.logged(multi_host, "loss")
