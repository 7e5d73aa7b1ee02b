"""The PyTorch remote code shipped in exported checkpoints (`parscale_jax/interop/hf_remote`), under transformers 5.x.

The official reference checkpoints are loaded the way users load ours (`AutoModelForCausalLM` with
`trust_remote_code=True` from a directory holding the two code files and an `auto_map`), and must reproduce the
official implementation's logits and greedy tokens. Cached generation must match recomputation, and left-padded
batches must generate what each prompt generates alone.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from parscale_jax.interop.hf_remote.configuration_qwen2_parscale import Qwen2ParScaleConfig
from parscale_jax.interop.hf_remote.modeling_qwen2_parscale import Qwen2ParScaleForCausalLM

REFERENCE = Path(__file__).parent / "data" / "official_reference"
REMOTE_CODE = Path(__file__).parent.parent / "parscale_jax" / "interop" / "hf_remote"
AUTO_MAP = {
    "AutoConfig": "configuration_qwen2_parscale.Qwen2ParScaleConfig",
    "AutoModelForCausalLM": "modeling_qwen2_parscale.Qwen2ParScaleForCausalLM",
}
PAD = 0


pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda p: f"P{p}")
def official(request, tmp_path_factory):
    """(model, loading info, reference dir) for an official tiny checkpoint shipped with our remote code."""
    reference = REFERENCE / f"tiny_p{request.param}"
    directory = tmp_path_factory.mktemp(f"tiny_p{request.param}")
    shutil.copy(reference / "model.safetensors", directory)
    config = json.loads((reference / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "auto_map": AUTO_MAP}))
    for name in ("configuration_qwen2_parscale.py", "modeling_qwen2_parscale.py"):
        shutil.copy(REMOTE_CODE / name, directory)
    model, info = AutoModelForCausalLM.from_pretrained(
        directory, trust_remote_code=True, dtype=torch.float32, output_loading_info=True
    )
    return model.eval(), info, reference


def _load(reference: Path, name: str) -> torch.Tensor:
    return torch.from_numpy(np.load(reference / f"{name}.npy"))


def _generate(model, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
    return model.generate(
        input_ids, attention_mask=attention_mask, do_sample=False, pad_token_id=PAD, eos_token_id=None, **kwargs
    )


def _left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


def test_loads_without_missing_or_unexpected_keys(official):
    model, info, _ = official
    assert type(model).__name__ == "Qwen2ParScaleForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.lm_head.weight is model.model.embed_tokens.weight


@torch.no_grad()
def test_logits_match_official(official):
    model, _, reference = official
    logits = model(_load(reference, "input_ids")).logits
    assert (logits - _load(reference, "logits")).abs().max() < 1e-4


@torch.no_grad()
def test_masked_logits_match_official(official):
    model, _, reference = official
    logits = model(_load(reference, "input_ids"), attention_mask=_load(reference, "attention_mask")).logits
    assert (logits - _load(reference, "logits_masked")).abs().max() < 1e-4


def test_greedy_generation_matches_official(official):
    model, _, reference = official
    tokens = _generate(model, _load(reference, "input_ids")[:1, :6], max_new_tokens=10)
    assert torch.equal(tokens, _load(reference, "greedy_tokens"))


def test_generation_with_cache_equals_without(official):
    model, _, reference = official
    ids, mask = _left_padded([_load(reference, "input_ids")[0, :7], _load(reference, "input_ids")[1, :4]])
    cached = _generate(model, ids, mask, max_new_tokens=8)
    recomputed = _generate(model, ids, mask, max_new_tokens=8, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_left_padded_batch_generates_like_each_prompt_alone(official):
    model, _, reference = official
    prompts = [_load(reference, "input_ids")[0, :7], _load(reference, "input_ids")[1, :4]]
    ids, mask = _left_padded(prompts)
    batched = _generate(model, ids, mask, max_new_tokens=8)[:, ids.shape[1]:]
    for row, prompt in enumerate(prompts):
        alone = _generate(model, prompt[None], max_new_tokens=8)[0, len(prompt):]
        assert torch.equal(batched[row], alone)


@torch.no_grad()
def test_incremental_decoding_logits_equal_full_forward(official):
    """Prefill then feed one token at a time through the cache, on a left-padded batch with generate-style
    positions: every step's logits equal those of one uncached forward over the whole sequence."""
    model, _, reference = official
    ids, mask = _left_padded([_load(reference, "input_ids")[0, :12], _load(reference, "input_ids")[1, :9]])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    full = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits

    prefill = 6
    out = model(ids[:, :prefill], attention_mask=mask[:, :prefill], position_ids=positions[:, :prefill], use_cache=True)
    steps = [out.logits]
    for t in range(prefill, ids.shape[1]):
        out = model(
            ids[:, t:t + 1],
            attention_mask=mask[:, :t + 1],
            position_ids=positions[:, t:t + 1],
            past_key_values=out.past_key_values,
            use_cache=True,
        )
        steps.append(out.logits)
    real = mask.bool()  # padded query positions are never read, and differ for P = 1 (no visible key)
    assert (torch.cat(steps, dim=1) - full)[real].abs().max() < 1e-4
    # P plain caches folded into the head axis; the prefix is not copied into the cache.
    config = model.config
    keys = out.past_key_values.layers[0].keys
    assert keys.shape == (2, config.parscale_n * config.num_key_value_heads, ids.shape[1], config.head_dim)


