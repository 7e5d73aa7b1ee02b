"""Masked structural growth (`train.growth`): each operator keeps the function at the moment of
growth whatever the new weights are, the Adam moments move into the leading blocks, a growing run
has no loss jump, resumes mid-ramp bitwise, and exports once its masks are 1."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_hf import load_hf, our_logits, torch_logits

from parscale_jax.cli import main
from parscale_jax.config import load_config, packaged_config_path
from parscale_jax.errors import ConfigError
from parscale_jax.growth import Ramp, Schedule
from parscale_jax.layout import Layout
from parscale_jax.model import init_params, model_graphdef
from parscale_jax.model.config import ModelConfig
from parscale_jax.runs import Run
from parscale_jax.training.loop import train
from parscale_jax.training.step import Trainer
from parscale_jax.transforms.grow import grow_state, grow_tree
from conftest import TINY as BASE

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SMALL = ModelConfig(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1, num_layers=2,
                    parscale_n_tokens=4, head_dim=16)
OPERATORS = {"hidden": dict(hidden_size=48), "mlp": dict(intermediate_size=96),
             "heads": dict(num_heads=4, num_kv_heads=2), "depth": dict(num_layers=3), "streams": "P+1",
             "all": "all"}


def grown_model(small: ModelConfig, operator: str) -> ModelConfig:
    P = small.parscale_n
    change = OPERATORS[operator]
    if change == "P+1":
        change = dict(parscale_n=P + 1)
    elif change == "all":
        change = dict(hidden_size=48, intermediate_size=96, num_heads=4, num_kv_heads=2, num_layers=3,
                      parscale_n=P + 1 if P > 1 else P)
    return dataclasses.replace(small, **change)


def logits(cfg: ModelConfig, params: dict, ids, masks=None) -> np.ndarray:
    model = nnx.merge(model_graphdef(cfg), nnx.State(params))
    return np.asarray(model(jnp.asarray(ids), masks=masks)[0])


def leading_block(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    return new[tuple(slice(0, n) for n in old.shape)]


# Streams from P = 1 are not function-preserving (every stream gains a prefix; docs/growth.md).
@pytest.mark.parametrize("P, operator", [(P, op) for P in (1, 2) for op in OPERATORS if (P, op) != (1, "streams")])
def test_growth_keeps_the_logits_whatever_the_new_weights(P, operator):
    small = dataclasses.replace(SMALL, parscale_n=P)
    big = grown_model(small, operator)
    params = init_params(small, 0)
    ids = np.random.default_rng(0).integers(0, 320, (2, 12))
    before = logits(small, params, ids)
    ramp = Ramp(start=10, steps=4, old=small, new=big)
    grown = [grow_tree(params, init_params(big, seed), small, big) for seed in (1, 2)]
    for new in grown:
        np.testing.assert_allclose(logits(big, new, ids, ramp.masks(10)), before, atol=1e-6, rtol=0)
        # Halfway up the ramp the new parts take part, and differently for each seed.
        assert np.abs(logits(big, new, ids, ramp.masks(12)) - before).max() > 1e-3
    assert np.abs(logits(big, grown[0], ids, ramp.masks(12)) - logits(big, grown[1], ids, ramp.masks(12))).max() > 1e-3
    # Every old tensor is the leading block of its grown one (the aggregator's input as [P, D]).
    for path, old in jax.tree_util.tree_leaves_with_path(params):
        new = grown[0]
        for key in path:
            new = new[key.key]
        if path[-1].key == "aggregate_in_kernel":
            old = old.reshape(small.parscale_n, small.hidden_size, -1)
            new = new.reshape(big.parscale_n, big.hidden_size, -1)
        np.testing.assert_array_equal(leading_block(np.asarray(new), np.asarray(old)), old, err_msg=str(path))


def test_streams_from_one_are_measured_not_exact():
    """P = 1 -> 2: the aggregator's masks keep the mix on the old stream, but its attention now has
    a prefix; what that costs is what docs/growth.md reports."""
    small, big = SMALL, dataclasses.replace(SMALL, parscale_n=2)
    params = init_params(small, 0)
    ids = np.random.default_rng(0).integers(0, 320, (2, 12))
    masks = Ramp(0, 4, small, big).masks(0)
    difference = np.abs(logits(big, grow_tree(params, init_params(big, 1), small, big), ids, masks) - logits(small, params, ids))
    assert 0 < difference.max() < 1.0


def test_adam_moments_move_into_the_leading_block():
    config = load_config(packaged_config_path("default"), ["model.parscale_n=2", "model.parscale_n_tokens=4"])
    small = config.model
    big = dataclasses.replace(small, hidden_size=192, intermediate_size=400, num_layers=5, parscale_n=3)
    create_small = Trainer.of(config, small).create_state
    create_big = Trainer.of(config, big).create_state
    state = create_small(init_params(small, 0))
    keys = iter(jax.random.split(jax.random.key(1), 10_000))
    state["opt_state"] = jax.tree.map(
        lambda x: jax.random.normal(next(keys), x.shape) if x.ndim else jnp.asarray(7, x.dtype), state["opt_state"])
    state["step"] = jnp.asarray(7, jnp.int32)
    new = grow_state(state, create_big(init_params(big, 1)), small, big)
    assert int(new["step"]) == 7
    old_leaves = dict(jax.tree_util.tree_leaves_with_path(state["opt_state"]))
    moments = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(new["opt_state"]):
        old = np.asarray(old_leaves[path])
        leaf = np.asarray(leaf)
        if leaf.ndim == 0:  # the step counts
            assert leaf == 7
            continue
        if path[-1].key == "aggregate_in_kernel":
            old, leaf = old.reshape(2, 128, -1), leaf.reshape(3, 192, -1)
        block = tuple(slice(0, n) for n in old.shape)
        np.testing.assert_array_equal(leaf[block], old)
        rest = leaf.copy()
        rest[block] = 0
        assert not rest.any(), f"{path}: moments outside the old block must start at zero"
        moments += 1
    assert moments == 2 * len(jax.tree.leaves(state["params"]))  # mu and nu of every parameter


# A P = 2 run that grows width and MLP at step 3, then depth, heads and streams at step 7.
RUN = [*BASE, "model.hidden_size=64", "model.intermediate_size=128", "model.max_position_embeddings=64",
       "train.batch_size=4", "checkpoint.every=2", "checkpoint.async_save=false"]
STAGES = [{"step": 3, "hidden_size": 96, "intermediate_size": 192, "ramp_steps": 3},
          {"step": 7, "num_layers": 3, "num_heads": 8, "num_kv_heads": 4, "parscale_n": 3, "ramp_steps": 3}]


def growth_config(steps: int, stages: list[dict]):
    return load_config(packaged_config_path("default"), [*RUN, f"train.steps={steps}",
                                                         f"train.growth={json.dumps(stages)}"])


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def checkpoint_params(run_dir, step: int) -> tuple[dict, ModelConfig]:
    run = Run.open(run_dir).settled(step, "the test")
    layout = Layout.create(run.config)
    with jax.set_mesh(layout.mesh):
        params, _ = run.params(layout, step)
    return jax.tree.map(np.asarray, params), run.config.model


@pytest.fixture(scope="module")
def grown_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("growth") / "run"
    train(growth_config(12, STAGES), directory, progress=False)
    return directory


def test_a_growing_run_has_no_loss_jump_at_either_stage(grown_run, tmp_path):
    grown = losses(grown_run)
    # The update from step 3 (and from 7) runs the grown model with its masks at 0: the same loss as
    # the model before the stage on the same batch.
    train(growth_config(12, []), tmp_path / "small", progress=False, stop_at=4)
    assert abs(grown[4] - losses(tmp_path / "small")[4]) < 1e-4
    train(growth_config(12, STAGES[:1]), tmp_path / "one_stage", progress=False, stop_at=8)
    assert abs(grown[8] - losses(tmp_path / "one_stage")[8]) < 1e-4
    assert all(np.isfinite(list(grown.values()))) and grown[12] < grown[1]
    params, model = checkpoint_params(grown_run, 12)
    assert (model.hidden_size, model.num_layers, model.num_heads, model.parscale_n) == (96, 3, 8, 3)
    assert params["layers"]["self_attn"]["prefix_k"].shape == (3, 3, 4, 4, 16)  # [L, P, K, T, H]


def test_a_run_killed_mid_ramp_resumes_bitwise(grown_run, tmp_path, capsys):
    config = growth_config(12, STAGES)
    train(config, tmp_path / "run", progress=False, stop_at=8)  # inside the second ramp (7 .. 10)
    capsys.readouterr()
    # Its newest checkpoint cannot be read as a plain model: the refusal says so without a --step.
    assert main(["eval", "--run-dir", str(tmp_path / "run")]) == 2
    assert ("error: --run-dir: the newest checkpoint, step 8, lies inside a growth ramp (train.growth, masks below "
            "1 until step 10), which eval cannot take: pass --step 6 (the newest checkpoint outside a ramp) or "
            "train on to step 10 or later") in capsys.readouterr().err
    train(config, tmp_path / "run", progress=False)
    resumed, _ = checkpoint_params(tmp_path / "run", 12)
    whole, _ = checkpoint_params(grown_run, 12)
    jax.tree.map(np.testing.assert_array_equal, resumed, whole)
    assert {k: v for k, v in losses(tmp_path / "run").items() if k > 8} == {
        k: v for k, v in losses(grown_run).items() if k > 8}


def test_a_grown_run_exports_once_its_masks_are_one(grown_run, tmp_path, capsys):
    assert main(["export", "--run-dir", str(grown_run), "--step", "8", "--out", str(tmp_path / "mid")]) == 2
    assert "error: --step: step 8 lies inside a growth ramp" in capsys.readouterr().err
    assert main(["eval", "--run-dir", str(grown_run), "--step", "8"]) == 2
    assert main(["export", "--run-dir", str(grown_run), "--out", str(tmp_path / "hf")]) == 0
    params, model = checkpoint_params(grown_run, 12)
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (hf_config["hidden_size"], hf_config["num_hidden_layers"], hf_config["parscale_n"]) == (96, 3, 3)
    ids = np.random.default_rng(1).integers(0, 257, (2, 20))
    np.testing.assert_allclose(torch_logits(load_hf(tmp_path / "hf").eval(), ids), our_logits(params, model, ids),
                               atol=1e-4, rtol=0)
    assert main(["eval", "--run-dir", str(grown_run)]) == 0


def test_the_schedule_is_a_function_of_the_step():
    schedule = Schedule(growth_config(12, STAGES))
    assert schedule.model_at(3).hidden_size == 64 and schedule.phase(3).model.hidden_size == 96
    assert schedule.phase(3).ramp.value(3) == 0 and schedule.phase(5).ramp.value(5) == pytest.approx(2 / 3)
    assert schedule.phase(6).ramp is None and schedule.masks_at(6) is None and schedule.masks_at(5) is not None
    assert schedule.model_at(12).num_layers == 3
    # FLOPs count each update at its phase's size.
    small, mid = (schedule.flops(s) for s in (3, 7))
    assert schedule.flops(4) - small > small / 3 and schedule.flops(12) - schedule.flops(11) > (mid - small) / 4


@pytest.mark.parametrize("stages, fragment", [
    ([{"step": 3, "hidden_size": 32}], "train.growth[0].hidden_size: growth cannot shrink: 64 -> 32"),
    ([{"step": 3}], "train.growth[0]: grows nothing"),
    ([{"step": 3, "num_heads": 8}], "train.growth[0].num_kv_heads: 8 heads on 2 kv heads"),
    ([{"step": 3, "hidden_size": 96, "ramp_steps": 5}, {"step": 6, "num_layers": 3}],
     "train.growth[0].ramp_steps: the ramp ends at step 8, after the next stage begins (step 6)"),
    ([{"step": 12, "num_layers": 3}], "train.growth[0].step: must lie in [0, train.steps=12)"),
    ([{"step": 3, "num_layers": 3, "ramp_steps": 0}], "train.growth[0].ramp_steps: must be >= 1"),
    ([{"step": 3, "numlayers": 3}], "train.growth[0].numlayers: unknown key (did you mean 'num_layers'?)"),
    ([{"step": 3, "intermediate_size": 129}], "train.growth[0]: the grown model: mesh.model"),
    # The default ramp (100 steps) past the end of a short run: it would end mid-ramp, unreadable.
    ([{"step": 10, "num_layers": 3}], "train.growth[0].ramp_steps: the ramp of 100 steps (100 unless set) would "
                                      "end at step 110, after train.steps=12"),
    ([{"step": 6, "num_layers": 3, "ramp_steps": 2}, {"step": 3, "hidden_size": 96, "ramp_steps": 2}],
     "train.growth[1].step: the stages must be in the order of their steps: 3 comes after 6"),
])
def test_bad_growth_schedules_are_one_line_errors(stages, fragment):
    overrides = [*RUN, "train.steps=12", f"train.growth={json.dumps(stages)}"]
    if "129" in json.dumps(stages):
        overrides.append("mesh.model=2")
    with pytest.raises(ConfigError) as err:
        load_config(packaged_config_path("default"), overrides)
    assert fragment in str(err.value)


def test_plan_compiles_every_stage(capsys):
    config = growth_config(12, STAGES)
    assert main(["plan", "--gpus", "1", *RUN, "train.steps=12", f"train.growth={json.dumps(STAGES)}"]) == 0
    printed = capsys.readouterr().out
    assert "growth stages" in printed
    assert "from step 3 " in printed and "from step 7 " in printed and "8 heads (4 kv), 3 layers, P = 3" in printed
    assert len(Schedule(config).models) == 3
