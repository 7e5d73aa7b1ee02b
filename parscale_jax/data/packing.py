"""Token documents into rows of `seq_len` tokens, packed from whole documents; rows into batches.

A row is five int32 arrays of `seq_len` (`ROW_KEYS`): the input tokens, their next-token targets,
segment ids (one per packed document, 0 for padding), positions within the document, and the loss
mask (1 where the target follows its input in the same document). The model keeps attention and
loss inside one document by them.

Shape suffixes: R rows, S the row length (`data.seq_len`), W a row's window of S + 1 tokens (the
inputs and, shifted by one, their targets).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import grain
import numpy as np

from parscale_jax.errors import DataError

ROW_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")
# Batches are cheap to build; a small buffer keeps host memory low at large batch sizes.
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
Rows = dict[str, np.ndarray]  # ROW_KEYS -> int32 [R, S]


def rows_from_tokens(tokens_RW: np.ndarray, docs_RW: np.ndarray) -> Rows:
    """Rows from windows of S + 1 tokens and the document each token came from (-1: padding): shifted
    targets, segment ids (a segment starts at the row start and wherever the document changes;
    padding is segment 0), positions within the segment, and the loss mask."""
    input_docs_RS, target_docs_RS = docs_RW[:, :-1], docs_RW[:, 1:]
    real_RS = input_docs_RS >= 0
    starts_RS = np.ones_like(input_docs_RS, dtype=bool)
    starts_RS[:, 1:] = input_docs_RS[:, 1:] != input_docs_RS[:, :-1]
    index_RS = np.broadcast_to(np.arange(input_docs_RS.shape[1], dtype=np.int32), starts_RS.shape)
    segment_start_RS = np.maximum.accumulate(np.where(starts_RS, index_RS, 0), axis=1)
    return {
        "tokens": tokens_RW[:, :-1].astype(np.int32),
        "targets": tokens_RW[:, 1:].astype(np.int32),
        "segment_ids": np.where(real_RS, np.cumsum(starts_RS, axis=1, dtype=np.int32), 0).astype(np.int32),
        "positions": np.where(real_RS, index_RS - segment_start_RS, 0).astype(np.int32),
        "loss_mask": (real_RS & (input_docs_RS == target_docs_RS)).astype(np.int32),
    }


def pack_documents(token_docs: list[np.ndarray], seq_len: int, eos_id: int | None, keep_tail: bool = False) -> Rows:
    """Rows of seq_len inputs and their shifted targets, cut from the concatenated documents.

    The tokens after the last whole row are dropped, or with `keep_tail` make one more row, padded
    (segment 0, no loss) after them.
    """
    if eos_id is not None:
        token_docs = [np.append(doc, np.int32(eos_id)) for doc in token_docs]
    stream = np.concatenate(token_docs).astype(np.int32) if token_docs else np.zeros(0, np.int32)
    doc_index = np.repeat(np.arange(len(token_docs), dtype=np.int32), [len(doc) for doc in token_docs])
    window = seq_len + 1
    num_rows = len(stream) // window
    if keep_tail and len(stream) % window >= 2:  # a tail with at least one target
        num_rows += 1
        padding = num_rows * window - len(stream)
        stream = np.pad(stream, (0, padding))
        doc_index = np.pad(doc_index, (0, padding), constant_values=-1)
    if num_rows == 0:
        raise DataError(f"only {len(stream)} tokens, fewer than one row of data.seq_len + 1 = {window}")
    tokens_RW = stream[: num_rows * window].reshape(num_rows, window)
    docs_RW = doc_index[: num_rows * window].reshape(num_rows, window)
    return rows_from_tokens(tokens_RW, docs_RW)


def take_rows(batch: Rows, rows: slice) -> Rows:
    """Some rows of a batch: those this process holds (`layout.Layout.process_rows`)."""
    return {key: value[rows] for key, value in batch.items()}


def batches_of(rows: Rows, batch_size: int, limit: int = 0) -> Iterator[Rows]:
    """Consecutive batches of `rows` in their order (at most `limit` > 0), the last filled up with
    all-zero rows: loss_mask 0 keeps them out of the mean."""
    num_batches = math.ceil(len(rows["tokens"]) / batch_size)
    for start in range(0, min(num_batches, limit or num_batches) * batch_size, batch_size):
        batch = {key: rows[key][start : start + batch_size] for key in ROW_KEYS}
        missing = batch_size - len(batch["tokens"])
        yield {key: np.pad(value, ((0, missing), (0, 0))) for key, value in batch.items()}


def shuffled_batches(split: Rows, batch_size: int, seed: int, rows: slice) -> grain.IterDataset:
    """Endless global batches of the rows of `split`, shuffled (anew every epoch), of which this
    process keeps `rows`."""
    dataset = (
        grain.MapDataset.range(len(split["tokens"]))
        .map(lambda i: {key: value[i] for key, value in split.items()})
        .shuffle(seed=seed)
        .repeat()  # reseeds the shuffle in every epoch
        .batch(batch_size, drop_remainder=True)
        .map(functools.partial(take_rows, rows=rows))
    )
    return dataset.to_iter_dataset(READ_OPTIONS)
