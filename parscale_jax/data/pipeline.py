"""The Grain pipelines: global batches of training rows, and the held-out batches of evaluation.

The corpus named by `data.corpus` (Shakespeare, or the files of `data.paths`) is read, split,
tokenized and packed whole (corpus.py) and shuffled into batches (packing.py); prepared datasets
(`data.sources`) are packed as they are read, by prepared.py. Importing grain registers its Orbax
handler, so the training iterator checkpoints with no extra setup (restore sets the state of the
iterator passed in):

    manager.save(step, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    manager.restore(step, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(it)))

Orbax saves this item synchronously inside `save` (even with async checkpointing), so the stored
position is the one at the call. Each JAX process writes its own `process_<i>-of-<n>.json`.
"""

from __future__ import annotations

from collections.abc import Iterator

import grain
from etils import epath

from parscale_jax.config import Config
from parscale_jax.data import prepared
from parscale_jax.data.corpus import corpus_rows, decoded
from parscale_jax.data.packing import Rows, batches_of, pack_documents, shuffled_batches
from parscale_jax.data.tokenizer import Tokenizer
from parscale_jax.errors import DataError


def datasets(config: Config, rows: slice) -> tuple[grain.DatasetIterator, list[Rows]]:
    """What a training run reads: the iterator over its training batches (this process's `rows` of
    each), and the held-out batches of its periodic evaluation (none when it does not evaluate),
    read once, before the first step."""
    t = config.train
    if config.data.sources:
        return prepared.datasets(config, rows, t.eval_batches if t.eval_every else None)
    splits = corpus_rows(config.data, config.model.vocab_size)
    held_out = list(batches_of(splits["eval"], t.batch_size, t.eval_batches)) if t.eval_every else []
    return iter(shuffled_batches(splits["train"], t.batch_size, config.data.seed, rows)), held_out


def train_dataset(config: Config, rows: slice = slice(None)) -> grain.IterDataset:
    """Endless shuffled global batches of the train split, of which this process keeps `rows`.

    Every process builds the same global batches, so the data a step sees does not depend on how
    many hosts share it (`layout.Layout.process_rows` says which rows are this host's). Prepared
    `data.sources` are packed as they are read, each process reading only its rows' documents
    (prepared.py); a corpus named by `data.corpus` is read, tokenized and packed whole (corpus.py).
    """
    if config.data.sources:
        return prepared.train_dataset(config, rows)
    split = corpus_rows(config.data, config.model.vocab_size)["train"]
    return shuffled_batches(split, config.train.batch_size, config.data.seed, rows)


def eval_batches(config: Config, rows: Rows | None = None, limit: int = 0) -> Iterator[Rows]:
    """Equal-shaped batches of the held-out split (or `rows`) in a fixed order; `limit` > 0 caps their count.

    Not a generator itself, so a bad corpus fails here rather than at the first evaluation step.
    """
    batch_size, vocab_size = config.train.batch_size, config.model.vocab_size
    if rows is None and config.data.sources:
        rows = prepared.eval_rows(config.data, vocab_size, limit * batch_size)
    elif rows is None:
        rows = corpus_rows(config.data, vocab_size)["eval"]
    return batches_of(rows, batch_size, limit)


def text_file_rows(path: str, tokenizer: Tokenizer, seq_len: int) -> Rows:
    """One text file as a single packed document, for evaluating on arbitrary text: every token of
    it, the last row padded (a text shorter than one row is one padded row)."""
    file = epath.Path(path)
    if not file.is_file():
        raise DataError(f"--text: file not found: {path}")
    text = decoded(file.read_bytes(), path)
    if not text.strip():
        raise DataError(f"--text: {path} is empty")
    return pack_documents([tokenizer.encode(text)], seq_len, tokenizer.eos_id, keep_tail=True)
