"""Tokenizers: UTF-8 bytes plus an end-of-document token, or a Hugging Face `tokenizer.json`; and
what identifies one (the hash a prepared dataset records)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tokenizers

from parscale_jax.errors import DataError
from parscale_jax.model.config import vocab_size_for

EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>")


class ByteTokenizer:
    """UTF-8 bytes as tokens, plus one end-of-document token."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        ids = np.asarray(ids)
        byte_ids = ids[(ids >= 0) & (ids < 256)].astype(np.uint8)
        return byte_ids.tobytes().decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizer.json`, used without adding special tokens."""

    def __init__(self, path: str):
        self._tokenizer = tokenizers.Tokenizer.from_file(path)
        self.vocab_size: int = self._tokenizer.get_vocab_size()
        found = [self._tokenizer.token_to_id(name) for name in EOS_NAMES]
        self.eos_id: int | None = next((i for i in found if i is not None), None)
        self.eos_token: str | None = None if self.eos_id is None else self._tokenizer.id_to_token(self.eos_id)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Many texts at once, spread over all cores by the tokenizers library."""
        return [np.asarray(e.ids, dtype=np.int32) for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)])


Tokenizer = ByteTokenizer | HFTokenizer


def tokenizer_named(name: str, key: str = "data.tokenizer") -> Tokenizer:
    """'byte' or a tokenizer.json path; errors name the option (`key`) it came from."""
    if name == "byte":
        return ByteTokenizer()
    if not Path(name).is_file():
        raise DataError(f"{key}: file not found: {name}")
    try:
        return HFTokenizer(name)
    except Exception as err:  # tokenizers raises a bare Exception on malformed files
        raise DataError(f"{key}: {name} is not a tokenizer.json: {err}") from None


def load_tokenizer(data) -> Tokenizer:
    """The tokenizer of a `DataConfig`."""
    return tokenizer_named(data.tokenizer, "data.tokenizer")


def encode_all(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Many texts, on every core where the tokenizer can (the tokenizers library's batch encoding)."""
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.encode_batch(texts)
    return [tokenizer.encode(text) for text in texts]


def check_fits(tokens: int, vocab_size: int) -> None:
    """A tokenizer of `tokens` tokens fits an embedding of `vocab_size` rows, or a DataError saying
    what to set."""
    if tokens > vocab_size:
        raise DataError(f"model.vocab_size: the tokenizer has {tokens} tokens but model.vocab_size is "
                        f"{vocab_size}; set model.vocab_size={vocab_size_for(tokens)} (or leave it out of the "
                        "config: it is then the tokenizer's size, rounded up to a multiple of 64)")


def tokenize(texts: list[str], name: str, vocab_size: int) -> tuple[list[np.ndarray], int | None]:
    """(the token ids of every text, the end-of-document id) under the tokenizer `name`
    (`data.tokenizer`), which must fit an embedding of `vocab_size` rows."""
    tokenizer = tokenizer_named(name, "data.tokenizer")
    check_fits(tokenizer.vocab_size, vocab_size)
    return encode_all(tokenizer, texts), tokenizer.eos_id


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer type that holds every token id."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
