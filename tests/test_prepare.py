"""Prepared pretraining data: `parscale-jax prepare` (every input kind, same bytes, resumable),
training on a two-source mixture (killed and resumed bitwise, two processes like one, each reading
only its rows' documents), held-out evaluation, and one-line errors for bad input."""

from __future__ import annotations

import gzip
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers
import zstandard
from test_reliability import finish, start_training, wait_for_step
from test_sharding import two_processes

from parscale_jax.data.tokenizer import ByteTokenizer
from parscale_jax.data import prepare
from parscale_jax.data import prepared
from parscale_jax.cli import main
from parscale_jax.config import load_config
from parscale_jax.errors import ConfigError
from parscale_jax.errors import DataError
from parscale_jax.training.loop import train
from conftest import SUBPROCESS_TIMEOUT, TINY as BASE

WORDS = ["river", "stone", "lantern", "meadow", "copper", "whistle", "harbor", "ember", "thistle", "orbit"]


def paragraphs(seed: int, count: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 40))).tolist()) + "." for _ in range(count)]


def write_inputs(folder: Path, seed: int) -> dict[str, list[str]]:
    """One file of every kind; returns each file's documents."""
    folder.mkdir(parents=True)
    docs = {"a.txt": ["\n".join(paragraphs(seed, 30))], "b.jsonl": paragraphs(seed + 1, 40),
            "c.jsonl.gz": paragraphs(seed + 2, 40), "d.jsonl.zst": paragraphs(seed + 3, 40),
            "e.parquet": paragraphs(seed + 4, 40)}
    (folder / "a.txt").write_text(docs["a.txt"][0])
    lines = {name: "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs[name]))
             for name in ("b.jsonl", "c.jsonl.gz", "d.jsonl.zst")}
    (folder / "b.jsonl").write_text(lines["b.jsonl"])
    (folder / "c.jsonl.gz").write_bytes(gzip.compress(lines["c.jsonl.gz"].encode(), mtime=0))
    (folder / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines["d.jsonl.zst"].encode()))
    pq.write_table(pa.table({"text": docs["e.parquet"], "n": list(range(40))}), folder / "e.parquet")
    return docs


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("prepared")
    docs = write_inputs(root / "inputs-a", 0)
    write_inputs(root / "inputs-b", 100)
    prepare.prepare(str(root / "a"), [str(root / "inputs-a")], eval_fraction=0.1, shard_tokens=3000, progress=False)
    prepare.prepare(str(root / "b"), [str(root / "inputs-b")], eval_fraction=0.1, progress=False)
    return root / "a", root / "b", docs


def mixture(a: Path, b: Path) -> list[str]:
    return [f"data.sources=[{{path: {a}, weight: 3}}, {{path: {b}, weight: 1}}]"]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --- prepare ---


def test_every_input_kind_is_read_and_its_documents_come_back(sources):
    a, _, docs = sources
    manifest = prepared.read_manifest(str(a))
    assert [Path(entry["path"]).name for entry in manifest["inputs"]] == sorted(docs)
    assert manifest["documents"] == sum(len(d) for d in docs.values()) == 161
    assert len(manifest["shards"]) > 2  # shard_tokens=3000
    expected = [doc for name in sorted(docs) for doc in docs[name]]
    held_out = [prepare.is_held_out(i, 0.1) for i in range(len(expected))]
    assert 5 < sum(held_out) < 40
    source = prepared.Source(str(a), manifest)
    tokenizer = ByteTokenizer()
    train_docs = [tokenizer.decode(source.document(source.train[i])[:-1]) for i in range(len(source.train))]
    assert train_docs == [d for d, h in zip(expected, held_out) if not h]
    eval_docs = [tokenizer.decode(d[:-1]) for d in source.eval_documents()]
    assert eval_docs == [d for d, h in zip(expected, held_out) if h]
    assert manifest["train_tokens"] + manifest["eval_tokens"] == sum(len(d.encode()) for d in expected)


