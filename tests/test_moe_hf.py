"""Hugging Face interop of Mixture-of-Experts and q/k-norm models: Mixtral, Qwen2-MoE, Qwen3-MoE and
Qwen3 checkpoints import with transformers' logits; our P = 1 runs export as the family they fit and
load in transformers with our logits; P > 1 ones load through our remote code; the rest is refused.

transformers and torch (CPU) build the reference models here from tiny random configs; no hub is
contacted.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from conftest import TINY
from parscale_jax.cli import main
from parscale_jax.config import SamplingConfig, load_config
from parscale_jax.errors import ConfigError
from parscale_jax.inference.generate import Generator
from parscale_jax.interop import hf
from parscale_jax.layout import Layout
from parscale_jax.model import init_params, merge_params, model_graphdef, split_params
from parscale_jax.recycle import context_prefixes

SHAPE = dict(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, intermediate_size=64)
DENSE = [*TINY, "model.parscale_n=1", "model.init_std=0.1", "model.max_position_embeddings=64",
         "model.tie_embeddings=false", "train.batch_size=4"]
OURS = [*DENSE, "model.ffn=moe", "model.num_experts=4", "model.experts_per_token=2", "model.moe_intermediate_size=48"]

pytestmark = [pytest.mark.usefixtures("torch_single_thread"),
              # transformers' Qwen2-MoE initializes the width-0 shared expert a model without one is written with
              pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")]


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, 257, (2, 20))


def our_logits(params, cfg, ids) -> np.ndarray:
    model = nnx.merge(model_graphdef(cfg), nnx.State(jax.tree.map(np.asarray, params)))
    return np.asarray(model(np.asarray(ids))[0])


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def load_hf(directory):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        directory, trust_remote_code=True, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def loads_through_the_remote_code(out, params, cfg, ids) -> None:
    """A P > 1 export loads through our remote code with our logits, reads back as it was written,
    and decodes (our KV cache: prefixes in the cache, q/k norms, routed layers) as recomputation and
    transformers' cached decoding do."""
    model = load_hf(out)
    assert type(model).__name__ == "Qwen2ParScaleForCausalLM"
    np.testing.assert_allclose(torch_logits(model, ids), our_logits(params, cfg, ids), atol=1e-4, rtol=0)
    back_cfg, back = hf.read_hf_checkpoint(out)
    assert back_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, back, params)
    prompt = ids[0, :6].tolist()
    layout = Layout.create(load_config())
    with jax.set_mesh(layout.mesh):
        generator = Generator(model_graphdef(cfg), cfg, layout, 1, 24, SamplingConfig(max_new_tokens=8))
        (tokens,), logits = generator.run(params, [prompt], keep_logits=True)
    recomputed = our_logits(params, cfg, [prompt + tokens])[0, 5:13]
    np.testing.assert_allclose(logits[:, 0], recomputed, atol=1e-4, rtol=0)
    generated = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                               attention_mask=torch.ones(1, 6, dtype=torch.long))
    assert generated[0].tolist() == prompt + tokens


def our_random_params(cfg, seed: int) -> dict:
    """Freshly initialized, with every norm gain (the q/k norms' too) moved off 1 so that a swap shows."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(np.asarray, jax.jit(lambda: init_params(cfg, seed))())
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * (1 + 0.2 * rng.standard_normal(x.shape, np.float32)) if "norm" in jax.tree_util.keystr(path)
        else x, params)


def randomized(model):
    """Weights far from their initial values: norms near 1, the rest (router, experts, biases) at 0.1."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            tensor.copy_(1.0 + 0.1 * torch.randn_like(tensor) if "norm" in name else 0.1 * torch.randn_like(tensor))
    return model.eval()


