"""`parscale-jax bench data`: what the prepared-data pipeline costs, each figure beside its peer.

- `prepare` throughput (MB of text per second) beside the tokenizer alone (`tokenizers` batch
  encoding of the same text in memory), with a BPE tokenizer trained here on the same text;
- training start-up (process start to the first logged step) and peak RSS with a small and a
  large prepared corpus: both ratios should be near 1;
- the input pipeline's rows/s beside the rows/s the training step consumes at the default config.

The corpus is real text made here: the Python standard library's sources (docstrings included),
repeated with variation (each repetition rotates every file's lines and renames its identifiers).
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import tokenizers

from parscale_jax.data import prepare
from parscale_jax.data import prepared
from parscale_jax.config import load_config

FILE_MB = 64  # the generated corpus comes in .jsonl files of this size


def stdlib_texts() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(root.rglob("*.py")):
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return [text for text in texts if text.strip()]


def make_corpus(folder: Path, megabytes: float, texts: list[str]) -> int:
    """About `megabytes` of JSON lines of real text in `folder`; returns the bytes of text written."""
    folder.mkdir(parents=True, exist_ok=True)
    target, written, repetition, file_index = int(megabytes * 1e6), 0, 0, 0
    out, out_bytes = None, 0
    word = re.compile(r"\b([a-z_]{4,})\b")
    while written < target:
        for text in texts:
            if out is None or out_bytes >= FILE_MB * 1e6:
                if out:
                    out.close()
                out, out_bytes = (folder / f"part-{file_index:04d}.jsonl").open("w", encoding="utf-8"), 0
                file_index += 1
            lines = text.splitlines()
            shift = (repetition * 7) % max(len(lines), 1)
            varied = "\n".join(lines[shift:] + lines[:shift])
            if repetition:
                varied = word.sub(lambda m, r=repetition: f"{m.group(1)}{r}", varied)
            line = json.dumps({"text": varied}) + "\n"
            out.write(line)
            out_bytes += len(line)
            written += len(varied.encode("utf-8"))
            if written >= target:
                break
        repetition += 1
    out.close()
    return written


def train_bpe(texts: list[str], path: Path, vocab_size: int = 8192) -> Path:
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(path))
    return path


def prepare_throughput(corpus: Path, tokenizer_path: Path, out: Path) -> dict:
    """MB/s of `prepare` on the corpus, and of the tokenizer alone on the same text."""
    texts = [json.loads(line)["text"] for part in sorted(corpus.glob("*.jsonl"))
             for line in part.read_text(encoding="utf-8").splitlines()]
    megabytes = sum(len(text.encode("utf-8")) for text in texts) / 1e6
    tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_path))
    started = time.perf_counter()
    for start in range(0, len(texts), 1024):
        tokenizer.encode_batch(texts[start:start + 1024], add_special_tokens=False)
    alone_s = time.perf_counter() - started
    started = time.perf_counter()
    prepare.prepare(str(out), [str(corpus)], str(tokenizer_path), eval_fraction=0.01, progress=False)
    prepare_s = time.perf_counter() - started
    return {"text_mb": round(megabytes, 1), "tokenizer_alone_mb_s": megabytes / alone_s,
            "prepare_mb_s": megabytes / prepare_s, "prepare_over_tokenizer": alone_s / prepare_s}


def start_up(dataset: Path, run_dir: Path, steps: int) -> dict:
    """Seconds from process start to the first logged step, peak RSS, and the trained tokens/s, of
    `parscale-jax train` (the default config) on a prepared dataset."""
    command = [sys.executable, "-m", "parscale_jax.cli", "train", "--run-dir", str(run_dir), "--no-progress",
               f"data.sources={dataset}", f"train.steps={steps}", "train.log_every=1", "train.eval_every=0",
               "train.warmup_steps=1", f"checkpoint.every={steps}"]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, first_step_s = run_dir / "metrics.jsonl", None
    while process.poll() is None:
        if first_step_s is None and metrics.exists() and metrics.read_text().strip():
            first_step_s = time.perf_counter() - started
        time.sleep(0.01)
    if process.returncode:
        raise RuntimeError(f"training on {dataset} failed: {process.stderr.read()}")
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest child so far
    return {"first_step_s": first_step_s, "peak_rss_bytes": peak_rss,
            "train_tokens_per_s": float(np.median([line["tokens_per_s"] for line in lines[1:]]))}


def pipeline_rows_per_s(dataset: Path, batches: int = 200) -> float:
    """Rows/s of the prepared-data pipeline alone at the default config's batch and row length."""
    config = load_config("default", [f"data.sources={dataset}"])
    iterator = iter(prepared.train_dataset(config, slice(None)))
    next(iterator)
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * config.train.batch_size / (time.perf_counter() - started)


