"""`parscale-jax plan`: per-device memory of a config on a TPU topology or a GPU count, before booking it.

Each plan runs in its own process, since it chooses how many devices JAX starts with.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from parscale_jax.errors import ConfigError
from conftest import SUBPROCESS_TIMEOUT, TINY as BASE

TINY = [*BASE, "model.hidden_size=64", "model.intermediate_size=128", "model.num_kv_heads=4", "data.seq_len=64",
        "train.batch_size=16"]


def plan(tmp_path, *args: str) -> tuple[int, str, str, dict | None]:
    import jax

    out = tmp_path / "plan.json"
    # The tests' compilation cache: a program compiled again (a suggestion, then its plan) loads at once.
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir}
    result = subprocess.run([sys.executable, "-m", "parscale_jax.cli", "plan", "--out", str(out), *args],
                            capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, env=env)
    report = json.loads(out.read_text()) if out.exists() else None
    return result.returncode, result.stdout, result.stderr, report


def parameter_count(*overrides: str) -> int:
    import jax

    from parscale_jax.config import load_config
    from parscale_jax.model import abstract_params

    model = load_config(overrides=list(overrides)).model
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(model)))


def test_gpu_plan_reports_exact_parameter_and_optimizer_bytes(tmp_path):
    n_params = parameter_count(*TINY)
    code, stdout, _, replicated = plan(tmp_path, "--gpus", "8", *TINY, "mesh.data=8")
    assert code == 0 and "FITS" in stdout and "an estimate" in stdout
    assert "\nFITS (estimated: activations from the CPU compiler; compiled in " in stdout  # the verdict too
    assert "suggestion" not in replicated and "fits with" not in stdout
    assert replicated["parameters"] == n_params
    assert replicated["params_bytes"] == 4 * n_params  # float32, a full copy on every device
    assert 8 * n_params <= replicated["opt_state_bytes"] <= 8 * n_params + 64  # Adam's two moments
    assert replicated["temporaries_bytes"] > 0 and replicated["total_bytes"] > replicated["params_bytes"]

    code, _, _, sharded = plan(tmp_path, "--gpus", "8", *TINY, "mesh.data=2", "mesh.stream=2",
                               "mesh.model=2", "mesh.fsdp=true")
    assert code == 0
    # Every matrix is split 2 (data) x 2 (model) ways, the prefixes and aggregator by stream: at most
    # a third of the replicated size is left (norms and biases stay whole).
    assert sharded["params_bytes"] < replicated["params_bytes"] / 3
    assert sharded["mesh"] == {"data": 2, "expert": 1, "stream": 2, "model": 2}


def test_plan_exit_status_says_whether_it_fits(tmp_path):
    """When not even the parameters and optimizer state fit, the plan says in one line that nothing
    does, without compiling any candidate (every one's estimate is over)."""
    code, stdout, _, report = plan(tmp_path, "--gpus", "2", "--gpu-memory", "0.0001", *TINY)
    assert code == 1 and "DOES NOT FIT" in stdout and report["fits"] is False
    assert "\nDOES NOT FIT (estimated: activations from the CPU compiler; compiled in " in stdout
    suggestion = report["suggestion"]
    assert suggestion["fits"] is False and suggestion["overrides"] == [] and suggestion["untried"] == 0
    assert suggestion["tried"][0]["overrides"] == ["mesh.fsdp=true"]
    assert all("total_bytes" not in attempt for attempt in suggestion["tried"])
    lines = [line for line in stdout.splitlines() if line.startswith("nothing fits")]
    assert lines == [f"nothing fits, not even with {' '.join(suggestion['tried'][-1]['overrides'])} "
                     f"(estimated: {suggestion['tried'][-1]['estimated_bytes'] / 1024**3:.2f} GiB per device of 0.00)"]


# Wide weights, few tokens: the memory is the weights, their gradients and Adam's moments.
WIDE = [*TINY, "model.hidden_size=256", "model.intermediate_size=1024", "model.num_layers=1", "data.seq_len=16",
        "train.batch_size=2"]


def test_plan_suggests_overrides_that_fit(tmp_path):
    """Replicated on two data devices the step overflows the memory; FSDP halves nearly all of it. The
    plan names the overrides, and the step fits with them."""
    code, _, _, replicated = plan(tmp_path, "--gpus", "2", *WIDE)
    assert code == 0 and replicated["mesh"]["data"] == 2 and not replicated["fsdp"]
    memory = str(0.75 * replicated["total_bytes"] / 1024**3)  # between the FSDP size (about half) and this
    code, stdout, _, report = plan(tmp_path, "--gpus", "2", "--gpu-memory", memory, *WIDE)
    suggestion = report["suggestion"]
    assert code == 1 and suggestion["fits"] and suggestion["overrides"] == ["mesh.fsdp=true"], stdout
    assert (f"fits with: mesh.fsdp=true (compiled: {suggestion['total_bytes'] / 1024**3:.2f} GiB per device of "
            f"{float(memory):.2f}; estimated: activations from the CPU compiler)") in stdout.splitlines()

    code, stdout, _, fixed = plan(tmp_path, "--gpus", "2", "--gpu-memory", memory, *WIDE, *suggestion["overrides"])
    assert code == 0 and fixed["fsdp"] and "suggestion" not in fixed, stdout
    assert fixed["total_bytes"] == suggestion["total_bytes"]


@pytest.mark.parametrize("args,fragment", [
    (["--topology", "v9z-8"], "unknown TPU topology 'v9z-8'"),
    (["--topology", "v5p-6"], "no v5p slice has 3 chips"),
    (["--topology", "v5p:2x2"], "v5p slices are 3-D"),
    ([], "name a TPU topology (--topology v5p-256) or a GPU count"),
    (["--gpus", "8", "mesh.data=4"], "mesh: data=4 x expert=1 x stream=1 x model=1 = 4 devices, but 8 are available"),
])
def test_bad_targets_are_one_line_errors(tmp_path, args, fragment):
    code, stdout, stderr, _ = plan(tmp_path, *args)
    assert code == 2 and stdout == ""
    assert stderr.startswith("parscale-jax plan: error: ") and fragment in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


def test_tpu_plan_is_compiled_by_the_tpu_compiler(tmp_path):
    code, stdout, _, report = plan(tmp_path, "--topology", "v5e-8", *TINY, "mesh.stream=2", "mesh.model=4")
    assert code == 0, stdout
    assert report["exact"] and report["devices"] == 8 and report["mesh"] == {"data": 1, "expert": 1, "stream": 2, "model": 4}
    assert report["memory_per_device_bytes"] == 15.75 * 1024**3
    assert "the target's compiler" in stdout and "\nFITS (compiled in " in stdout  # exact: no caveat


def test_splash_attention_compiles_for_a_tpu_mesh(tmp_path):
    """The Mosaic kernels lower for the real TPU compiler, each device running its own part (XLA
    refuses to partition a Mosaic kernel outside shard_map)."""
    code, stdout, stderr, report = plan(tmp_path, "--topology", "v5e-8", *TINY, "model.attention=splash",
                                        "mesh.data=2", "mesh.stream=2", "mesh.model=2")
    assert code == 0, stdout + stderr
    assert report["exact"] and report["mesh"] == {"data": 2, "expert": 1, "stream": 2, "model": 2}


def test_a_moe_plan_compiles_with_an_expert_axis_for_a_tpu(tmp_path):
    """Experts split four ways on a v5e-8 (the exchange an all-to-all inside shard_map): each chip
    holds a quarter of the experts' weights and Adam moments."""
    moe = [*TINY, "model.ffn=moe", "model.num_experts=4", "model.experts_per_token=2", "model.moe_capacity_factor=1.25",
           "mesh.stream=2"]
    reports = {}
    for data, experts in ((4, 1), (1, 4)):  # the batch over 4 devices either way
        code, stdout, stderr, reports[experts] = plan(tmp_path, "--topology", "v5e-8", *moe, f"mesh.data={data}",
                                                      f"mesh.expert={experts}")
        assert code == 0, stdout + stderr
    assert reports[4]["exact"] and reports[4]["mesh"] == {"data": 1, "expert": 4, "stream": 2, "model": 1}
    assert reports[1]["parameters"] == reports[4]["parameters"]
    L, E, D, F = 2, 4, 64, 128
    split_off = 4 * L * E * 3 * D * F * 3 // 4  # float32: the three fourths of the experts a chip no longer holds
    assert reports[1]["params_bytes"] - reports[4]["params_bytes"] == split_off
    assert reports[1]["opt_state_bytes"] - reports[4]["opt_state_bytes"] == 2 * split_off


def test_tpu_plan_refuses_what_does_not_fit(tmp_path):
    """Every device holds all 1.8 B parameters and their Adam moments (streams split only the prefixes):
    more than a v5e's HBM, which no remat or micro-batch changes (and no suggestion compiles)."""
    code, stdout, stderr, report = plan(tmp_path, "--config", "paper_1.6b", "--topology", "v5e-4",
                                        "model.parscale_n=8", "mesh.stream=4")
    assert code == 1 and report is not None, stdout + stderr
    assert report["fits"] is False
    assert "Ran out of memory" in report["compiler"] and "\nDOES NOT FIT (compiled in " in stdout
    assert report["params_bytes"] + report["opt_state_bytes"] > report["memory_per_device_bytes"]
    assert not report["suggestion"]["fits"] and "\nnothing fits, not even with model.remat=full " in stdout


def test_multi_slice_mesh_runs_data_across_slices():
    import numpy as np

    from parscale_jax.analysis import plan as planning
    from parscale_jax.config import load_config
    from parscale_jax.layout import Layout

    devices = list(planning.tpu_target("v5e-8", slices=2).devices)
    config = load_config(overrides=[*TINY, "mesh.stream=2", "mesh.model=2", "mesh.dcn_data=2"])
    mesh = Layout.create(config, devices).mesh
    assert dict(mesh.shape) == {"data": 4, "expert": 1, "stream": 2, "model": 2}
    slice_of = np.vectorize(lambda device: device.slice_index)(mesh.devices)
    assert (slice_of[:2] == 0).all() and (slice_of[2:] == 1).all()  # only `data` crosses the DCN
    with pytest.raises(ConfigError, match="mesh.dcn_data: is 1 but the devices form 2 slice"):
        Layout.create(load_config(overrides=[*TINY, "mesh.stream=2"]), devices)