# model_type -> (transformers config, what our imported config must say)
HF_MODELS = {
    "mixtral": (lambda: transformers.MixtralConfig(**SHAPE, intermediate_size=48, num_local_experts=4,
                                                   num_experts_per_tok=2, rope_theta=10000.0),
                dict(ffn="moe", moe_renormalize=True, qkv_bias=False, qk_norm=False, moe_shared_expert_size=0)),
    "qwen2_moe_shared": (lambda: transformers.Qwen2MoeConfig(**SHAPE, **MOE, shared_expert_intermediate_size=40),
                         dict(moe_renormalize=False, qkv_bias=True, qk_norm=False, moe_shared_expert_size=40)),
    "qwen2_moe_renormalized": (lambda: transformers.Qwen2MoeConfig(**SHAPE, **MOE, norm_topk_prob=True,
                                                                   shared_expert_intermediate_size=40),
                               dict(moe_renormalize=True, qkv_bias=True, moe_shared_expert_size=40)),
    "qwen3_moe": (lambda: transformers.Qwen3MoeConfig(**SHAPE, **MOE, norm_topk_prob=True, head_dim=16),
                  dict(moe_renormalize=True, qkv_bias=False, qk_norm=True, head_dim=16, moe_shared_expert_size=0)),
    "qwen3": (lambda: transformers.Qwen3Config(**SHAPE, intermediate_size=64, head_dim=16),
              dict(ffn="swiglu", qkv_bias=False, qk_norm=True, head_dim=16)),
}