def run(work: Path, small_mb: float, large_mb: float) -> dict:
    texts = stdlib_texts()
    config = load_config("default")
    results = {}
    small, large = work / "corpus-small", work / "corpus-large"
    results["small_text_bytes"] = make_corpus(small, small_mb, texts)
    bpe = train_bpe(texts[:2000], work / "tokenizer.json")
    results["prepare"] = prepare_throughput(small, bpe, work / "small-bpe")
    results["large_text_bytes"] = make_corpus(large, large_mb, texts)
    for name, corpus in (("small", small), ("large", large)):
        started = time.perf_counter()
        prepare.prepare(str(work / f"{name}-byte"), [str(corpus)], "byte", eval_fraction=0.001, progress=False)
        results[f"prepare_{name}_byte_s"] = time.perf_counter() - started
    # Each twice, alternating (the first run of all also warms the disk cache); the faster of each.
    runs = {"small": [], "large": []}
    for name in ("small", "large", "small", "large"):
        runs[name].append(_in_fresh_process(work / f"{name}-byte", work / f"run-{name}-{len(runs[name])}", steps=20))
    for name, pair in runs.items():
        results[name] = min(pair, key=lambda r: r["first_step_s"])
    results["start_up_ratio"] = results["large"]["first_step_s"] / results["small"]["first_step_s"]
    results["peak_rss_ratio"] = results["large"]["peak_rss_bytes"] / results["small"]["peak_rss_bytes"]
    rows_per_s = pipeline_rows_per_s(work / "large-byte")
    consumed = results["small"]["train_tokens_per_s"] / config.data.seq_len
    results["pipeline"] = {"rows_per_s": rows_per_s, "train_consumes_rows_per_s": consumed,
                           "ahead": rows_per_s / consumed}
    return results


def _in_fresh_process(dataset: Path, run_dir: Path, steps: int) -> dict:
    """`start_up` from a new Python process: the peak RSS of a process's children is the largest
    of all of them so far, so each measurement needs a parent of its own."""
    code = (f"import json; from pathlib import Path; from parscale_jax.analysis.bench_data import start_up; "
            f"print(json.dumps(start_up(Path({str(dataset)!r}), Path({str(run_dir)!r}), {steps})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def format_report(results: dict) -> str:
    p, s, lg, pipe = results["prepare"], results["small"], results["large"], results["pipeline"]
    return "\n".join([
        f"prepare ({p['text_mb']} MB, BPE 8192): {p['prepare_mb_s']:.2f} MB/s; the tokenizer alone "
        f"{p['tokenizer_alone_mb_s']:.2f} MB/s (prepare at {p['prepare_over_tokenizer']:.2f}x of it)",
        f"prepare with the byte tokenizer: {results['small_text_bytes'] / 1e6:.0f} MB in "
        f"{results['prepare_small_byte_s']:.1f} s, {results['large_text_bytes'] / 1e6:.0f} MB in "
        f"{results['prepare_large_byte_s']:.1f} s",
        f"start-up to the first step: {s['first_step_s']:.2f} s ({results['small_text_bytes'] / 1e6:.0f} MB) "
        f"vs {lg['first_step_s']:.2f} s ({results['large_text_bytes'] / 1e6:.0f} MB): "
        f"ratio {results['start_up_ratio']:.2f}",
        f"peak RSS: {s['peak_rss_bytes'] / 2**20:.0f} MiB vs {lg['peak_rss_bytes'] / 2**20:.0f} MiB: "
        f"ratio {results['peak_rss_ratio']:.2f}",
        f"input pipeline: {pipe['rows_per_s']:.0f} rows/s; training consumes "
        f"{pipe['train_consumes_rows_per_s']:.1f} rows/s: {pipe['ahead']:.0f}x ahead"])
