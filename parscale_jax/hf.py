"""Hugging Face checkpoint format (SPEC §2): config and tensor-name mapping.

Our module names follow the Hugging Face ones, so the mapping is: stack the per-layer tensors
along a leading `[L]` axis, transpose torch `[out, in]` Linear weights to `[in, out]` kernels, and
permute the aggregator's interleaved input columns to our stream-major order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from parscale_jax.config import ModelConfig, validate_model

_LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a Qwen2 / Llama / qwen2_parscale `config.json` dict."""
    rope_theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    model = ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        head_dim=hf.get("head_dim"),
        rope_theta=float(rope_theta),
        rms_norm_eps=float(hf["rms_norm_eps"]),
        qkv_bias=hf.get("model_type") != "llama" or bool(hf.get("attention_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf["max_position_embeddings"],
        parscale_n=hf.get("parscale_n", 1),
        parscale_n_tokens=hf.get("parscale_n_tokens", 48),
        parscale_attn_smooth=float(hf.get("parscale_attn_smooth", 0.01)),
    )
    return validate_model(model)


def aggregator_kernel_from_hf(weight_DF: np.ndarray, P: int) -> np.ndarray:
    """`aggregate_layer.0.weight [D_out, D·P]` with input index d·P + p → our kernel `[P·D, D_out]`."""
    D_out, F = weight_DF.shape
    D = F // P
    return weight_DF.T.reshape(D, P, D_out).transpose(1, 0, 2).reshape(P * D, D_out)


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
    """Nested pure dict matching `nnx.to_pure_dict` of a `ParScaleLM(cfg)` parameter state."""
    L, P = cfg.num_layers, cfg.parscale_n

    def stacked(name: str) -> np.ndarray:
        return np.stack([tensors[f"model.layers.{i}.{name}"] for i in range(L)])

    layers: dict[str, Any] = {"self_attn": {}, "mlp": {}}
    for name in _LAYER_LINEARS:
        group, proj = name.split(".")
        entry = {"kernel": stacked(f"{name}.weight").transpose(0, 2, 1)}
        if f"model.layers.0.{name}.bias" in tensors:
            entry["bias"] = stacked(f"{name}.bias")
        layers[group][proj] = entry
    for name in _LAYER_NORMS:
        layers[name] = {"weight": stacked(f"{name}.weight")}

    params: dict[str, Any] = {
        "embed_tokens": {"embedding": tensors["model.embed_tokens.weight"]},
        "layers": layers,
        "norm": {"weight": tensors["model.norm.weight"]},
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": tensors["lm_head.weight"].T}
    if P > 1:
        layers["self_attn"]["prefix_k"] = stacked("self_attn.prefix_k")
        layers["self_attn"]["prefix_v"] = stacked("self_attn.prefix_v")
        params["aggregate_in_kernel"] = aggregator_kernel_from_hf(tensors["model.aggregate_layer.0.weight"], P)
        params["aggregate_in_bias"] = tensors["model.aggregate_layer.0.bias"]
        params["aggregate_out_kernel"] = tensors["model.aggregate_layer.2.weight"].T
        params["aggregate_out_bias"] = tensors["model.aggregate_layer.2.bias"]
    return params


def read_hf_checkpoint(directory: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """Config and pure parameter dict of a local single-file safetensors checkpoint."""
    directory = Path(directory)
    cfg = config_from_hf(json.loads((directory / "config.json").read_text()))
    return cfg, params_from_hf(load_file(str(directory / "model.safetensors")), cfg)
