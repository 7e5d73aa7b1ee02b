"""The Grain pipelines: global batches of training rows, and the held-out batches of evaluation.

The corpus named by `data.corpus` (Shakespeare, or the files of `data.paths`) is read, tokenized,
split and packed whole here; prepared datasets (`data.sources`) are packed as they are read, by
prepared.py. Importing grain registers its Orbax handler, so the training iterator checkpoints with
no extra setup (restore sets the state of the iterator passed in):

    manager.save(step, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    manager.restore(step, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(it)))

Orbax saves this item synchronously inside `save` (even with async checkpointing), so the stored
position is the one at the call. Each JAX process writes its own `process_<i>-of-<n>.json`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import grain
import numpy as np
from etils import epath

from parscale_jax.config import Config, DataConfig
from parscale_jax.data import corpus, prepared
from parscale_jax.data.packing import ROW_KEYS, Rows, pack_documents, split_documents, take_rows
from parscale_jax.data.tokenizer import Tokenizer, encode_all, tokenizer_named
from parscale_jax.errors import DataError

# Batches are cheap to build; a small buffer keeps host memory low at large batch sizes.
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


def load_tokenizer(data: DataConfig) -> Tokenizer:
    return tokenizer_named(data.tokenizer, "data.tokenizer")


def read_documents(data: DataConfig) -> list[str]:
    """The non-empty documents of the configured corpus."""
    if data.corpus == "shakespeare":
        files, key = corpus.shakespeare_files(), "data.corpus"
    else:
        files, key = corpus.corpus_files(data.paths, "data.paths"), "data.paths"
    docs = [doc for path in files for doc in corpus.file_documents(path, data.text_key, "data.text_key")]
    docs = [doc for doc in docs if doc.strip()]
    if not docs:
        raise DataError(f"{key}: corpus '{data.corpus}' holds no non-empty documents")
    return docs


@functools.lru_cache(maxsize=4)
def _split_rows(data: DataConfig, split: str) -> Rows:
    """The packed rows of one split; cached because evaluation asks for them again and again."""
    tokenizer = load_tokenizer(data)
    train, evaluation = split_documents(read_documents(data), data.eval_fraction, data.seed)
    docs = train if split == "train" else evaluation
    return pack_documents(encode_all(tokenizer, docs), data.seq_len, tokenizer.eos_id)


@functools.lru_cache(maxsize=4)
def _prepared_eval_rows(data: DataConfig, max_rows: int) -> Rows:
    """Rows of the prepared sources' held-out documents (all of them, or the first `max_rows`)."""
    documents = prepared.eval_documents(data, max_rows * (data.seq_len + 1))
    rows = pack_documents(documents, data.seq_len, None)  # the documents end in their end token
    return take_rows(rows, slice(max_rows or None))


def check_vocab(config: Config) -> None:
    """The tokens the data holds fit the model's embedding."""
    if config.data.sources:
        vocab_size = prepared.vocab_size(config.data)
    else:
        vocab_size = load_tokenizer(config.data).vocab_size
    if vocab_size > config.model.vocab_size:
        raise DataError(f"model.vocab_size: the tokenizer has {vocab_size} tokens but model.vocab_size is "
                        f"{config.model.vocab_size}; set model.vocab_size={-(-vocab_size // 64) * 64} (or leave it "
                        "out of the config: it is then the tokenizer's size, rounded up to a multiple of 64)")


def train_dataset(config: Config, rows: slice = slice(None)) -> grain.IterDataset:
    """Endless shuffled global batches of the train split, of which this process keeps `rows`.

    Every process builds the same global batches, so the data a step sees does not depend on how
    many hosts share it (`layout.Layout.process_rows` says which rows are this host's). Prepared
    `data.sources` are packed as they are read, each process reading only its rows' documents
    (prepared.py); a corpus named by `data.corpus` is read, tokenized and packed whole here.
    """
    batch_size = config.train.batch_size
    check_vocab(config)
    if config.data.sources:
        return prepared.train_dataset(config, rows)
    split = _split_rows(config.data, "train")
    dataset = (
        grain.MapDataset.range(len(split["tokens"]))
        .map(lambda i: {key: value[i] for key, value in split.items()})
        .shuffle(seed=config.data.seed)
        .repeat()  # reseeds the shuffle in every epoch
        .batch(batch_size, drop_remainder=True)
        .map(functools.partial(take_rows, rows=rows))
    )
    return dataset.to_iter_dataset(READ_OPTIONS)


def _padded_batches(rows: Rows, batch_size: int, num_batches: int) -> Iterator[Rows]:
    """Consecutive batches, the last filled up with all-zero rows: loss_mask 0 keeps them out of the mean."""
    for start in range(0, num_batches * batch_size, batch_size):
        batch = {key: rows[key][start : start + batch_size] for key in ROW_KEYS}
        missing = batch_size - len(batch["tokens"])
        yield {key: np.pad(value, ((0, missing), (0, 0))) for key, value in batch.items()}


def eval_batches(config: Config, rows: Rows | None = None, limit: int = 0) -> Iterator[Rows]:
    """Equal-shaped batches of the held-out split (or `rows`) in a fixed order; `limit` > 0 caps their count.

    Not a generator itself, so a bad corpus fails here rather than at the first evaluation step.
    """
    batch_size = config.train.batch_size
    if rows is None:
        check_vocab(config)
        if config.data.sources:
            rows = _prepared_eval_rows(config.data, limit * batch_size)
        else:
            rows = _split_rows(config.data, "eval")
    num_batches = math.ceil(len(rows["tokens"]) / batch_size)
    if limit > 0:
        num_batches = min(num_batches, limit)
    return _padded_batches(rows, batch_size, num_batches)


def text_file_rows(path: str, tokenizer: Tokenizer, seq_len: int) -> Rows:
    """One text file as a single packed document, for evaluating on arbitrary text: every token of
    it, the last row padded (a text shorter than one row is one padded row)."""
    file = epath.Path(path)
    if not file.is_file():
        raise DataError(f"--text: file not found: {path}")
    text = corpus.decoded(file.read_bytes(), path)
    if not text.strip():
        raise DataError(f"--text: {path} is empty")
    return pack_documents([tokenizer.encode(text)], seq_len, tokenizer.eos_id, keep_tail=True)
