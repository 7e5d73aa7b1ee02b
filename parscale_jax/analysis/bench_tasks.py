"""`parscale-jax bench tasks`: our lm-evaluation-harness adapter (`HarnessModel` over `RunScorer`)
against the harness's own transformers model (`hf`, `HFLM`) on the same CPU, model and requests.

One pretrained checkpoint (a Hugging Face directory or a GGUF file) is imported as a P = 1 run and
as a recycled P = `streams` run (its new streams' prefixes are the backbone's keys and values of
contexts from the run's data: recycle.py); `hf` loads the same checkpoint through transformers in
float32. For each task the harness's own evaluation (`evaluate_tasks`: its request building,
filters and metrics) runs with each model, the two alternating: a warm-up pass each (our compilation
is in it: reported apart), then `repeats` timed passes each, the order swapped every pass. What is
timed is the model's part alone, the harness's calls of `loglikelihood`, `loglikelihood_rolling`
and `generate_until` (tokenization, batching, the forward passes and decoding); requests/s is the
requests of a pass over its fastest time. Both models get the same batch size and maximum length;
torch uses every core. The scores are those of our P = 1 model, of `hf`, and of the recycled run.

The runs live in `--work` and are reused when there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from parscale_jax.analysis import plotting
from parscale_jax.errors import ConfigError

REQUEST_KINDS = ("loglikelihood", "loglikelihood_rolling", "generate_until")
# Import settings: the first training batch (the new streams' contexts) small; no background saving.
IMPORT_SETTINGS = ["data.seq_len=128", "train.batch_size=4", "checkpoint.async_save=false"]


@dataclasses.dataclass(frozen=True)
class TasksOptions:
    tasks: tuple[str, ...] = ("facts_qa", "shakespeare_mc", "facts_gen")
    limit: float | None = None  # examples per task (below 1: a fraction)
    batch_size: int = 16
    repeats: int = 3
    max_length: int | None = None  # both models' (default: the model's positions)
    streams: int = 2  # P of the recycled run


class Timer:
    """Seconds spent in, and requests given to, a harness model's request methods."""

    def __init__(self) -> None:
        self.seconds, self.requests = 0.0, 0

    @contextlib.contextmanager
    def timing(self, lm) -> Iterator[Timer]:
        """`lm`'s request methods timed (shadowed on the instance) until the block ends."""
        self.seconds, self.requests = 0.0, 0

        def timed(method):
            def call(requests, *args, **kwargs):
                started = time.perf_counter()
                try:
                    return method(requests, *args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - started
                    self.requests += len(requests)
            return call

        for kind in REQUEST_KINDS:
            setattr(lm, kind, timed(getattr(lm, kind)))
        try:
            yield self
        finally:
            for kind in REQUEST_KINDS:
                delattr(lm, kind)


def import_runs(source: Path, work: Path, overrides: list[str], streams: int) -> dict[str, Path]:
    """The checkpoint imported as a P = 1 run and as a recycled P = `streams` run (reused when there)."""
    from parscale_jax.transforms.import_hf import import_checkpoint

    if streams < 2:
        raise ConfigError("--streams", f"the recycled run needs P of 2 or more, got {streams}")
    runs = {"p1": work / "p1", f"p{streams}": work / f"p{streams}"}
    for name, run_dir in runs.items():
        if not (run_dir / "config.yaml").is_file():
            P = int(name[1:])
            print(f"importing {source} as {name}", flush=True)
            import_checkpoint(source, run_dir, [*IMPORT_SETTINGS, *overrides, f"model.parscale_n={P}"])
    return runs


def hf_model(source: Path, batch_size: int, max_length: int, prefix_token_id: int):
    """The harness's transformers model of the same checkpoint, in float32 on the CPU."""
    from lm_eval.models.huggingface import HFLM

    where = ({"pretrained": str(source.parent), "gguf_file": source.name} if source.is_file()
             else {"pretrained": str(source)})
    return HFLM(**where, device="cpu", dtype="float32", batch_size=batch_size, max_length=max_length,
                prefix_token_id=prefix_token_id, logits_cache=False, trust_remote_code=True)


def one_pass(lm, task: str, limit: float | None) -> tuple[float, int, dict[str, Any]]:
    """(seconds in the model's calls, requests, the harness's result) of one evaluation of `task`."""
    from parscale_jax.inference.harness import evaluate_tasks

    timer = Timer()
    with timer.timing(lm):
        result = evaluate_tasks(lm, [task], limit=limit)
    return timer.seconds, timer.requests, result


def metrics(result: dict[str, Any]) -> dict[str, float]:
    return {s["metric"]: s["value"] for s in result["scores"]}


def compare_task(task: str, ours, hf, recycled, o: TasksOptions) -> dict[str, Any]:
    """Warm-up, then `repeats` alternating timed passes of both models; the recycled run once."""
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    requests: dict[str, int] = {}
    results: dict[str, dict[str, Any]] = {}
    for repeat in range(o.repeats + 1):  # pass 0: the warm-up
        for name in ("ours", "hf") if repeat % 2 == 0 else ("hf", "ours"):
            seconds, requests[name], results[name] = one_pass(ours if name == "ours" else hf, task, o.limit)
            times[name].append(seconds)
            print(f"{task} {'warm-up' if repeat == 0 else f'pass {repeat}'} {name}: {requests[name]} requests in "
                  f"{seconds:.2f} s", flush=True)
    if requests["ours"] != requests["hf"]:
        raise RuntimeError(f"{task}: the models got different requests ({requests['ours']} and {requests['hf']})")
    recycled_s, _, recycled_result = one_pass(recycled, task, o.limit)
    best = {name: min(t[1:]) for name, t in times.items()}
    n = requests["ours"]
    scores = {"ours": metrics(results["ours"]), "hf": metrics(results["hf"]), "recycled": metrics(recycled_result)}
    return {"task": task, "requests": n, "ours_s": best["ours"], "hf_s": best["hf"],
            "ours_requests_per_s": n / best["ours"], "hf_requests_per_s": n / best["hf"],
            "ratio": best["hf"] / best["ours"],  # (ours req/s) / (hf req/s)
            "ours_passes_s": times["ours"][1:], "hf_passes_s": times["hf"][1:],
            "ours_warmup_s": times["ours"][0], "hf_warmup_s": times["hf"][0],
            "ours_compile_s": max(0.0, times["ours"][0] - best["ours"]),  # the warm-up's excess: compilation
            "recycled_s": recycled_s, "scores": scores, "same_scores": scores["ours"] == scores["hf"]}


def run(source: Path, work: Path, o: TasksOptions = TasksOptions(), overrides: list[str] | None = None
        ) -> dict[str, Any]:
    """Import the runs (or reuse them), then compare the models task by task (module docstring)."""
    import jax
    import lm_eval
    import torch
    import transformers

    from parscale_jax.analysis.bench import machine
    from parscale_jax.inference.harness import HarnessModel, RunScorer, resolve_tasks
    from parscale_jax.runs import Run

    for flag, value in (("--repeats", o.repeats), ("--batch-size", o.batch_size)):
        if value < 1:
            raise ConfigError(flag, f"must be at least 1, got {value}")
    if not source.exists():
        raise ConfigError("--hf", f"{source} does not exist")
    resolve_tasks(o.tasks)  # a bad name fails before anything is imported
    work.mkdir(parents=True, exist_ok=True)
    runs = import_runs(source, work, list(overrides or []), o.streams)
    p1 = RunScorer(Run.open(runs["p1"]))
    max_length = o.max_length or p1.max_length
    ours = HarnessModel(scorer=p1, batch_size=o.batch_size, max_length=max_length)
    recycled = HarnessModel(scorer=RunScorer(Run.open(runs[f"p{o.streams}"])), batch_size=o.batch_size,
                            max_length=max_length)
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        started = time.perf_counter()
        hf = hf_model(source, o.batch_size, max_length, ours.prefix_token_id)
        hf_load_s = time.perf_counter() - started
        rows = [compare_task(task, ours, hf, recycled, o) for task in o.tasks]
        torch_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    return {"options": {**dataclasses.asdict(o), "max_length": max_length}, "rows": rows,
            "machine": {**machine(), "torch_threads": torch_threads},
            "versions": {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                         "lm_eval": lm_eval.__version__},
            "runs": {name: str(path) for name, path in runs.items()}, "hf_load_s": hf_load_s}


def main_metric(scores: dict[str, float]) -> str:
    return next(iter(scores), "")


def format_report(result: dict[str, Any]) -> str:
    P = result["options"]["streams"]
    lines = [f"requests/s: our adapter (HarnessModel, JAX) against the harness's hf model (transformers), "
             f"batch {result['options']['batch_size']}, best of {result['options']['repeats']}",
             f"task            requests  ours req/s  hf req/s  ratio  ours compile s  metric       P=1 ours  hf      "
             f"P={P} recycled"]
    for r in result["rows"]:
        metric = main_metric(r["scores"]["ours"])
        score = {name: r["scores"][name].get(metric, float("nan")) for name in ("ours", "hf", "recycled")}
        lines.append(f"{r['task']:15s} {r['requests']:8d} {r['ours_requests_per_s']:11.1f} "
                     f"{r['hf_requests_per_s']:9.1f} {r['ratio']:6.2f} {r['ours_compile_s']:14.1f}  {metric:12s} {score['ours']:8.3f}  "
                     f"{score['hf']:6.3f}  {score['recycled']:8.3f}")
    differ = [r["task"] for r in result["rows"] if not r["same_scores"]]
    lines.append("scores of ours and hf " + (f"DIFFER on {', '.join(differ)}" if differ else "the same on every task"))
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    plt = plotting.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    tasks = [r["task"] for r in result["rows"]]
    x = range(len(tasks))
    ax.bar([i - 0.2 for i in x], [r["ours_requests_per_s"] for r in result["rows"]], 0.4, label="ours (JAX)")
    ax.bar([i + 0.2 for i in x], [r["hf_requests_per_s"] for r in result["rows"]], 0.4, label="hf (transformers)")
    ax.set_xticks(list(x), tasks)
    ax.set_ylabel("requests / s")
    ax.set_title(f"lm-eval requests/s, batch {result['options']['batch_size']}")
    ax.legend()
    return plotting.save(fig, path)