@pytest.mark.parametrize("kind", HF_MODELS)
def test_imported_checkpoints_give_transformers_logits(tmp_path, ids, kind):
    make_config, expected = HF_MODELS[kind]
    model = randomized(transformers.AutoModelForCausalLM.from_config(make_config()))
    model.save_pretrained(tmp_path)
    cfg, params = hf.read_hf_checkpoint(tmp_path)
    assert {key: getattr(cfg, key) for key in expected} == expected
    if cfg.ffn == "moe":
        assert (cfg.num_experts, cfg.experts_per_token, cfg.moe_intermediate_size) == (4, 2, 48)
        assert cfg.moe_capacity_factor == 0  # dropless
    np.testing.assert_allclose(our_logits(params, cfg, ids), torch_logits(model, ids), atol=1e-4, rtol=0)
    # Written back, it is the same family with the same tensors, name for name.
    out = hf.write_hf_checkpoint(tmp_path / "ours", params, cfg, "byte")
    assert json.loads((out / "config.json").read_text())["model_type"] == model.config.model_type
    source, ours = load_file(str(tmp_path / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(ours) == sorted(source)
    for name, tensor in source.items():
        np.testing.assert_array_equal(ours[name], tensor, err_msg=name)


# Our P = 1 run's config -> the family it is written as
EXPORTS = {
    "mixtral": ([*OURS, "model.qkv_bias=false"], "MixtralForCausalLM"),
    "qwen2_moe_shared": ([*OURS, "model.moe_renormalize=false", "model.moe_shared_expert_size=40"],
                         "Qwen2MoeForCausalLM"),
    "qwen2_moe_no_shared_expert": (OURS, "Qwen2MoeForCausalLM"),  # q/k/v biases: a width-0 shared expert is written
    "qwen2_moe_no_biases": ([*OURS, "model.qkv_bias=false", "model.moe_renormalize=false"], "Qwen2MoeForCausalLM"),
    "qwen3_moe": ([*OURS, "model.qkv_bias=false", "model.qk_norm=true"], "Qwen3MoeForCausalLM"),
    "qwen3": ([*DENSE, "model.qkv_bias=false", "model.qk_norm=true"], "Qwen3ForCausalLM"),
}


@pytest.mark.parametrize("kind", EXPORTS)
def test_exported_p1_runs_load_in_transformers_with_our_logits(tmp_path, ids, kind):
    overrides, architecture = EXPORTS[kind]
    cfg = load_config(overrides=overrides).model
    params = our_random_params(cfg, 2)
    out = hf.write_hf_checkpoint(tmp_path / "hf", params, cfg, "byte")
    model = load_hf(out)
    assert type(model).__name__ == architecture
    assert not (out / "modeling_qwen2_parscale.py").exists()
    np.testing.assert_allclose(torch_logits(model, ids), our_logits(params, cfg, ids), atol=1e-4, rtol=0)
    back_cfg, back = hf.read_hf_checkpoint(out)  # and back: the same weights
    jax.tree.map(np.testing.assert_array_equal, back, params)
    assert (back_cfg.ffn, back_cfg.qk_norm, back_cfg.qkv_bias) == (cfg.ffn, cfg.qk_norm, cfg.qkv_bias)


def test_mixtral_names_are_its_own(tmp_path):
    cfg = load_config(overrides=[*OURS, "model.qkv_bias=false"]).model
    names = [t.name for t in hf.hf_tensors(cfg) if t.name.startswith("model.layers.1.")]
    assert "model.layers.1.block_sparse_moe.gate.weight" in names
    assert {f"model.layers.1.block_sparse_moe.experts.3.{w}.weight" for w in ("w1", "w2", "w3")} <= set(names)
    assert not [name for name in names if ".mlp." in name or ("_proj" in name and "self_attn" not in name)]
    # A Qwen2-MoE checkpoint of the same model keeps the Qwen names.
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in {t.name for t in hf.hf_tensors(cfg, "qwen2_moe")}


@pytest.fixture(scope="module")
def p2_moe(tmp_path_factory):
    """(config, params, export dir) of a P = 2 MoE run with a shared expert and q/k norms."""
    cfg = load_config(overrides=[*OURS, "model.parscale_n=2", "model.qk_norm=true", "model.moe_shared_expert_size=40",
                                 "model.moe_renormalize=false"]).model
    params = our_random_params(cfg, 3)
    out = hf.write_hf_checkpoint(tmp_path_factory.mktemp("p2") / "hf", params, cfg, "byte")
    return cfg, params, out


def test_p2_moe_export_loads_through_the_remote_code_with_our_logits_and_tokens(p2_moe, ids):
    cfg, params, out = p2_moe
    exported = json.loads((out / "config.json").read_text())
    assert exported["model_type"] == "qwen2_parscale" and exported["num_experts"] == 4 and exported["qk_norm"]
    names = set(load_file(str(out / "model.safetensors")))
    assert {"model.layers.0.mlp.experts.3.down_proj.weight", "model.layers.0.mlp.shared_expert_gate.weight",
            "model.layers.0.self_attn.k_norm.weight", "model.layers.0.self_attn.prefix_k"} <= names
    loads_through_the_remote_code(out, params, cfg, ids)


def test_recycled_prefixes_are_the_backbones_normalized_keys(p2_moe, ids):
    """Prefixes from the backbone's cache (recycle.py) hold keys after k_norm and RoPE, as the prefix
    slots are used: two streams reading the same context give the backbone reading that context
    and then the tokens."""
    cfg, params, _ = p2_moe
    T = cfg.parscale_n_tokens
    streams, backbone = split_params(params, cfg)
    context = ids[1, :T]
    config = dataclasses.replace(load_config(), model=cfg)
    keys, values = context_prefixes(backbone, config, np.stack([context, context]))
    assert keys.shape == (cfg.num_layers, 2, cfg.num_kv_heads, T, cfg.head_dim)
    attention = {**streams["layers"]["self_attn"], "prefix_k": np.asarray(keys), "prefix_v": np.asarray(values)}
    recycled = merge_params(backbone, {**streams, "layers": {**streams["layers"], "self_attn": attention}})
    alone = dataclasses.replace(cfg, parscale_n=1)
    expected = our_logits(backbone, alone, np.concatenate([context, ids[0]])[None])[:, T:]
    np.testing.assert_allclose(our_logits(recycled, cfg, ids[:1]), expected, atol=1e-4, rtol=0)


def test_a_qwen3_moe_checkpoint_imports_trains_and_exports_through_the_commands(tmp_path, ids, capsys):
    """Import, two training steps that move the q/k norms too, and an export transformers loads as
    Qwen3-MoE with our logits. The checkpoint fixes the experts and the norms; the capacity is ours."""
    model = randomized(transformers.AutoModelForCausalLM.from_config(HF_MODELS["qwen3_moe"][0]()))
    model.save_pretrained(tmp_path / "hf")
    run, out = tmp_path / "run", tmp_path / "out"
    settings = ["data.seq_len=32", "train.batch_size=4", "train.steps=2", "train.warmup_steps=0", "train.lr=1e-2",
                "train.eval_every=0"]
    capsys.readouterr()  # save_pretrained's progress
    for fixed, fragment in (("model.num_experts=2", "model.num_experts: is fixed by the checkpoint (4)"),
                            ("model.qk_norm=false", "model.qk_norm: is fixed by the checkpoint (True)")):
        assert main(["import", "--hf", str(tmp_path / "hf"), "--out", str(run), *settings, fixed]) == 2
        err = capsys.readouterr().err.strip()
        assert fragment in err and len(err.splitlines()) == 1, err
    assert main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "capacity"), *settings,
                 "model.moe_capacity_factor=1.25"]) == 0
    assert main(["import", "--hf", str(tmp_path / "hf"), "--out", str(run), *settings]) == 0
    assert main(["train", "--run-dir", str(run), "--no-progress"]) == 0
    assert main(["export", "--run-dir", str(run), "--out", str(out)]) == 0
    name = "model.layers.1.self_attn.k_norm.weight"
    assert np.abs(load_file(str(out / "model.safetensors"))[name] - model.state_dict()[name].numpy()).max() > 1e-3
    cfg, params = hf.read_hf_checkpoint(out)
    exported = load_hf(out)
    assert type(exported).__name__ == "Qwen3MoeForCausalLM"
    np.testing.assert_allclose(torch_logits(exported, ids), our_logits(params, cfg, ids), atol=1e-4, rtol=0)


