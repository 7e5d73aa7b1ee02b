"""Reading prepared datasets (`parscale-jax prepare`): training rows packed as they are read.

A prepared dataset is a folder of ArrayRecord shards, one record per document (its token ids,
without the end-of-document token), and a `manifest.json` that says how it was made:

    manifest.json            tokenizer (name, sha256, vocab size, eos id), token dtype, the inputs,
                             and per shard its files and document/token counts
    train-00000.array_record documents for training
    eval-00000.array_record  the held-out documents (chosen per document, by a hash of its index)

`data.sources` lists datasets with mixture weights. The training rows are packed by `PackedRows`:
row slot j of every global batch is fed by its own packer, which concatenates documents and cuts
rows of `seq_len + 1` tokens as the rows are asked for. Slot j takes the documents j, j + B, j + 2B,
... of each source's shuffled (and, epoch by epoch, reshuffled) order, choosing the source of each
next document at random by the weights (a hash of the seed, the slot and the draw). So the rows do
not depend on how many processes share them, each process reads only the documents of its own
slots, and the iterator state is a few integers per slot (how many documents it took from each
source, and how far into the current one it is): resuming is exact, and start-up time and host
memory do not grow with the corpus.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import grain
import numpy as np
from etils import epath

from parscale_jax.config import Config, DataConfig
from parscale_jax.data.packing import Rows, batches_of, pack_documents, rows_from_tokens, take_rows
from parscale_jax.errors import DataError
from parscale_jax.model.config import vocab_size_for

MANIFEST = "manifest.json"
FORMAT = 1  # the manifest's format version
WRITER_OPTIONS = "group_size:1,uncompressed"  # one record a chunk: reading a document reads only it


def tokenizer_sha256(name: str, key: str = "data.tokenizer") -> str:
    """What identifies the tokenizer a dataset was prepared with: the hash of its tokenizer.json, or
    of the name 'byte'."""
    if name == "byte":
        return hashlib.sha256(b"byte").hexdigest()
    if not Path(name).is_file():
        raise DataError(f"{key}: file not found: {name}")
    return hashlib.sha256(Path(name).read_bytes()).hexdigest()


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest of a prepared dataset, or a DataError that says what is wrong with the folder."""
    folder = epath.Path(path)
    if not folder.is_dir():
        raise DataError(f"data.sources: not found: {path}")
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        unfinished = any(folder.glob("shard-*.json"))
        raise DataError(f"data.sources: {path} is " + ("not completely prepared: run `parscale-jax prepare` "
                                                         "again with the same inputs to finish it" if unfinished
                                                         else "not a prepared dataset (no manifest.json)"))
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise DataError(f"data.sources: {path} was prepared in format {manifest.get('format')}, this version "
                        f"reads format {FORMAT}")
    return manifest


class Source:
    """One prepared dataset: its documents for training (random access) and its held-out ones."""

    def __init__(self, path: str, manifest: dict[str, Any]):
        self.path, self.manifest = path, manifest
        self.dtype = np.dtype(manifest["dtype"])
        self.eos_id: int | None = manifest["tokenizer"]["eos_id"]
        folder = epath.Path(path)
        self._files = {split: [str(folder / shard[split]) for shard in manifest["shards"] if shard[f"{split}_docs"]]
                       for split in ("train", "eval")}
        self.num_train_docs = sum(shard["train_docs"] for shard in manifest["shards"])

    @functools.cached_property
    def train(self) -> grain.sources.ArrayRecordDataSource:
        return grain.sources.ArrayRecordDataSource(self._files["train"])

    def document(self, record: bytes) -> np.ndarray:
        """A document's tokens, with the end-of-document token appended (when the tokenizer has one)."""
        tokens = np.frombuffer(record, dtype=self.dtype).astype(np.int32)
        return tokens if self.eos_id is None else np.append(tokens, np.int32(self.eos_id))

    def eval_documents(self):
        """The held-out documents in their prepared order."""
        if self._files["eval"]:
            source = grain.sources.ArrayRecordDataSource(self._files["eval"])
            for i in range(len(source)):
                yield self.document(source[i])


@functools.lru_cache(maxsize=8)
def open_sources(data: DataConfig, vocab_size: int) -> tuple[Source, ...]:
    """The configured sources, each checked against the configured tokenizer and the model's
    vocabulary (`vocab_size` token ids)."""
    expected = tokenizer_sha256(data.tokenizer)
    sources = []
    for i, entry in enumerate(data.sources):
        manifest = read_manifest(entry.path)
        if manifest["tokenizer"]["sha256"] != expected:
            raise DataError(f"data.sources[{i}]: {entry.path} was prepared with tokenizer "
                            f"'{manifest['tokenizer']['name']}', which differs from data.tokenizer "
                            f"'{data.tokenizer}'")
        source = Source(entry.path, manifest)
        if source.num_train_docs == 0:
            raise DataError(f"data.sources[{i}]: {entry.path} holds no training documents")
        tokens = manifest["tokenizer"]["vocab_size"]
        if tokens > vocab_size:
            raise DataError(f"model.vocab_size: data.sources[{i}] ({entry.path}) holds tokens of {tokens} ids, more "
                            f"than model.vocab_size={vocab_size}; set model.vocab_size={vocab_size_for(tokens)}")
        sources.append(source)
    return tuple(sources)


# --- Training rows ---