def test_the_same_inputs_give_the_same_bytes_and_a_killed_prepare_finishes_them(sources, tmp_path, monkeypatch,
                                                                                 capsys):
    a, _, _ = sources
    inputs = [str(a.parent / "inputs-a")]
    real_write = prepare._write_records
    written = []

    def killed_after_three_files(path, records):
        if len(written) == 3:
            raise KeyboardInterrupt  # as if killed while writing the second shard
        written.append(path)
        real_write(path, records)

    monkeypatch.setattr(prepare, "_write_records", killed_after_three_files)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(str(tmp_path / "again"), inputs, eval_fraction=0.1, shard_tokens=3000, progress=False)
    assert not (tmp_path / "again" / prepared.MANIFEST).exists()
    with pytest.raises(DataError, match="not completely prepared"):
        prepared.read_manifest(str(tmp_path / "again"))
    monkeypatch.setattr(prepare, "_write_records", real_write)
    capsys.readouterr()
    prepare.prepare(str(tmp_path / "again"), inputs, eval_fraction=0.1, shard_tokens=3000, progress=False)
    assert "prepare: continuing after shard 0, which an earlier run wrote" in capsys.readouterr().err
    assert folder_bytes(tmp_path / "again") == folder_bytes(a)
    prepare.prepare(str(tmp_path / "again"), inputs, eval_fraction=0.1, shard_tokens=3000, progress=False)
    assert "is prepared already; nothing to do" in capsys.readouterr().err


def test_prepare_command_with_a_tokenizer_file(sources, tmp_path, capsys):
    a, _, docs = sources
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(docs["b.jsonl"], tokenizers.trainers.BpeTrainer(
        vocab_size=120, special_tokens=["[UNK]", "</s>"]))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    code = main(["prepare", "--out", str(tmp_path / "bpe"), "--tokenizer", str(tmp_path / "tokenizer.json"),
                 "--no-progress", str(a.parent / "inputs-a" / "b.jsonl")])
    assert code == 0
    assert "40 documents" in capsys.readouterr().out
    manifest = prepared.read_manifest(str(tmp_path / "bpe"))
    assert manifest["tokenizer"]["name"] == "tokenizer.json" and manifest["tokenizer"]["eos_id"] == 1
    source = prepared.Source(str(tmp_path / "bpe"), manifest)
    first = [i for i in range(40) if not prepare.is_held_out(i, 0.01)][0]
    assert source.document(source.train[0]).tolist() == tokenizer.encode(docs["b.jsonl"][first]).ids + [1]
    # Training with another tokenizer than the one it was prepared with is refused.
    with pytest.raises(DataError, match="prepared with tokenizer 'tokenizer.json', which differs"):
        prepared.open_sources(load_config(overrides=[f"data.sources={tmp_path / 'bpe'}"]).data, 320)
    # An embedding too small for the tokenizer's ids is refused with the size to set.
    data = load_config(overrides=[f"data.sources={tmp_path / 'bpe'}", f"data.tokenizer={tmp_path / 'tokenizer.json'}"]).data
    with pytest.raises(DataError, match=rf"data.sources\[0\] \({tmp_path / 'bpe'}\) holds tokens of {tokenizer.get_vocab_size()} "
                                        r"ids, more than model.vocab_size=32; set model.vocab_size=64"):
        prepared.open_sources(data, 32)


# --- training on prepared data ---

TINY = [*BASE, "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1", "train.steps=12",
        "train.eval_every=6", "train.eval_batches=2", "checkpoint.every=2"]


def logged(run_dir: Path, key: str = "loss") -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(m["step"], m[key]) for m in lines if key in m]


