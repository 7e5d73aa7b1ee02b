"""`parscale-jax prepare`: tokenize corpora once into ArrayRecord shards with a manifest (prepared.py
reads them).

Documents are read in order from every input (`.txt`: a file is a document; `.jsonl`,
`.jsonl.gz`, `.jsonl.zst`: a line's `text_key` field; `.parquet`: the `text_key` column), from local
paths or anything `etils.epath` opens. They are tokenized in batches (the `tokenizers` library
spreads a batch over all cores) and go, by a hash of their index, to the training or the held-out
file of the current shard; a shard is closed once it holds `shard_tokens` tokens. Every shard is
written under a temporary name, renamed into place, then recorded in `shard-NNNNN.json`; a killed
run starts again after the last recorded shard, and the manifest is written last. The same inputs
give the same bytes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath

from parscale_jax.data.corpus import Counted, corpus_files, read_documents
from parscale_jax.data.prepared import FORMAT, MANIFEST, WRITER_OPTIONS, mix64, tokenizer_sha256
from parscale_jax.data.tokenizer import encode_all, token_dtype, tokenizer_named
from parscale_jax.errors import DataError

OPTION = "--text-key"  # what errors about a missing text field point to
BATCH_BYTES = 4 << 20  # text tokenized at once: enough to keep every core busy


def is_held_out(index: int, eval_fraction: float) -> bool:
    """Whether document `index` (in input order) is held out: a hash of the index, so the split is
    by document, fixed for given inputs, and needs no second pass."""
    return mix64(index) < eval_fraction * 2.0**64


@dataclass
class _Shard:
    index: int
    train: list[bytes]
    held_out: list[bytes]
    tokens: int = 0
    held_out_tokens: int = 0


def _write_records(path: epath.Path, records: list[bytes]) -> None:
    temporary = path.parent / (path.name + ".tmp")
    writer = ArrayRecordWriter(str(temporary), WRITER_OPTIONS)
    for record in records:
        writer.write(record)
    writer.close()
    temporary.replace(path)


def _write_json(path: epath.Path, value: dict) -> None:
    temporary = path.parent / (path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=1) + "\n")
    temporary.replace(path)


class _Progress:
    """One line on stderr: documents, tokens, MB of text read, MB/s and the time left."""

    def __init__(self, total_bytes: int, enabled: bool):
        self.total, self.enabled, self.start, self.last = total_bytes, enabled, time.monotonic(), 0.0

    def show(self, docs: int, tokens: int, text_bytes: int, done_bytes: int, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.5 and not final):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = done_bytes / elapsed
        eta = (self.total - done_bytes) / rate if rate > 0 else 0
        sys.stderr.write(f"\rprepare: {docs:,} documents  {tokens:,} tokens  {text_bytes / 1e6:,.1f} MB  "
                         f"{text_bytes / 1e6 / elapsed:.2f} MB/s  {100 * done_bytes / max(self.total, 1):.0f}%  "
                         f"ETA {int(eta) // 60}:{int(eta) % 60:02d}   " + ("\n" if final else ""))
        sys.stderr.flush()


def prepare(out: str, inputs: list[str], tokenizer: str = "byte", eval_fraction: float = 0.01,
            text_key: str = "text", shard_tokens: int = 1 << 26, progress: bool = True) -> dict:
    """Prepare `inputs` into the folder `out`; return the manifest (also when already prepared)."""
    if not 0 <= eval_fraction < 1:
        raise DataError(f"--eval-fraction: must lie in [0, 1), got {eval_fraction}")
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens: must be >= 1, got {shard_tokens}")
    files = corpus_files(inputs)
    tok = tokenizer_named(tokenizer, "--tokenizer")
    settings = {
        "format": FORMAT,
        "tokenizer": {"name": tokenizer if tokenizer == "byte" else os.path.basename(tokenizer),
                      "sha256": tokenizer_sha256(tokenizer, "--tokenizer"), "vocab_size": tok.vocab_size, "eos_id": tok.eos_id},
        "dtype": token_dtype(tok.vocab_size).name,
        "inputs": [{"path": str(path), "bytes": path.stat().length} for path in files],
        "text_key": text_key, "eval_fraction": eval_fraction, "shard_tokens": shard_tokens,
    }
    folder = epath.Path(out)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    settings_path = folder / "prepare.json"
    if settings_path.exists() and json.loads(settings_path.read_text()) != settings:
        raise DataError(f"--out: {out} holds a dataset prepared from other inputs or settings; "
                        "choose another folder")
    if (folder / MANIFEST).exists():
        print(f"prepare: {out} is prepared already; nothing to do", file=sys.stderr)
        return json.loads((folder / MANIFEST).read_text())
    _write_json(settings_path, settings)
    try:
        return _prepare(folder, files, tok, settings, progress)
    except DataError:  # bad input: leave nothing behind that looks like a dataset
        for pattern in ("prepare.json", "shard-*.json*", "train-*.array_record*", "eval-*.array_record*"):
            for path in folder.glob(pattern):
                path.unlink()
        if created and not any(folder.iterdir()):
            folder.rmdir()
        raise


def _prepare(folder: epath.Path, files: list[epath.Path], tok, settings: dict, progress: bool) -> dict:
    text_key, eval_fraction, shard_tokens = settings["text_key"], settings["eval_fraction"], settings["shard_tokens"]

    done = []  # the shards a killed run already wrote
    while (folder / f"shard-{len(done):05d}.json").exists():
        done.append(json.loads((folder / f"shard-{len(done):05d}.json").read_text()))
    skip = done[-1]["end"] if done else 0
    if done:
        print(f"prepare: continuing after shard {len(done) - 1}, which an earlier run wrote "
              f"({skip:,} input documents done)", file=sys.stderr)
    dtype = token_dtype(tok.vocab_size)
    totals = {"docs": sum(s["train_docs"] + s["eval_docs"] for s in done),
              "tokens": sum(s["train_tokens"] + s["eval_tokens"] for s in done), "text_bytes": 0}
    meter = _Progress(sum(entry["bytes"] for entry in settings["inputs"]), progress)
    shard = _Shard(len(done), [], [])
    index, finished_bytes = 0, 0  # documents seen so far (empty ones included), bytes of whole files read

    def close(shard: _Shard, end: int) -> _Shard:
        names = {"train": f"train-{shard.index:05d}.array_record", "eval": f"eval-{shard.index:05d}.array_record"}
        _write_records(folder / names["train"], shard.train)
        _write_records(folder / names["eval"], shard.held_out)
        record = {**names, "train_docs": len(shard.train), "train_tokens": shard.tokens,
                  "eval_docs": len(shard.held_out), "eval_tokens": shard.held_out_tokens, "end": end}
        _write_json(folder / f"shard-{shard.index:05d}.json", record)
        done.append(record)
        return _Shard(shard.index + 1, [], [])

    def add(batch: list[tuple[int, str]]) -> None:
        nonlocal shard
        for (doc_index, text), ids in zip(batch, encode_all(tok, [text for _, text in batch])):
            record = ids.astype(dtype).tobytes()
            if is_held_out(doc_index, eval_fraction):
                shard.held_out.append(record)
                shard.held_out_tokens += len(ids)
            else:
                shard.train.append(record)
                shard.tokens += len(ids)
            totals["docs"] += 1
            totals["tokens"] += len(ids)
            if shard.tokens + shard.held_out_tokens >= shard_tokens:
                shard = close(shard, doc_index + 1)

    for path, entry in zip(files, settings["inputs"]):
        with path.open("rb") as raw:
            counted = Counted(raw)
            batch, batch_bytes = [], 0
            for text in read_documents(path, text_key, counted, OPTION):
                index += 1
                if index <= skip or not text.strip():
                    continue
                batch.append((index - 1, text))
                batch_bytes += len(text)
                totals["text_bytes"] += len(text.encode("utf-8"))
                if batch_bytes >= BATCH_BYTES:
                    add(batch)
                    batch, batch_bytes = [], 0
                meter.show(totals["docs"], totals["tokens"], totals["text_bytes"], finished_bytes + counted.count)
            add(batch)
        finished_bytes += entry["bytes"]
    if shard.train or shard.held_out or not done:
        shard = close(shard, index)
    meter.show(totals["docs"], totals["tokens"], totals["text_bytes"], finished_bytes, final=True)
    if sum(s["train_docs"] for s in done) == 0:
        raise DataError(f"{', '.join(str(f) for f in files)}: no non-empty documents for training")

    manifest = {**settings, "shards": [{k: v for k, v in s.items() if k != "end"} for s in done],
                "documents": sum(s["train_docs"] + s["eval_docs"] for s in done),
                "train_tokens": sum(s["train_tokens"] for s in done),
                "eval_tokens": sum(s["eval_tokens"] for s in done)}
    _write_json(folder / MANIFEST, manifest)
    for i in range(len(done)):
        (folder / f"shard-{i:05d}.json").unlink()
    return manifest