def mix64(x: int) -> int:
    """splitmix64's finalizer: a well-spread 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


class PackedRows(grain.IterDataset):
    """Endless batches of this process's `rows` of every global batch of `batch_size` rows."""

    def __init__(self, sources: tuple[Source, ...], weights: tuple[float, ...], seq_len: int, batch_size: int,
                 rows: range, seed: int):
        super().__init__([])
        self.sources, self.seq_len, self.batch_size, self.rows, self.seed = sources, seq_len, batch_size, rows, seed
        cumulative = np.cumsum(np.asarray(weights, dtype=np.float64))
        self.thresholds = [int(c / cumulative[-1] * 2.0**64) for c in cumulative[:-1]]
        self.shuffled = [grain.MapDataset.source(source.train).shuffle(seed=seed + i).repeat()
                         for i, source in enumerate(sources)]

    def __iter__(self) -> _PackedRowsIterator:
        return _PackedRowsIterator(self)

    def choose_source(self, slot: int, draw: int) -> int:
        if len(self.sources) == 1:
            return 0
        u = mix64(mix64(mix64(self.seed) ^ slot) ^ draw)
        return sum(u >= t for t in self.thresholds)


class _PackedRowsIterator(grain.DatasetIterator):
    def __init__(self, packed: PackedRows):
        super().__init__()
        self.packed = packed
        # Per slot: documents drawn, documents taken from each source, the current document
        # (source, index) and how many of its tokens are already in rows.
        self.slots = [{"draws": 0, "taken": [0] * len(packed.sources), "doc": None, "offset": 0}
                      for _ in packed.rows]
        self._documents: list[np.ndarray | None] = [None] * len(self.slots)

    def _document(self, i: int) -> np.ndarray:
        if self._documents[i] is None:
            source, index = self.slots[i]["doc"]
            self._documents[i] = self.packed.sources[source].document(self.packed.shuffled[source][index])
        return self._documents[i]

    def _next_document(self, i: int, slot: int) -> None:
        state, packed = self.slots[i], self.packed
        source = packed.choose_source(slot, state["draws"])
        state["doc"] = [source, slot + packed.batch_size * state["taken"][source]]
        state["taken"][source] += 1
        state["draws"] += 1
        state["offset"] = 0
        self._documents[i] = None

    def _row(self, i: int, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """The slot's next `seq_len + 1` tokens, and a per-row number of the document of each."""
        need = self.packed.seq_len + 1
        pieces, docs = [], []
        while need:
            state = self.slots[i]
            if state["doc"] is None or state["offset"] == len(self._document(i)):
                self._next_document(i, slot)
            document = self._document(i)
            take = min(need, len(document) - state["offset"])
            pieces.append(document[state["offset"]:state["offset"] + take])
            docs.append(np.full(take, len(docs), np.int32))
            state["offset"] += take
            need -= take
        return np.concatenate(pieces), np.concatenate(docs)

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [self._row(i, slot) for i, slot in enumerate(self.packed.rows)]
        return rows_from_tokens(np.stack([tokens for tokens, _ in rows]), np.stack([docs for _, docs in rows]))

    def get_state(self) -> dict[str, Any]:
        return {"slots": [dict(state, taken=list(state["taken"])) for state in self.slots]}

    def set_state(self, state: dict[str, Any]) -> None:
        if len(state["slots"]) != len(self.slots):
            raise DataError(f"the data position holds {len(state['slots'])} rows per process, this run "
                            f"reads {len(self.slots)}")
        self.slots = [dict(slot, taken=list(slot["taken"])) for slot in state["slots"]]
        self._documents = [None] * len(self.slots)


def train_dataset(config: Config, rows: slice) -> PackedRows:
    data = config.data
    return PackedRows(open_sources(data, config.model.vocab_size), tuple(entry.weight for entry in data.sources),
                      data.seq_len, config.train.batch_size, range(config.train.batch_size)[rows], data.seed)


def datasets(config: Config, rows: slice, eval_batches: int | None) -> tuple[_PackedRowsIterator, list[Rows]]:
    """A training run's iterator over its rows of the sources' training batches, and, unless
    `eval_batches` is None, that many held-out batches (0: all of them)."""
    train_iter, B = iter(train_dataset(config, rows)), config.train.batch_size
    if eval_batches is None:
        return train_iter, []
    held_out = eval_rows(config.data, config.model.vocab_size, eval_batches * B)
    return train_iter, list(batches_of(held_out, B, eval_batches))


# --- Held-out rows ---


@functools.lru_cache(maxsize=4)
def eval_rows(data: DataConfig, vocab_size: int, max_rows: int) -> Rows:
    """Rows of the sources' held-out documents (all of them, or the first `max_rows`)."""
    documents = eval_documents(data, vocab_size, max_rows * (data.seq_len + 1))
    rows = pack_documents(documents, data.seq_len, None)  # the documents end in their end token
    return take_rows(rows, slice(max_rows or None))


def eval_documents(data: DataConfig, vocab_size: int, max_tokens: int) -> list[np.ndarray]:
    """The sources' held-out documents (end token included), source after source in their prepared
    order; with `max_tokens` > 0 only as many as hold that many tokens."""
    row_len = data.seq_len + 1
    documents, total = [], 0
    for document in (d for source in open_sources(data, vocab_size) for d in source.eval_documents()):
        documents.append(document)
        total += len(document)
        if max_tokens and total >= max_tokens:
            break
    if total < row_len:
        raise DataError(f"the held-out documents of data.sources hold {total} tokens, fewer than one row of "
                        f"data.seq_len + 1 = {row_len}: prepare with a larger --eval-fraction")
    return documents
