"""`model.moe_every` = m > 1: a Mixture-of-Experts in every m-th layer (layer i when (i + 1) % m == 0,
Qwen2-MoE's decoder_sparse_step), dense MLPs in the others. Against transformers' Qwen2-MoE both
ways, through the remote code at P = 2, in training, cached decoding, upcycling, counting and the
refusals."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file

from conftest import TINY
from parscale_jax.config import load_config
from parscale_jax.errors import ConfigError
from parscale_jax.interop import hf
from parscale_jax.model import mlp_stacks, param_info, residual_outputs
from parscale_jax.model.counting import active_non_embedding_params, non_embedding_params, train_flops_per_token
from parscale_jax.training.loop import train
from test_moe import step0_logits
from test_moe_hf import (MOE, OURS, SHAPE, load_hf, loads_through_the_remote_code, our_logits, our_random_params,
                         randomized, torch_logits)

EVERY2 = ["model.num_layers=4", "model.moe_every=2"]

pytestmark = [pytest.mark.usefixtures("torch_single_thread"),
              pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")]


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, 257, (2, 16))


def test_layers_1_and_3_are_routed_in_stacks_of_their_own():
    cfg = load_config(overrides=[*OURS, *EVERY2]).model
    assert mlp_stacks(cfg) == {("dense_mlp",): ("swiglu", [0, 2]), ("moe_mlp",): ("moe", [1, 3])}
    info = param_info(cfg)
    assert "mlp" not in info["layers"]
    assert info["dense_mlp"]["gate_proj"]["kernel"].shape == (2, 32, 64)
    assert info["moe_mlp"]["gate_proj"].axes == ("layers", "experts", "embed", "mlp")
    assert residual_outputs(cfg) == [("layers", "self_attn", "o_proj"), ("dense_mlp", "down_proj"), ("moe_mlp", "down_proj")]
    names = {t.name: t.index for t in hf.hf_tensors(cfg)}
    assert names["model.layers.2.mlp.gate_proj.weight"] == (1,)  # the second dense layer
    assert names["model.layers.3.mlp.experts.1.up_proj.weight"] == (1, 1)
    assert "model.layers.0.mlp.gate.weight" not in names and "model.layers.1.mlp.up_proj.weight" not in names
    # m = 1 keeps the blocks' own feed-forward weights, as before
    assert "mlp" in param_info(load_config(overrides=OURS).model)["layers"]


def test_a_qwen2_moe_checkpoint_with_decoder_sparse_step_2_gives_transformers_logits(tmp_path, ids):
    config = transformers.Qwen2MoeConfig(**{**SHAPE, "num_hidden_layers": 4}, **MOE, decoder_sparse_step=2,
                                         shared_expert_intermediate_size=40)
    model = randomized(transformers.AutoModelForCausalLM.from_config(config))
    model.save_pretrained(tmp_path)
    cfg, params = hf.read_hf_checkpoint(tmp_path)
    assert (cfg.moe_every, cfg.num_layers, cfg.moe_shared_expert_size) == (2, 4, 40)
    np.testing.assert_allclose(our_logits(params, cfg, ids), torch_logits(model, ids), atol=1e-4, rtol=0)
    out = hf.write_hf_checkpoint(tmp_path / "ours", params, cfg, "byte")
    assert json.loads((out / "config.json").read_text())["decoder_sparse_step"] == 2
    source, ours = load_file(str(tmp_path / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(ours) == sorted(source)
    for name, tensor in source.items():
        np.testing.assert_array_equal(ours[name], tensor, err_msg=name)


@pytest.mark.parametrize("overrides,architecture", [
    (["model.qkv_bias=false"], "Qwen2MoeForCausalLM"),  # Mixtral at m = 1; Mixtral routes every layer
    (["model.qkv_bias=false", "model.qk_norm=true"], "Qwen3MoeForCausalLM"),
])
def test_exported_p1_runs_load_in_transformers_with_our_logits(tmp_path, ids, overrides, architecture):
    cfg = load_config(overrides=[*OURS, *EVERY2, *overrides]).model
    params = our_random_params(cfg, 2)
    out = hf.write_hf_checkpoint(tmp_path / "hf", params, cfg, "byte")
    model = load_hf(out)
    assert type(model).__name__ == architecture and model.config.decoder_sparse_step == 2
    assert type(model.model.layers[0].mlp).__name__.endswith("MLP")
    np.testing.assert_allclose(torch_logits(model, ids), our_logits(params, cfg, ids), atol=1e-4, rtol=0)
    back_cfg, back = hf.read_hf_checkpoint(out)
    assert back_cfg.moe_every == 2
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_a_p2_run_exports_through_the_remote_code_and_decodes_as_it_recomputes(tmp_path, ids):
    config = load_config(overrides=[*OURS, *EVERY2, "model.parscale_n=2", "model.moe_shared_expert_size=40"])
    cfg = config.model
    params = our_random_params(cfg, 3)
    out = hf.write_hf_checkpoint(tmp_path / "hf", params, cfg, "byte")
    assert json.loads((out / "config.json").read_text())["decoder_sparse_step"] == 2
    loads_through_the_remote_code(out, params, cfg, ids)


def test_training_logs_the_routed_layers_statistics_undiluted(tmp_path):
    config = load_config(overrides=[*TINY, *EVERY2, "model.ffn=moe", "model.num_experts=4", "model.experts_per_token=2",
                                    "model.moe_capacity_factor=1.25", "model.remat=full", "train.steps=2"])
    train(config, tmp_path, progress=False)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 2 and all(np.isfinite(m["loss"]) for m in logged)
    for m in logged:  # means over the 2 routed layers: dense ones would halve them
        assert m["aux/moe_balance"] >= 2 - 1e-3
        assert sum(m[f"stat/moe_load/e{e}"] for e in range(4)) == pytest.approx(1.0)
        assert sum(m[f"stat/moe_load/s1/e{e}"] for e in range(4)) == pytest.approx(1.0)


def test_upcycling_every_second_layer_keeps_the_logits_and_upscale_refuses_it(tmp_path):
    from parscale_jax.runs import Run
    from parscale_jax.transforms.upcycle import upcycle
    from parscale_jax.transforms.upscale import upscale

    dense = tmp_path / "dense"
    train(load_config(overrides=[*TINY, "model.num_layers=4", "train.steps=1", "train.warmup_steps=0"]), dense, progress=False)
    upcycle(dense, tmp_path / "moe", ["model.num_experts=4", "model.experts_per_token=2", "model.moe_every=2"])
    tokens = np.random.default_rng(0).integers(0, 320, (2, 24)).astype(np.int32)
    want = step0_logits(dense, tokens)
    np.testing.assert_allclose(step0_logits(tmp_path / "moe", tokens), want, rtol=0, atol=1e-5 * np.max(np.abs(want)))
    assert Run.open(tmp_path / "moe").config.model.moe_every == 2
    with pytest.raises(ConfigError, match="upscale copies whole layers, not model.moe_every=2 groups") as error:
        upscale(tmp_path / "moe", tmp_path / "deeper", insert=1)
    assert "\n" not in str(error.value) and not (tmp_path / "deeper").exists()


def test_counting_takes_dense_and_routed_layers_each_as_they_are():
    dense = load_config(overrides=[*TINY, "model.num_layers=4"]).model
    moe = load_config(overrides=[*TINY, "model.num_layers=4", "model.ffn=moe", "model.num_experts=4",
                                 "model.moe_intermediate_size=32"]).model
    half = load_config(overrides=[*TINY, *EVERY2, "model.ffn=moe", "model.num_experts=4",
                                  "model.moe_intermediate_size=32"]).model
    for count in (non_embedding_params, active_non_embedding_params):
        assert 2 * count(half) == count(dense) + count(moe)
    assert 2 * train_flops_per_token(half, 32) == pytest.approx(train_flops_per_token(dense, 32)
                                                                 + train_flops_per_token(moe, 32))


def test_what_cannot_be_done_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(overrides=[*TINY, "model.ffn=moe", "model.num_layers=3", "model.moe_every=2"])
    assert "model.moe_every: must divide model.num_layers=3" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="decoder_sparse_step 3 does not divide num_hidden_layers 4") as error:
        hf.config_from_hf({**transformers.Qwen2MoeConfig(**{**SHAPE, "num_hidden_layers": 4}, **MOE).to_dict(),
                           "decoder_sparse_step": 3})
    assert "\n" not in str(error.value)