# --- Refusals ---------------------------------------------------------------------------------


def qwen2_moe_config(**changes):
    return {**transformers.Qwen2MoeConfig(**SHAPE, **MOE).to_dict(), **changes}


@pytest.mark.parametrize("changes,fragment", [
    (dict(decoder_sparse_step=3), "decoder_sparse_step 3 does not divide num_hidden_layers 2"),
    (dict(mlp_only_layers=[1]), "dense layers between the MoE ones"),
    (dict(use_sliding_window=True), "sliding-window attention is not supported"),
    (dict(model_type="mixtral", num_local_experts=4, sliding_window=4096), "sliding-window attention"),
    (dict(model_type="qwen3_moe", attention_bias=True), "qwen3_moe attention biases are not supported"),
    (dict(num_experts=0), "a qwen2_moe config without experts"),
    (dict(model_type="deepseek_v3"), "model_type 'deepseek_v3' is not supported"),
])
def test_unrepresentable_checkpoints_are_refused_in_one_line(changes, fragment):
    with pytest.raises(ConfigError, match=fragment) as error:
        hf.config_from_hf(qwen2_moe_config(**changes))
    assert "\n" not in str(error.value) and str(error.value).startswith("--hf: ")


@pytest.mark.parametrize("overrides,fragment", [
    (["model.qk_norm=true"], "model.qk_norm: with q/k/v biases fits no Hugging Face format at P = 1"),
    (["model.qk_norm=true", "model.qkv_bias=false", "model.moe_shared_expert_size=40"],
     "model.qk_norm: with a shared expert fits no Hugging Face format at P = 1"),
])
def test_p1_models_no_format_fits_are_refused_before_writing(tmp_path, overrides, fragment):
    cfg = load_config(overrides=[*OURS, *overrides]).model
    with pytest.raises(ConfigError, match=fragment) as error:
        hf.write_hf_checkpoint(tmp_path / "hf", {}, cfg, "byte")
    assert "\n" not in str(error.value) and not (tmp_path / "hf").exists()
