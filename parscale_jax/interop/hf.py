"""Hugging Face checkpoints (SPEC §2): read Qwen2 / Llama / Qwen3 / Mixtral / Qwen2-MoE / Qwen3-MoE /
qwen2_parscale ones, write ours.

Our module names follow the Hugging Face ones, so the mapping is: stack the per-layer tensors
along a leading `[L]` axis (and the experts' along `[E]`), transpose torch `[out, in]` Linear
weights to `[in, out]` kernels, and permute the aggregator's interleaved input columns (`d·P + p`)
to our stream-major order (`p·D + d`). Mixtral spells its MoE tensors differently (`RENAMES`).

A P = 1 model is written as the plain family it fits (`hf_format`): dense as `Qwen2ForCausalLM`,
`LlamaForCausalLM` without q/k/v biases or `Qwen3ForCausalLM` with q/k norms; MoE as
`MixtralForCausalLM`, `Qwen2MoeForCausalLM` or `Qwen3MoeForCausalLM`. A P > 1 model is a
`qwen2_parscale` checkpoint, which carries its own PyTorch modeling code
(`parscale_jax/interop/hf_remote/`) for `trust_remote_code=True`. The tensors are named and laid out as the
official ParScale code expects, so that code loads our dense checkpoints too.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from flax.nnx.traversals import flatten_mapping, unflatten_mapping
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from parscale_jax.config import ModelConfig, validate_model
from parscale_jax.data.tokenizer import ByteTokenizer, HFTokenizer
from parscale_jax.errors import CheckpointError, ConfigError
from parscale_jax.model import FFN_TYPES, mlp_stacks, moe_layer, param_info
from parscale_jax.model.moe import expert_width

_REMOTE_CODE = ("configuration_qwen2_parscale.py", "modeling_qwen2_parscale.py")
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


# ---------------------------------------------------------------------------------------------
# Config


DENSE_FORMATS = ("qwen2", "llama", "qwen3")
MOE_FORMATS = ("mixtral", "qwen2_moe", "qwen3_moe")
FORMATS = (*DENSE_FORMATS, *MOE_FORMATS, "qwen2_parscale")  # the model_types we read
QK_NORM_FORMATS = ("qwen3", "qwen3_moe")
DEFAULT_ROPE_THETA = {"mixtral": 1e6}  # where a config without one means other than 10000


def _refuse_unsupported(hf: dict[str, Any], model_type: str) -> None:
    """A one-line ConfigError for what a checkpoint's config asks that our model cannot compute."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError("--hf", f"RoPE scaling '{rope.get('rope_type', rope.get('type'))}' is not supported")
    if hf.get("use_sliding_window") or (model_type == "mixtral" and hf.get("sliding_window") is not None):
        raise ConfigError("--hf", "sliding-window attention is not supported")
    if hf.get("mlp_bias"):
        raise ConfigError("--hf", "MLP biases are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError("--hf", f"activation '{hf['hidden_act']}' is not supported (silu)")
    if model_type in QK_NORM_FORMATS and hf.get("attention_bias"):
        raise ConfigError("--hf", f"{model_type} attention biases are not supported (they include o_proj's)")
    if model_type in ("qwen2_moe", "qwen3_moe"):
        if hf.get("mlp_only_layers"):
            raise ConfigError("--hf", f"mlp_only_layers {hf['mlp_only_layers']} is not supported: dense layers "
                              "between the MoE ones come only every decoder_sparse_step-th")
        step = hf.get("decoder_sparse_step", 1)
        if step >= 1 and hf["num_hidden_layers"] % step:
            raise ConfigError("--hf", f"decoder_sparse_step {step} does not divide num_hidden_layers "
                              f"{hf['num_hidden_layers']} (our layers run in groups of it)")
        if not (hf.get("num_experts") or hf.get("num_local_experts")):
            raise ConfigError("--hf", f"a {model_type} config without experts is not supported")


def _qkv_bias(hf: dict[str, Any], model_type: str) -> bool:
    if model_type == "llama":
        return bool(hf.get("attention_bias", False))
    if model_type in ("mixtral", *QK_NORM_FORMATS):
        return False  # Qwen3's attention_bias (o_proj's too) is refused above
    return bool(hf.get("qkv_bias", True))  # Qwen2, Qwen2-MoE, qwen2_parscale


def _moe_fields(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
    """Our `model.moe_*` fields from a MoE config (none for a dense one). Hugging Face MoE models
    are dropless. Mixtral's `intermediate_size` is an expert's; Qwen's are apart, and Qwen's
    `decoder_sparse_step` is our `moe_every` (the dense layers between use `intermediate_size`)."""
    if model_type == "mixtral":
        return dict(ffn="moe", num_experts=hf["num_local_experts"], experts_per_token=hf["num_experts_per_tok"],
                    moe_intermediate_size=hf["intermediate_size"], moe_renormalize=True)
    if model_type in ("qwen2_moe", "qwen3_moe") or (model_type == "qwen2_parscale" and hf.get("num_experts")):
        shared = 0 if model_type == "qwen3_moe" else hf.get("shared_expert_intermediate_size", 0)
        return dict(ffn="moe", num_experts=hf.get("num_experts") or hf["num_local_experts"],
                    experts_per_token=hf["num_experts_per_tok"], moe_intermediate_size=hf["moe_intermediate_size"],
                    moe_renormalize=bool(hf.get("norm_topk_prob", False)), moe_shared_expert_size=shared,
                    moe_every=hf.get("decoder_sparse_step", 1))
    return {}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a `config.json` dict of one of FORMATS (transformers 4 or 5)."""
    model_type = hf.get("model_type")
    if model_type not in FORMATS:
        raise ConfigError("--hf", f"model_type '{model_type}' is not supported ({', '.join(FORMATS)})")
    _refuse_unsupported(hf, model_type)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    default_theta = DEFAULT_ROPE_THETA.get(model_type, 10000.0)
    model = ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", default_theta))),
        rms_norm_eps=float(hf["rms_norm_eps"]),
        qkv_bias=_qkv_bias(hf, model_type),
        qk_norm=model_type in QK_NORM_FORMATS or (model_type == "qwen2_parscale" and bool(hf.get("qk_norm"))),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf["max_position_embeddings"],
        init_std=float(hf.get("initializer_range", 0.02)),
        **_moe_fields(hf, model_type),
        parscale_n=hf.get("parscale_n", 1),
        parscale_n_tokens=hf.get("parscale_n_tokens", 48),
        parscale_attn_smooth=float(hf.get("parscale_attn_smooth", 0.01)),
    )
    return validate_model(model)


def hf_format(cfg: ModelConfig) -> str:
    """The model_type a model is written as: qwen2_parscale (our remote code) when P > 1, else the
    plain family that computes it, or a one-line ConfigError when none does."""
    if cfg.parscale_n > 1:
        return "qwen2_parscale"
    if cfg.qk_norm and cfg.qkv_bias:
        raise ConfigError("model.qk_norm", "with q/k/v biases fits no Hugging Face format at P = 1 "
                          "(Qwen3's attention_bias also biases o_proj)")
    if cfg.ffn != "moe":
        return "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"
    if cfg.qk_norm:
        if cfg.moe_shared_expert_size:
            raise ConfigError("model.qk_norm", "with a shared expert fits no Hugging Face format at P = 1 "
                              "(Qwen3-MoE has no shared expert)")
        return "qwen3_moe"
    # Mixtral always renormalizes, has no biases and routes every layer; Qwen2-MoE has switches for all.
    if cfg.moe_renormalize and not cfg.qkv_bias and not cfg.moe_shared_expert_size and cfg.moe_every == 1:
        return "mixtral"
    return "qwen2_moe"


def _moe_config(cfg: ModelConfig) -> dict[str, Any]:
    """The Qwen-style MoE keys (Qwen2-MoE, Qwen3-MoE and our qwen2_parscale)."""
    return {"num_experts": cfg.num_experts, "num_experts_per_tok": cfg.experts_per_token,
            "moe_intermediate_size": expert_width(cfg), "shared_expert_intermediate_size": cfg.moe_shared_expert_size,
            "norm_topk_prob": cfg.moe_renormalize, "decoder_sparse_step": cfg.moe_every}


QWEN_MOE_LAYERS = {"mlp_only_layers": [], "output_router_logits": False}  # MoE layers by decoder_sparse_step alone


def config_to_hf(cfg: ModelConfig, dtype: str, eos_id: int | None, model_type: str | None = None) -> dict[str, Any]:
    """`config.json` for our model, in the format `hf_format` picks (or in `model_type`:
    "qwen2_parscale", our remote code, computes every model, at any P)."""
    model_type = model_type or hf_format(cfg)
    hf: dict[str, Any] = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "bos_token_id": None,  # neither our byte tokenizer nor our packing uses one
        "eos_token_id": eos_id,
        "torch_dtype": dtype,
    }
    no_window = {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.num_layers}
    if model_type == "qwen2_parscale":
        return {
            "architectures": ["Qwen2ParScaleForCausalLM"],
            "model_type": "qwen2_parscale",
            "auto_map": {"AutoConfig": "configuration_qwen2_parscale.Qwen2ParScaleConfig",
                         "AutoModelForCausalLM": "modeling_qwen2_parscale.Qwen2ParScaleForCausalLM"},
            **hf,
            "qkv_bias": cfg.qkv_bias,
            "qk_norm": cfg.qk_norm,
            **(_moe_config(cfg) if cfg.ffn == "moe" else {}),
            **no_window,
            "parscale_n": cfg.parscale_n,
            "parscale_n_tokens": cfg.parscale_n_tokens,
            "parscale_attn_smooth": cfg.parscale_attn_smooth,  # always explicit: the class default differs
        }
    if model_type == "qwen2":
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **hf, **no_window}
    if model_type == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **hf,
                "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
    if model_type == "qwen3":
        return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **hf, "attention_bias": False,
                **no_window}
    if model_type == "mixtral":
        return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **hf,
                "intermediate_size": expert_width(cfg), "num_local_experts": cfg.num_experts,
                "num_experts_per_tok": cfg.experts_per_token, "sliding_window": None,
                "output_router_logits": False, "router_jitter_noise": 0.0}
    if model_type == "qwen2_moe":
        return {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", **hf, **_moe_config(cfg),
                **QWEN_MOE_LAYERS, "qkv_bias": cfg.qkv_bias, **no_window}
    moe = {key: value for key, value in _moe_config(cfg).items() if key != "shared_expert_intermediate_size"}
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", **hf, **moe, **QWEN_MOE_LAYERS,
            "attention_bias": False, "use_sliding_window": False, "sliding_window": None}


# ---------------------------------------------------------------------------------------------
# Tensors: one table for import and export


def aggregator_kernel_from_hf(weight: np.ndarray, P: int) -> np.ndarray:
    """`aggregate_layer.0.weight [D_out, D·P]` with input index d·P + p → our kernel `[P·D, D_out]`."""
    D_out, PD = weight.shape
    D = PD // P
    return weight.T.reshape(D, P, D_out).transpose(1, 0, 2).reshape(P * D, D_out)


def aggregator_kernel_to_hf(kernel: np.ndarray, P: int) -> np.ndarray:
    """Our kernel `[P·D, D_out]` (stream-major) → `aggregate_layer.0.weight [D_out, D·P]` (interleaved)."""
    PD, D_out = kernel.shape
    D = PD // P
    return kernel.reshape(P, D, D_out).transpose(1, 0, 2).reshape(D * P, D_out).T


# Our parameter path -> (Hugging Face tensor name, how the array changes on the way), for every
# parameter but the feed-forward block's, whose registry entry names its own (`ffn.FFN_TYPES`, under
# each stack of `lm.mlp_stacks`; they go where "{mlp}" stands). A stacked parameter's leading axes
# that the checkpoint keeps as separate tensors are indices in the name: "{i}" the layer (for a
# feed-forward stack, the layer its position holds), "{e}" the next axis (an expert). Every declared
# parameter needs an entry; the order is the file order (layer by layer, as transformers writes
# them).
HF_NAMES: dict[str, tuple[str, str]] = {
    "embed_tokens/embedding": ("model.embed_tokens.weight", "same"),
    "layers/input_layernorm/weight": ("model.layers.{i}.input_layernorm.weight", "same"),
    "layers/post_attention_layernorm/weight": ("model.layers.{i}.post_attention_layernorm.weight", "same"),
    "layers/self_attn/q_proj/kernel": ("model.layers.{i}.self_attn.q_proj.weight", "transpose"),
    "layers/self_attn/q_proj/bias": ("model.layers.{i}.self_attn.q_proj.bias", "same"),
    "layers/self_attn/k_proj/kernel": ("model.layers.{i}.self_attn.k_proj.weight", "transpose"),
    "layers/self_attn/k_proj/bias": ("model.layers.{i}.self_attn.k_proj.bias", "same"),
    "layers/self_attn/v_proj/kernel": ("model.layers.{i}.self_attn.v_proj.weight", "transpose"),
    "layers/self_attn/v_proj/bias": ("model.layers.{i}.self_attn.v_proj.bias", "same"),
    "layers/self_attn/o_proj/kernel": ("model.layers.{i}.self_attn.o_proj.weight", "transpose"),
    "layers/self_attn/q_norm/weight": ("model.layers.{i}.self_attn.q_norm.weight", "same"),
    "layers/self_attn/k_norm/weight": ("model.layers.{i}.self_attn.k_norm.weight", "same"),
    "{mlp}": ("", ""),
    "layers/self_attn/prefix_k": ("model.layers.{i}.self_attn.prefix_k", "same"),
    "layers/self_attn/prefix_v": ("model.layers.{i}.self_attn.prefix_v", "same"),
    "norm/weight": ("model.norm.weight", "same"),
    "lm_head/kernel": ("lm_head.weight", "transpose"),
    "aggregate_in_kernel": ("model.aggregate_layer.0.weight", "aggregator"),
    "aggregate_in_bias": ("model.aggregate_layer.0.bias", "same"),
    "aggregate_out_kernel": ("model.aggregate_layer.2.weight", "transpose"),
    "aggregate_out_bias": ("model.aggregate_layer.2.bias", "same"),
}
# Formats whose names differ from the Qwen-style ones above and in the feed-forward types': each
# (fragment, its spelling there) replaced in a name, in order.
RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "mixtral": ((".mlp.", ".block_sparse_moe."), (".gate_proj.", ".w1."), (".up_proj.", ".w3."),
                (".down_proj.", ".w2.")),
}
INDICES = ("i", "e")  # the index placeholders of a tensor name, for a parameter's leading axes in order
# conversion -> (ours to Hugging Face, Hugging Face to ours), given P; torch Linear weights are [out, in].
CONVERSIONS: dict[str, tuple[Callable, Callable]] = {
    "same": (lambda x, P: x, lambda x, P: x),
    "transpose": (lambda x, P: x.T, lambda x, P: x.T),
    "aggregator": (aggregator_kernel_to_hf, aggregator_kernel_from_hf),
}


def hf_names(cfg: ModelConfig, model_type: str | None = None) -> dict[str, tuple[str, str]]:
    """HF_NAMES with the feed-forward block's own names in its place, spelled as `model_type` (by
    default the format the model is written as) spells them."""
    mlp = {f"{'/'.join(stack)}/{path}": (f"model.layers.{{i}}.mlp.{name}", conversion)
           for stack, (ffn, _) in mlp_stacks(cfg).items()
           for path, (name, conversion) in FFN_TYPES[ffn].HF_NAMES.items()}
    names = {entry: value for key, named in HF_NAMES.items()
             for entry, value in (mlp.items() if key == "{mlp}" else [(key, named)])}
    for old, new in RENAMES.get(model_type or hf_format(cfg), ()):
        names = {key: (name.replace(old, new), conversion) for key, (name, conversion) in names.items()}
    return names


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One tensor of a Hugging Face checkpoint and the parameter (or slice of it) it holds."""

    name: str
    path: tuple[str, ...]  # our parameter
    index: tuple[int, ...]  # into the parameter's leading axes the name indexes (position in its stack, expert)
    shape: tuple[int, ...]  # as Hugging Face stores it
    conversion: str


def _indices(name: str) -> int:
    """How many leading axes a tensor name indexes ("{i}", then "{e}")."""
    return sum(f"{{{index}}}" in name for index in INDICES)


def _layer_positions(cfg: ModelConfig) -> dict[str, dict[int, int]]:
    """{path prefix of a feed-forward stack: {layer: its position in the stack}} (`lm.mlp_stacks`);
    the parameters of no such stack hold every layer at its own position."""
    return {"/".join(stack) + "/": {layer: position for position, layer in enumerate(layers)}
            for stack, (_, layers) in mlp_stacks(cfg).items()}


def hf_tensors(cfg: ModelConfig, model_type: str | None = None) -> list[HFTensor]:
    """Every Hugging Face tensor of a model with this config (named as in `hf_names`), in file
    order: the parameters before the first stacked one, then layer by layer the stacked ones, then
    the rest."""
    declared = {"/".join(path): info for path, info in flatten_mapping(param_info(cfg)).items()}
    names = hf_names(cfg, model_type)
    unknown = sorted(set(declared) - set(names))
    if unknown:
        raise KeyError(f"no Hugging Face name for parameter {unknown[0]}; add it to hf.HF_NAMES (or to the "
                       "HF_NAMES of its feed-forward type)")
    present = [key for key in names if key in declared]
    layered = [key for key in present if "{i}" in names[key][0]]
    first = present.index(layered[0])
    stacks = _layer_positions(cfg)

    def positions(key: str) -> dict[int, int]:
        return next((held for prefix, held in stacks.items() if key.startswith(prefix)),
                    {i: i for i in range(cfg.num_layers)})

    # (parameter, its leading indices so far, the layer they name)
    order = [(key, (), None) for key in present[:first] if key not in layered]
    order += [(key, (positions(key)[i],), i) for i in range(cfg.num_layers) for key in layered
              if i in positions(key)]
    order += [(key, (), None) for key in present[first:] if key not in layered]
    tensors = []
    for key, outer, layer in order:
        name, conversion = names[key]
        leading = declared[key].shape[:_indices(name)]
        for index in np.ndindex(*leading[len(outer):]):
            index = (*outer, *index)
            named = index if layer is None else (layer, *index[1:])
            shape = declared[key].shape[len(index):]
            tensors.append(HFTensor(name.format(**dict(zip(INDICES, named))), tuple(key.split("/")), index,
                                    shape if conversion == "same" else shape[::-1], conversion))
    return tensors


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig, model_type: str | None = None) -> dict[str, Any]:
    """Nested pure dict matching `nnx.to_pure_dict` of a `ParScaleLM(cfg)` parameter state, from
    tensors named as `model_type` names them."""
    P = cfg.parscale_n
    declared = flatten_mapping(param_info(cfg))
    parts: dict[tuple[str, ...], list[np.ndarray]] = {}
    for t in hf_tensors(cfg, model_type):
        parts.setdefault(t.path, []).append(CONVERSIONS[t.conversion][1](tensors[t.name], P))
    return unflatten_mapping({path: np.stack(arrays).reshape(declared[path].shape) for path, arrays in parts.items()})


