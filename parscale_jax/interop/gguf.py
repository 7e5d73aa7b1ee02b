"""GGUF files (llama.cpp's format; many small models are published only as one): a Llama or Qwen2
model read as the Hugging Face checkpoint it was converted from, dequantized to float32.

Three things differ from a Hugging Face directory: the config is the file's `<arch>.*` metadata;
the tensors have llama.cpp's names, and a Llama's q/k rows are permuted (llama.cpp's converter
interleaves each head's two rotary halves; Qwen2's are left as they are); and the tokenizer is
the file's vocabulary and merges, from which a `tokenizer.json` is built. `parscale-jax import`
reads one with `--hf FILE.gguf`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from parscale_jax.errors import ConfigError

ARCHITECTURES = ("llama", "qwen2")

# llama.cpp tensor names (after `blk.N.`) -> Hugging Face names (after `model.layers.N.`).
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}

# How each `tokenizer.ggml.pre` splits text before byte-level BPE, as the model's own tokenizer did.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {  # name: (digits one by one first, split pattern)
    "default": (False, _GPT2_SPLIT), "gpt-2": (False, _GPT2_SPLIT), "gpt2": (False, _GPT2_SPLIT),
    "smollm": (True, _GPT2_SPLIT), "starcoder": (True, _GPT2_SPLIT),
    "llama3": (False, _LLAMA3_SPLIT), "llama-v3": (False, _LLAMA3_SPLIT), "llama-bpe": (False, _LLAMA3_SPLIT),
    "qwen2": (False, _QWEN2_SPLIT), "deepseek-r1-qwen": (False, _QWEN2_SPLIT),
}


class GGUFFile:
    """One GGUF file's model: `hf_config` (a Hugging Face `config.json` dict), `tokenizer_json`
    (None when the file's vocabulary is not byte-level BPE) and `tensors()`."""

    def __init__(self, path: str | Path, key: str = "--hf"):
        from gguf import GGUFReader  # numpy only, but not needed unless a GGUF file is read

        self.path, self.key = Path(path), key
        try:
            self._reader = GGUFReader(str(self.path))
        except Exception as err:  # a truncated or foreign file fails in struct/memmap/value errors
            raise ConfigError(key, f"{self.path} is not a readable GGUF file ({type(err).__name__}: {err})") from None
        self.architecture = self._field("general.architecture")
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(key, f"{self.path}: GGUF architecture '{self.architecture}' is not supported "
                              f"({', '.join(ARCHITECTURES)})")
        self.hf_config = self._hf_config()
        self.tokenizer_json = self._tokenizer_json()

    def _field(self, name: str, default: Any = None) -> Any:
        field = self._reader.fields.get(name)
        if field is None:
            if default is None:
                raise ConfigError(self.key, f"{self.path}: GGUF metadata lacks '{name}'")
            return default
        return field.contents()

    def _hf_config(self) -> dict[str, Any]:
        arch = self.architecture
        names = {t.name for t in self._reader.tensors}
        heads = int(self._field(f"{arch}.attention.head_count"))
        hidden = int(self._field(f"{arch}.embedding_length"))
        scaling = self._field(f"{arch}.rope.scaling.type", "none")
        if scaling not in ("none", "linear") or float(self._field(f"{arch}.rope.scaling.factor", 1.0)) != 1.0:
            raise ConfigError(self.key, f"{self.path}: RoPE scaling '{scaling}' is not supported")
        vocab = self._reader.fields.get("tokenizer.ggml.tokens")
        return {
            "model_type": arch,
            "vocab_size": int(self._field(f"{arch}.vocab_size", len(vocab.data) if vocab else 0)),
            "hidden_size": hidden,
            "intermediate_size": int(self._field(f"{arch}.feed_forward_length")),
            "num_hidden_layers": int(self._field(f"{arch}.block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._field(f"{arch}.attention.head_count_kv", heads)),
            "head_dim": int(self._field(f"{arch}.attention.key_length", hidden // heads)),
            "rope_theta": float(self._field(f"{arch}.rope.freq_base", 10000.0)),
            "rms_norm_eps": float(self._field(f"{arch}.attention.layer_norm_rms_epsilon")),
            "max_position_embeddings": int(self._field(f"{arch}.context_length")),
            "tie_word_embeddings": "output.weight" not in names,
            "attention_bias": "blk.0.attn_q.bias" in names,
            "qkv_bias": "blk.0.attn_q.bias" in names,
        }

    def tensors(self) -> dict[str, np.ndarray]:
        """Every tensor under its Hugging Face name, float32, in torch's [out, in] layout."""
        from gguf import dequantize

        tensors = {}
        for t in self._reader.tensors:
            name = _hf_name(t.name)
            if name is None:
                continue  # e.g. rope_freqs, which a plain RoPE model does not need
            try:
                array = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
            except NotImplementedError as err:
                raise ConfigError(self.key, f"{self.path}: tensor {t.name} is stored as "
                                  f"{t.tensor_type.name}, which cannot be dequantized: {err}") from None
            array = array.reshape(tuple(int(n) for n in reversed(t.shape)))  # GGUF lists the fastest axis first
            if self.architecture == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = self.hf_config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
                array = _unpermute_rotary_rows(array, heads)
            tensors[name] = array
        return tensors

    def _tokenizer_json(self) -> str | None:
        """A Hugging Face `tokenizer.json` of the file's byte-level BPE vocabulary and merges."""
        if self._field("tokenizer.ggml.model", "none") != "gpt2":
            return None
        pre = self._field("tokenizer.ggml.pre", "default")
        if pre not in _PRE_SPLITS:
            raise ConfigError(self.key, f"{self.path}: GGUF pre-tokenizer '{pre}' is not supported "
                              f"({', '.join(sorted(_PRE_SPLITS))})")
        digits, split = _PRE_SPLITS[pre]
        tokens = self._field("tokenizer.ggml.tokens")
        types = self._field("tokenizer.ggml.token_type", [1] * len(tokens))
        pieces = [{"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False},
                  {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]
        if digits:
            pieces.insert(0, {"type": "Digits", "individual_digits": True})
        special = [{"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                    "normalized": False, "special": True}
                   for i, (token, kind) in enumerate(zip(tokens, types)) if kind == 3]  # 3: control token
        return json.dumps({
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
            "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": pieces},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": {token: i for i, token in enumerate(tokens)},
                      "merges": [merge.split(" ", 1) for merge in self._field("tokenizer.ggml.merges")]},
        })


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def _unpermute_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (per head: the two rotary halves interleaved pairwise)."""
    rows = weight.shape[0] // heads // 2
    return weight.reshape(heads, rows, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
