"""Depth up-scaling (`parscale-jax upscale`): SOLAR's layer map bit for bit, prefixes included;
identity blocks that leave the function unchanged; exports that transformers loads; the new run
evaluates and trains at once."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from test_hf import load_hf, our_logits, torch_logits

from parscale_jax.interop import hf
from parscale_jax.cli import main
from parscale_jax.config import load_config, packaged_config_path
from parscale_jax.errors import ConfigError
from parscale_jax.layout import Layout
from parscale_jax.model import init_params, split_params
from parscale_jax.runs import Run
from parscale_jax.transforms.upscale import identity_layers, solar_layers, upscale

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def base_run(tmp_path, P: int) -> tuple[Run, dict]:
    """The default 4-layer model (with P streams, prefixes far from zero) as a run at step 0."""
    config = load_config(packaged_config_path("default"), [f"model.parscale_n={P}", "model.init_std=0.1",
                                                           "train.steps=2", "train.warmup_steps=1",
                                                           "train.batch_size=4", "data.seq_len=64"])
    params = jax.tree.map(np.asarray, init_params(config.model, 5))
    layout = Layout.create(config)
    parscale, backbone = split_params(params, config.model)
    with jax.set_mesh(layout.mesh):
        initial = {"backbone": layout.place(backbone, np.float32)}
        if P > 1:
            initial[f"parscale_p{P}"] = layout.place(parscale, np.float32)
        run = Run.create(tmp_path / f"base{P}", config, initial, "test", [])
    return run, params


def run_params(run_dir) -> tuple[Run, dict]:
    run = Run.open(run_dir)
    layout = Layout.create(run.config)
    with jax.set_mesh(layout.mesh):
        params, step = run.params(layout)
    assert step == 0
    return run, jax.tree.map(np.asarray, params)


def test_layer_maps():
    assert solar_layers(32, 8) == list(range(24)) + list(range(8, 32))  # SOLAR 10.7B: 48 layers
    assert solar_layers(4, 1) == [0, 1, 2, 1, 2, 3]
    assert identity_layers(4, 2) == ([0, 1, 1, 2, 3, 3], [False, False, True, False, False, True])
    assert identity_layers(6, 3)[0] == [0, 1, 1, 2, 3, 3, 4, 5, 5]
    with pytest.raises(ConfigError, match="--drop: must lie in"):
        solar_layers(4, 4)


@pytest.mark.parametrize("P", [1, 2])
def test_solar_takes_layers_0_1_2_1_2_3_bit_for_bit_and_exports(tmp_path, P):
    base, params = base_run(tmp_path, P)
    summary = upscale(base.directory, tmp_path / "up", drop=1)
    assert summary["layer_map"] == [0, 1, 2, 1, 2, 3]
    run, up = run_params(tmp_path / "up")
    assert run.config.model.num_layers == 6
    layer_map = np.asarray([0, 1, 2, 1, 2, 3])
    for path, leaf in jax.tree_util.tree_leaves_with_path(params["layers"]):
        got = up["layers"]
        for key in path:
            got = got[key.key]
        np.testing.assert_array_equal(got, leaf[layer_map], err_msg=str(path))
    if P > 1:  # the per-layer prefixes are among them
        assert up["layers"]["self_attn"]["prefix_k"].shape[0] == 6
    for name in set(params) - {"layers"}:  # embedding, final norm, aggregator: kept
        for a, b in zip(jax.tree.leaves(params[name]), jax.tree.leaves(up[name])):
            np.testing.assert_array_equal(a, b)
    lineage = run.lineage()
    assert lineage["made_from"] == "upscale" and lineage["method"] == "solar" and lineage["layer_map"] == layer_map.tolist()
    (parent,) = lineage["parents"]
    assert parent["kind"] == "run" and parent["path"] == str(base.directory.absolute())
    assert parent["lineage"]["made_from"] == "test"

    # Its Hugging Face export: Qwen2 for P = 1, our remote code for P > 1, with our logits.
    assert main(["export", "--run-dir", str(tmp_path / "up"), "--out", str(tmp_path / "hf")]) == 0
    ids = np.random.default_rng(1).integers(0, 257, (2, 20))
    model = load_hf(tmp_path / "hf").eval()
    assert type(model).__name__ == ("Qwen2ForCausalLM" if P == 1 else "Qwen2ParScaleForCausalLM")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_hidden_layers"] == 6
    np.testing.assert_allclose(torch_logits(model, ids), our_logits(up, run.config.model, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("P", [1, 2])
def test_identity_blocks_leave_the_logits_unchanged(tmp_path, P):
    base, params = base_run(tmp_path, P)
    assert main(["upscale", "--from", str(base.directory), "--out", str(tmp_path / "up"), "--insert", "2",
                 "--identity"]) == 0
    run, up = run_params(tmp_path / "up")
    assert run.config.model.num_layers == 6
    assert not up["layers"]["self_attn"]["o_proj"]["kernel"][[2, 5]].any()
    assert up["layers"]["self_attn"]["o_proj"]["kernel"][[0, 1, 3, 4]].all()
    ids = np.random.default_rng(2).integers(0, 257, (2, 20))
    np.testing.assert_allclose(our_logits(up, run.config.model, ids), our_logits(params, base.config.model, ids),
                               atol=1e-6, rtol=0)
    # The new run trains at once, with a fresh optimizer.
    assert main(["train", "--run-dir", str(tmp_path / "up"), "--no-progress"]) == 0
    assert (tmp_path / "up" / "checkpoints").is_dir()


def test_upscale_from_a_hugging_face_checkpoint(tmp_path):
    config = load_config(packaged_config_path("default"), ["model.init_std=0.1"])
    params = jax.tree.map(np.asarray, init_params(config.model, 3))
    source = hf.write_hf_checkpoint(tmp_path / "hf", params, config.model, "byte")
    upscale(source, tmp_path / "up", drop=1)
    run, up = run_params(tmp_path / "up")
    assert run.config.model.num_layers == 6 and run.lineage()["made_from"] == "upscale"
    assert run.lineage()["parents"] == [{"kind": "huggingface", "path": str(source)}]
    np.testing.assert_array_equal(up["layers"]["mlp"]["down_proj"]["kernel"],
                                  params["layers"]["mlp"]["down_proj"]["kernel"][[0, 1, 2, 1, 2, 3]])


@pytest.mark.parametrize("args,fragment", [
    (["--insert", "1"], "--identity: --insert K adds identity blocks"),
    (["--drop", "9"], "--drop: must lie in [1, 3]"),
    (["--drop", "1", "model.hidden_size=64"], "upscale keeps the model's shape"),
    (["--drop", "1", "--insert", "1"], "not allowed with argument"),
])
def test_bad_upscale_arguments_are_one_line(tmp_path, capsys, args, fragment):
    base, _ = base_run(tmp_path, 1)
    command = ["upscale", "--from", str(base.directory), "--out", str(tmp_path / "up"), *args]
    if "not allowed" in fragment:  # argparse's own error
        with pytest.raises(SystemExit):
            main(command)
    else:
        assert main(command) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "up").exists()


def test_transforms_read_their_sources_and_check_their_shapes_in_one_place(tmp_path):
    """`runs.read_source` reads a run (at its newest checkpoint) or a Hugging Face directory the same
    way; `runs.check_same_shapes` names the first parameter in which several models differ, as a
    transform over several runs (a merge) needs; `Run.create` records every parent."""
    from parscale_jax.runs import check_same_shapes, read_source

    config = load_config(packaged_config_path("default"), ["model.init_std=0.1"])
    params = jax.tree.map(np.asarray, init_params(config.model, 3))
    streams = load_config(packaged_config_path("default"), ["model.init_std=0.1", "model.parscale_n=2"]).model
    streams_params = jax.tree.map(np.asarray, init_params(streams, 3))
    source = read_source(hf.write_hf_checkpoint(tmp_path / "hf", streams_params, streams, "byte"), "a test")
    assert source.config.model == streams and source.parent == {"kind": "huggingface", "path": str(tmp_path / "hf")}
    jax.tree.map(np.testing.assert_array_equal, source.params, streams_params)
    with pytest.raises(ConfigError, match="--from: .*nowhere is neither a run directory"):
        read_source(tmp_path / "nowhere", "a test")

    wide = load_config(packaged_config_path("default"), ["model.intermediate_size=384"]).model
    deep = load_config(packaged_config_path("default"), ["model.num_layers=5"]).model
    check_same_shapes({"a": config.model, "b": config.model}, "RUNS")
    with pytest.raises(ConfigError, match=r"RUNS: parameter layers/mlp/down_proj/kernel is \[4, 352, 128\] in a "
                                          r"but \[4, 384, 128\] in wide"):
        check_same_shapes({"a": config.model, "wide": wide}, "RUNS")
    with pytest.raises(ConfigError, match=r"parameter layers/input_layernorm/weight is \[4, 128\] in a but \[5, 128\] "
                                          r"in deep"):
        check_same_shapes({"a": config.model, "deep": deep}, "RUNS")
    with pytest.raises(ConfigError, match="RUNS: streams has parameter aggregate_in_bias, which a lacks"):
        check_same_shapes({"a": config.model, "streams": streams}, "RUNS")

    # A run made from two parents names both, each with its lineage.
    layout = Layout.one_device(config.model)
    with jax.set_mesh(layout.mesh):
        initial = {"backbone": layout.place(split_params(params, config.model)[1], np.float32)}
        Run.create(tmp_path / "merged", config, initial, "merge", [source.parent, source.parent], weights=[0.5, 0.5])
    lineage = Run.open(tmp_path / "merged").lineage()
    assert lineage["made_from"] == "merge" and lineage["parents"] == [source.parent] * 2
    assert lineage["weights"] == [0.5, 0.5]