def test_generation_resumes_from_a_returned_cache(official):
    model, _, reference = official
    first = _generate(model, _load(reference, "input_ids")[:1, :6], max_new_tokens=4, return_dict_in_generate=True)
    resumed = _generate(model, first.sequences, past_key_values=first.past_key_values, max_new_tokens=6)
    assert torch.equal(resumed, _load(reference, "greedy_tokens"))


def test_beam_search_with_cache_equals_without(official):
    model, _, reference = official
    ids = _load(reference, "input_ids")[:1, :6]
    cached = _generate(model, ids, max_new_tokens=6, num_beams=3)
    recomputed = _generate(model, ids, max_new_tokens=6, num_beams=3, use_cache=False)
    assert torch.equal(cached, recomputed)


@torch.no_grad()
def test_save_pretrained_ships_the_remote_code(official, tmp_path):
    model, _, reference = official
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == AUTO_MAP
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.float32)
    ids = _load(reference, "input_ids")
    assert torch.equal(reloaded(ids).logits, model(ids).logits)


def _fresh_config(**overrides) -> Qwen2ParScaleConfig:
    settings = dict(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
        parscale_n=4, parscale_n_tokens=3, parscale_attn_smooth=0.1,
    )
    return Qwen2ParScaleConfig(**{**settings, **overrides})


@torch.no_grad()
def test_fresh_model_round_trips_through_save_pretrained(tmp_path):
    torch.manual_seed(0)
    model = Qwen2ParScaleForCausalLM(_fresh_config()).eval()
    prefix = model.model.layers[0].self_attn.prefix_k
    assert torch.isfinite(prefix).all() and 0.01 < prefix.std() < 0.03
    ids = torch.randint(0, 64, (2, 7))
    model.save_pretrained(tmp_path)

    with safe_open(tmp_path / "model.safetensors", "pt") as saved:
        names = set(saved.keys())
        assert saved.get_slice("model.aggregate_layer.0.weight").get_shape() == [32, 4 * 32]
        assert saved.get_slice("model.layers.1.self_attn.prefix_v").get_shape() == [4, 2, 3, 8]
    assert "lm_head.weight" not in names and "model.layers.0.self_attn.q_proj.bias" in names

    loaded, info = Qwen2ParScaleForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.eval()(ids).logits, model(ids).logits)


def test_llama_style_backbone_has_no_qkv_bias():
    model = Qwen2ParScaleForCausalLM(_fresh_config(qkv_bias=False, parscale_n=2))
    names = {name for name, _ in model.named_parameters()}
    assert "model.layers.0.self_attn.q_proj.bias" not in names
    assert "model.layers.0.self_attn.prefix_k" in names


def test_config_reads_both_rope_spellings_and_official_keys():
    official = json.loads((REFERENCE / "tiny_p2" / "config.json").read_text())
    config = Qwen2ParScaleConfig(**official)
    assert (config.head_dim, config.qkv_bias, config.parscale_n, config.parscale_attn_smooth) == (16, True, 2, 0.1)
    assert config.rope_theta == 10000.0 and config.sliding_window is None

    config = Qwen2ParScaleConfig(rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    assert config.rope_theta == 500.0
    assert Qwen2ParScaleConfig.from_dict(config.to_dict()).rope_parameters["rope_theta"] == 500.0
    # Qwen2 configs keep a window size next to `use_sliding_window: false`; it must not reach the cache.
    assert Qwen2ParScaleConfig(sliding_window=4096).sliding_window is None
    with pytest.raises(ValueError, match="sliding-window"):
        Qwen2ParScaleConfig(use_sliding_window=True)
