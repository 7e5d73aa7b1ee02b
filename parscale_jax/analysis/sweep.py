"""`parscale-jax sweep`: train a grid of model widths x stream counts P on equal training tokens,
then fit the parallel scaling law (`scaling_law.py`) to their final losses.

Each run lives in OUT/d{width}_p{P}/ and ends with a `result.json` holding its loss on the whole
held-out split. A run that has one is not trained again; a run that was cut off resumes from its
last checkpoint. The grid's results go to OUT/results.csv, the fit to OUT/fit.json and the plot to
OUT/results.law.png.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from parscale_jax.analysis import scaling_law
from parscale_jax.config import Config, ModelConfig, validate
from parscale_jax.errors import ConfigError
from parscale_jax.evaluate import evaluate_run
from parscale_jax.files import write_atomic
from parscale_jax.layout import resolve_mesh
from parscale_jax.model.counting import active_non_embedding_params, non_embedding_params, total_params
from parscale_jax.runs import Run
from parscale_jax.training.loop import train

RESULT = "result.json"
COLUMNS = ("run", "hidden_size", "P", "non_embedding_params", "active_params", "total_params", "tokens", "steps",
           "train_loss", "eval_loss", "eval_tokens", "tokens_per_s")


def scaled_model(base: ModelConfig, width: int, parscale_n: int) -> ModelConfig:
    """`base` at `width` channels with P streams: the head size, the query-to-KV-head ratio and the
    MLP-to-width ratios (of a Mixture-of-Experts' experts and shared expert too) stay those of
    `base`; the depth and the number of experts stay too."""
    head_dim = base.head_dim
    if width % head_dim:
        raise ConfigError("--sizes", f"width {width} is not a multiple of the base model's head size {head_dim}")
    heads = width // head_dim
    kv_heads = max(heads // (base.num_heads // base.num_kv_heads), 1)
    if heads % kv_heads:
        raise ConfigError("--sizes", f"width {width} gives {heads} heads, which {kv_heads} KV heads do not divide")

    def scaled(size: int) -> int:
        return max(round(width * size / base.hidden_size / 8) * 8, 8) if size else 0

    return dataclasses.replace(base, hidden_size=width, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                               intermediate_size=scaled(base.intermediate_size), parscale_n=parscale_n,
                               moe_intermediate_size=scaled(base.moe_intermediate_size),
                               moe_shared_expert_size=scaled(base.moe_shared_expert_size))


def grid(base: Config, widths: tuple[int, ...], streams: tuple[int, ...], tokens: int | None) -> dict[str, Config]:
    """The validated config of every run, by name. Every run trains on the same tokens: `tokens`
    (rounded to whole steps) or the base config's steps; warmup keeps its share of the steps."""
    t = base.train
    tokens_per_step = t.batch_size * base.data.seq_len
    steps = t.steps if tokens is None else round(tokens / tokens_per_step)
    if steps < 1:
        raise ConfigError("--tokens", f"{tokens} tokens are less than one step of {tokens_per_step} "
                          f"(train.batch_size x data.seq_len)")
    train = dataclasses.replace(t, steps=steps, warmup_steps=round(t.warmup_steps * steps / t.steps))
    return {f"d{width}_p{p}": validate(dataclasses.replace(base, model=scaled_model(base.model, width, p), train=train))
            for width in widths for p in streams}


def check_run_dir(name: str, config: Config, run_dir: Path) -> None:
    """A run directory left by an earlier sweep must hold the same run; else resuming would mix two."""
    differ, _ = Run(run_dir, config).config_changes()
    if differ:
        raise ConfigError("--out", f"run {name} in {run_dir} was trained with other settings "
                          f"({', '.join(differ)}); sweep into a new --out")


def run_one(name: str, config: Config, run_dir: Path, progress: bool) -> dict[str, Any]:
    """Train (or finish) one run and evaluate it on the whole held-out split; its row of results.csv."""
    last = train(config, run_dir, progress=progress)
    evaluation = evaluate_run(Run(run_dir, config))
    t = config.train
    row = {"run": name, "hidden_size": config.model.hidden_size, "P": config.model.parscale_n,
           "non_embedding_params": non_embedding_params(config.model),
           "active_params": active_non_embedding_params(config.model), "total_params": total_params(config.model),
           "tokens": t.steps * t.batch_size * config.data.seq_len, "steps": t.steps,
           "train_loss": last.get("loss"), "eval_loss": evaluation["loss"],
           "eval_tokens": evaluation["target_tokens"], "tokens_per_s": last.get("tokens_per_s")}
    if jax.process_index() == 0:
        write_atomic(run_dir / RESULT, json.dumps(row, indent=2) + "\n")
    return row


def run_sweep(runs: dict[str, Config], out: Path, progress: bool = True) -> list[dict[str, Any]]:
    """Every run of the grid, skipping finished ones; writes and returns the rows of results.csv."""
    for name, config in runs.items():  # all of them before any training
        resolve_mesh(config, jax.device_count())
        check_run_dir(name, config, out / name)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (name, config) in enumerate(runs.items(), 1):
        result = out / name / RESULT
        if result.is_file():
            rows.append(json.loads(result.read_text()))
            print(f"[{index}/{len(runs)}] {name}: finished already, eval loss {rows[-1]['eval_loss']:.4f}", flush=True)
            continue
        print(f"[{index}/{len(runs)}] {name}: N = {non_embedding_params(config.model):,} non-embedding "
              f"parameters, {config.train.steps} steps", flush=True)
        rows.append(run_one(name, config, out / name, progress))
        print(f"[{index}/{len(runs)}] {name}: eval loss {rows[-1]['eval_loss']:.4f}", flush=True)
    if jax.process_index() == 0:
        table = io.StringIO()
        writer = csv.DictWriter(table, COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(out / "results.csv", table.getvalue())
    return rows


def fit_results(out: Path) -> tuple[dict, str]:
    """The law fitted to a sweep's results.csv (written to OUT/fit.json): ({"all": (fit, points)}, a report)."""
    fits, report = scaling_law.fit_groups(scaling_law.read_results(str(out / "results.csv"), None))
    fit = fits["all"][0]
    write_atomic(out / "fit.json", json.dumps({**dataclasses.asdict(fit.law), "r2": fit.r2}, indent=2) + "\n")
    return fits, report


def dense_loss_at(n: float, dense: dict[int, float]) -> float | None:
    """The loss of a P = 1 run with `n` parameters, interpolated linearly in log N between the
    P = 1 runs (`dense`: N -> loss) on either side; None outside them, where only the law can say."""
    sizes = sorted(dense)
    if not sizes or not sizes[0] <= n <= sizes[-1]:
        return None
    return float(np.interp(np.log(n), np.log(sizes), [dense[size] for size in sizes]))


def format_table(rows: list[dict[str, Any]]) -> str:
    """Each run's loss against P = 1: at the same width, and at the same N (interpolated between
    the P = 1 runs), since the streams' own parameters count in N."""
    by_width = {row["hidden_size"]: row["eval_loss"] for row in rows if row["P"] == 1}
    by_size = {row["non_embedding_params"]: row["eval_loss"] for row in rows if row["P"] == 1}
    lines = ["width   P  non-emb. N   eval loss   vs P = 1: same width   same N"]
    for row in sorted(rows, key=lambda r: (r["hidden_size"], r["P"])):
        references = ((by_width.get(row["hidden_size"]), dense_loss_at(row["non_embedding_params"], by_size))
                      if row["P"] > 1 else (None, None))
        shown = [f"{row['eval_loss'] - ref:+.4f}" if ref is not None else "" for ref in references]
        lines.append(f"{row['hidden_size']:5d}  {row['P']:2d}  {row['non_embedding_params']:10,d}   "
                     f"{row['eval_loss']:9.4f}   {shown[0]:>20}   {shown[1]:>6}".rstrip())
    return "\n".join(lines)