TensorSource = tuple[str, tuple[int, ...], Callable[[], np.ndarray]]


def hf_tensor_sources(params: dict[str, Any], cfg: ModelConfig) -> list[TensorSource]:
    """(name, shape, read) for every Hugging Face tensor of `params`, in file order.

    `read()` fetches one tensor to the host only when its shard is written, so an export holds the
    model once plus one shard.
    """
    flat = flatten_mapping(params)

    def read(t: HFTensor) -> np.ndarray:
        return CONVERSIONS[t.conversion][0](np.asarray(flat[t.path][t.index]), cfg.parscale_n)

    return [(t.name, t.shape, functools.partial(read, t)) for t in hf_tensors(cfg)] + absent_shared_expert(cfg)


def absent_shared_expert(cfg: ModelConfig) -> list[TensorSource]:
    """Qwen2-MoE always has a shared expert: a model without one writes it at width 0, with a zero
    gate (its output is 0), so that the checkpoint loads complete. None for other formats."""
    if hf_format(cfg) != "qwen2_moe" or cfg.moe_shared_expert_size:
        return []
    D = cfg.hidden_size
    shapes = {"shared_expert.gate_proj.weight": (0, D), "shared_expert.up_proj.weight": (0, D),
              "shared_expert.down_proj.weight": (D, 0), "shared_expert_gate.weight": (1, D)}
    return [(f"model.layers.{i}.mlp.{name}", shape, functools.partial(np.zeros, shape, np.float32))
            for i in range(cfg.num_layers) if moe_layer(cfg, i) for name, shape in shapes.items()]