def test_a_killed_run_on_a_mixture_resumes_bitwise(sources, tmp_path):
    a, b, _ = sources
    overrides = [*TINY, *mixture(a, b)]
    train(load_config(None, overrides), tmp_path / "straight", progress=False)
    assert len(logged(tmp_path / "straight", "eval_loss")) == 2  # the held-out split evaluates
    run_dir = tmp_path / "killed"
    process = start_training(run_dir, *overrides)  # a subprocess, killed mid-run
    wait_for_step(run_dir, 7, process)
    process.send_signal(signal.SIGKILL)
    assert finish(process)[0] == -signal.SIGKILL
    code, _, err = finish(start_training(run_dir, *overrides))
    assert code == 0, err
    assert logged(run_dir) == logged(tmp_path / "straight")


def test_rows_do_not_depend_on_the_process_count_and_each_reads_its_own_documents(sources):
    a, b, _ = sources
    config = load_config(None, [*TINY, *mixture(a, b)])
    read = {}

    def batches(rows: slice, count: int) -> list[dict]:
        packed = prepared.train_dataset(config, rows)
        touched = read.setdefault((rows.start, rows.stop), set())

        class Recording:
            def __init__(self, source, i):
                self.source, self.i = source, i

            def __getitem__(self, index):
                touched.add((self.i, index))
                return self.source[index]

        packed.shuffled = [Recording(s, i) for i, s in enumerate(packed.shuffled)]
        iterator = iter(packed)
        return [next(iterator) for _ in range(count)]

    whole = batches(slice(0, 8), 6)
    halves = list(zip(batches(slice(0, 4), 6), batches(slice(4, 8), 6)))
    for full, (first, second) in zip(whole, halves):
        for key in full:
            np.testing.assert_array_equal(full[key], np.concatenate([first[key], second[key]]))
    first, second = read[0, 4], read[4, 8]
    assert first and second and not first & second  # the two halves read disjoint documents
    assert first | second == read[0, 8]
    assert {source for source, _ in second} == {0, 1}  # both sources are drawn on
    weights = [sum(1 for s, _ in read[0, 8] if s == i) for i in (0, 1)]
    assert weights[0] > weights[1]  # weight 3 against 1


def test_two_processes_train_on_prepared_data_like_one(sources, tmp_path):
    a, b, _ = sources
    import mesh_worker

    overrides = mixture(a, b)
    run_dir = tmp_path / "two"
    two_processes(run_dir, *overrides)
    reference = tmp_path / "one"
    train(mesh_worker.tiny_config(*overrides), reference, progress=False)
    np.testing.assert_allclose([loss for _, loss in logged(run_dir)], [loss for _, loss in logged(reference)],
                               rtol=0, atol=1e-5)
    state = json.loads((run_dir / "checkpoints" / "4" / "data_iter" / "process_1-of-2.json").read_text())
    assert len(state["slots"]) == 4  # process 1 packs its 4 of the 8 rows


# --- bad input ---


def prepare_error(tmp_path: Path, *inputs: str, **options) -> str:
    out = tmp_path / "out"
    with pytest.raises(DataError) as error:
        prepare.prepare(str(out), list(inputs), progress=False, **options)
    assert not out.exists(), "a failed prepare left its --out folder behind"
    return str(error.value)


