"""Documents into rows: the held-out split, and rows of `seq_len` tokens packed from whole documents.

A row is five int32 arrays of `seq_len` (`ROW_KEYS`): the input tokens, their next-token targets,
segment ids (one per packed document, 0 for padding), positions within the document, and the loss
mask (1 where the target follows its input in the same document). The model keeps attention and
loss inside one document by them.

Shape suffixes: R rows, S the row length (`data.seq_len`), W a row's window of S + 1 tokens (the
inputs and, shifted by one, their targets).
"""

from __future__ import annotations

import numpy as np

from parscale_jax.errors import DataError

ROW_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")
Rows = dict[str, np.ndarray]  # ROW_KEYS -> int32 [R, S]


def _line_cut(doc: str, target: int) -> int:
    """The line start nearest to character `target`, or `target` itself if the text has no line break."""
    before, after = doc.rfind("\n", 0, target), doc.find("\n", target)
    cuts = [i + 1 for i in (before, after) if i != -1 and 0 < i + 1 < len(doc)]
    return min(cuts, key=lambda cut: abs(cut - target), default=target)


def split_documents(docs: list[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, eval): whole documents when there are enough, else the tail of every document."""
    if len(docs) * eval_fraction >= 1:
        num_eval = round(len(docs) * eval_fraction)
        held_out = set(np.random.default_rng(seed).permutation(len(docs))[:num_eval].tolist())
        train = [doc for i, doc in enumerate(docs) if i not in held_out]
        evaluation = [doc for i, doc in enumerate(docs) if i in held_out]
    else:
        cuts = [_line_cut(doc, round(len(doc) * (1 - eval_fraction))) for doc in docs]
        train = [doc[:cut] for doc, cut in zip(docs, cuts) if doc[:cut]]
        evaluation = [doc[cut:] for doc, cut in zip(docs, cuts) if doc[cut:]]
    if not train or not evaluation:
        raise DataError(f"cannot split {len(docs)} document(s) with data.eval_fraction={eval_fraction} "
                        "into non-empty train and eval parts")
    return train, evaluation


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