# ---------------------------------------------------------------------------------------------
# Reading


def _config_json(directory: Path) -> dict[str, Any]:
    if not (directory / "config.json").is_file():
        raise ConfigError("--hf", f"{directory} holds no config.json; is it a Hugging Face checkpoint?")
    return json.loads((directory / "config.json").read_text())


def read_hf_config(directory: Path) -> ModelConfig:
    """The model config of a local Hugging Face checkpoint's `config.json`."""
    return config_from_hf(_config_json(directory))


def read_hf_checkpoint(directory: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """Config and pure parameter dict (numpy, the file's dtype) of a local safetensors checkpoint,
    one file or sharded with a `model.safetensors.index.json`."""
    directory = Path(directory)
    hf_config = _config_json(directory)
    cfg = config_from_hf(hf_config)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ConfigError("--hf", f"{directory} holds no model.safetensors (or index); "
                          "only safetensors checkpoints are read")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        try:
            with safe_open(str(directory / name), framework="numpy") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except (OSError, SafetensorError) as err:  # missing, truncated or not safetensors at all
            raise ConfigError("--hf", f"{directory / name} cannot be read: {err}") from None
    return cfg, checked_params_from_hf(tensors, cfg, directory, "config.json", hf_config["model_type"])


def checked_params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig, where: Path, config_name: str,
                           model_type: str | None = None) -> dict:
    """`params_from_hf` once every tensor the config implies is there in its shape; else a one-line
    error naming the checkpoint (`where`) and what holds its config. `model_type` is the
    checkpoint's format (by default the one we would write the model as)."""
    for t in hf_tensors(cfg, model_type):
        if t.name not in tensors:
            raise ConfigError("--hf", f"{where} lacks tensor {t.name} that its {config_name} implies")
        if tensors[t.name].shape != t.shape:
            raise ConfigError("--hf", f"{where}: tensor {t.name} has shape {list(tensors[t.name].shape)}, but "
                              f"{config_name} implies {list(t.shape)}")
    return params_from_hf(tensors, cfg, model_type)