def test_bad_inputs_are_one_line_errors_that_leave_nothing(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": t}) + "\n" for t in paragraphs(0, 300)))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("first line\nsecond line\ncaf\u00e9".encode("latin-1"))
    assert prepare_error(tmp_path, str(good), str(latin)) == f"{latin}:3: not UTF-8 text"
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"text": oops}\n')
    assert prepare_error(tmp_path, str(bad_json)) == f"{bad_json}:2: not valid JSON"
    no_field = tmp_path / "nofield.jsonl.gz"
    no_field.write_bytes(gzip.compress(b'{"body": "x"}\n'))
    assert prepare_error(tmp_path, str(no_field)) == f"{no_field}:1: no string field 'text' (--text-key)"
    table = tmp_path / "table.parquet"
    pq.write_table(pa.table({"content": ["a", "b"]}), table)
    assert prepare_error(tmp_path, str(table)) == f"{table}: no column 'text' (--text-key); its columns: content"
    assert "not found" in prepare_error(tmp_path, str(tmp_path / "missing.jsonl"))
    (tmp_path / "notes.md").write_text("x")
    assert "not one of" in prepare_error(tmp_path, str(tmp_path / "notes.md"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "   "}\n')
    assert "no non-empty documents" in prepare_error(tmp_path, str(empty))
    kept = tmp_path / "existing"
    kept.mkdir()
    with pytest.raises(DataError):
        prepare.prepare(str(kept), [str(empty)], progress=False)
    assert kept.is_dir(), "a folder the user made is emptied of what prepare wrote, not removed"


def test_bad_sources_are_one_line_errors(sources, tmp_path, capsys):
    a, _, _ = sources
    with pytest.raises(ConfigError, match=r"data.sources\[1\].weight: must be positive, got 0.0"):
        load_config(overrides=[f"data.sources=[{{path: {a}}}, {{path: {a}, weight: 0}}]"])
    with pytest.raises(ConfigError, match="not both"):
        load_config(overrides=[f"data.sources={a}", "data.corpus=files", f"data.paths={a}"])
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not a prepared dataset"):
        prepared.open_sources(load_config(overrides=[f"data.sources={tmp_path / 'plain'}"]).data, 320)
    # A dataset whose every document was held out has nothing to train on.
    only = tmp_path / "only.jsonl"
    only.write_text(json.dumps({"text": "one document"}) + "\n")
    prepare.prepare(str(tmp_path / "held"), [str(only)], eval_fraction=0.0, progress=False)
    manifest_path = tmp_path / "held" / prepared.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    for shard in manifest["shards"]:
        shard["eval_docs"], shard["train_docs"] = shard["train_docs"], 0
    manifest_path.write_text(json.dumps(manifest))
    code = main(["train", "--run-dir", str(tmp_path / "run"), *TINY, f"data.sources={tmp_path / 'held'}"])
    assert code == 2
    assert capsys.readouterr().err.strip().endswith("holds no training documents")


def test_prepare_runs_as_a_command_on_a_fresh_process(tmp_path):
    folder = tmp_path / "inputs"
    write_inputs(folder, 7)
    result = subprocess.run([sys.executable, "-m", "parscale_jax.cli", "prepare", "--out", str(tmp_path / "ds"),
                             str(folder)], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "documents" in result.stderr and "MB/s" in result.stderr and "ETA" in result.stderr  # progress
    assert f"data.sources={tmp_path / 'ds'}" in result.stdout


def test_the_data_benchmark_measures_on_real_text(tmp_path):
    """`bench data`'s pieces on a small corpus: the generated text, prepare beside the tokenizer,
    and the pipeline's rows/s (the start-up runs are the ones `bench data` adds)."""
    from parscale_jax.analysis import bench_data

    texts = sorted(bench_data.stdlib_texts(), key=len)[100:140]  # small files: the corpus repeats them
    written = bench_data.make_corpus(tmp_path / "corpus", 0.3, texts)
    assert written >= 0.3e6
    lines = (tmp_path / "corpus" / "part-0000.jsonl").read_text().splitlines()
    assert len(lines) > len(texts) and json.loads(lines[len(texts)])["text"] != json.loads(lines[0])["text"]
    tokenizer = bench_data.train_bpe(texts, tmp_path / "tokenizer.json", vocab_size=400)
    figures = bench_data.prepare_throughput(tmp_path / "corpus", tokenizer, tmp_path / "ds")
    assert figures["prepare_mb_s"] > 0 and figures["tokenizer_alone_mb_s"] > 0
    assert prepared.read_manifest(str(tmp_path / "ds"))["tokenizer"]["vocab_size"] == 400
    prepare.prepare(str(tmp_path / "byte"), [str(tmp_path / "corpus")], progress=False)
    assert bench_data.pipeline_rows_per_s(tmp_path / "byte", batches=5) > 0