# ---------------------------------------------------------------------------------------------
# Writing


def byte_tokenizer_json() -> str:
    """Our byte-level tokenizer (ids 0-255 are the bytes, 256 ends a document) as a `tokenizer.json`.

    GPT-2's byte-to-character table makes every byte a printable character, so a BPE model without
    merges over those 256 characters maps each byte to its own id, and the ByteLevel decoder turns
    the characters back into bytes.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    char_of_byte, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            char_of_byte[byte] = chr(byte)
        else:  # bytes without a printable character of their own go to 256, 257, ...
            char_of_byte[byte] = chr(256 + extra)
            extra += 1
    tokenizer = Tokenizer(models.BPE(vocab={char: byte for byte, char in char_of_byte.items()}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(BYTE_EOS, special=True, normalized=False)])
    return tokenizer.to_str()


BYTE_EOS = "<|endoftext|>"


def _tokenizer_files(tokenizer: str, max_length: int) -> tuple[dict[str, str], int | None]:
    """(file name → text, eos id) of the tokenizer to ship: ours, or the user's with its companion
    files. Either pads on the left, as a decoder-only model's batched generation needs."""

    def tokenizer_config(eos_token: str | None) -> dict:
        return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos_token, "pad_token": eos_token,
                "model_max_length": max_length, "clean_up_tokenization_spaces": False}

    if tokenizer == "byte":
        files, config, eos_id = {"tokenizer.json": byte_tokenizer_json()}, tokenizer_config(BYTE_EOS), ByteTokenizer.eos_id
    else:
        source = Path(tokenizer)
        files = {"tokenizer.json": source.read_text(encoding="utf-8")}
        if (source.parent / "special_tokens_map.json").is_file():
            files["special_tokens_map.json"] = (source.parent / "special_tokens_map.json").read_text(encoding="utf-8")
        loaded = HFTokenizer(str(source))
        own = source.parent / "tokenizer_config.json"
        config = json.loads(own.read_text(encoding="utf-8")) if own.is_file() else tokenizer_config(loaded.eos_token)
        eos_id = loaded.eos_id
    files["tokenizer_config.json"] = json.dumps({**config, "padding_side": "left"}, indent=2) + "\n"
    return files, eos_id


def _plan_shards(sources: list[TensorSource], itemsize: int, max_shard_bytes: int) -> list[list[TensorSource]]:
    shards: list[list[TensorSource]] = [[]]
    size = 0
    for source in sources:
        nbytes = int(np.prod(source[1])) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(source)
        size += nbytes
    return shards


def prepare_output_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Check, before any work, that `out_dir` may be written."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ConfigError("--out", f"{out_dir} exists and is not empty (pass --overwrite to replace it)")
    return out_dir


def write_hf_checkpoint(out_dir: str | Path, params: dict[str, Any], cfg: ModelConfig, tokenizer: str,
                        dtype: str = "float32", max_shard_bytes: int = 5 * 1024**3, overwrite: bool = False) -> Path:
    """Write `params` as a Hugging Face checkpoint into `out_dir`, all at once or not at all.

    Everything goes to a temporary sibling folder that is renamed to `out_dir` at the end, so an
    interrupted export leaves no half-written checkpoint behind.
    """
    hf_format(cfg)  # a model no format fits is refused before anything is written
    out_dir = prepare_output_dir(out_dir, overwrite).absolute()
    np_dtype = EXPORT_DTYPES[dtype]
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tokenizer_files, eos_id = _tokenizer_files(tokenizer, cfg.max_position_embeddings)
        for name, text in tokenizer_files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype, eos_id), indent=2) + "\n")
        generation = {"eos_token_id": eos_id, "pad_token_id": eos_id, "bos_token_id": None}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if cfg.parscale_n > 1:
            code = importlib.resources.files("parscale_jax.interop") / "hf_remote"
            for name in _REMOTE_CODE:
                (tmp / name).write_text((code / name).read_text(encoding="utf-8"), encoding="utf-8")
        _write_tensors(tmp, hf_tensor_sources(params, cfg), np_dtype, max_shard_bytes)
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_tensors(directory: Path, sources: list[TensorSource], np_dtype: Any, max_shard_bytes: int) -> None:
    shards = _plan_shards(sources, np.dtype(np_dtype).itemsize, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for file_name, shard in zip(names, shards):
        tensors = {}
        for name, shape, read in shard:
            array = np.ascontiguousarray(np.asarray(read()).astype(np_dtype))
            if array.shape != shape:
                raise CheckpointError(f"tensor {name} has shape {list(array.shape)}, but the model's config implies "
                                      f"{list(shape)}")
            tensors[name] = array
            weight_map[name] = file_name
            total += array.nbytes
        save_file(tensors, str(directory / file_name), metadata={"format": "pt"})
        shutil.copymode(directory / "config.json", directory / file_name)  # safetensors writes owner-only
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
