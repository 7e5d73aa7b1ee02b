"""`parscale-jax bench recycle`: is it worth training P streams on a pretrained model, against what
a user would do instead (train the model itself on the same tokens)?

From one checkpoint (a Hugging Face directory or a GGUF file) it imports and trains, on the same
data and number of steps:
- `p1_full`: the model alone, every parameter trained (plain continued pretraining);
- `p<P>_full`: P streams, every parameter trained (the paper's second stage);
- `p<P>_peft`: P streams on the frozen backbone, only prefixes and aggregator trained;
each at every learning rate of its sweep (`--lr` for the full runs, `--peft-lr` for PEFT). Each
run's held-out loss is read at step 0 (the imported weights) and at every `train.eval_every`
steps, against training tokens; a variant's curve is the one of its learning rate with the lowest
final loss. The runs live in `--work` and resume, so a killed benchmark continues where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from parscale_jax.analysis import plotting
from parscale_jax.checkpoint import complete_steps
from parscale_jax.errors import ConfigError
from parscale_jax.evaluate import evaluate_run
from parscale_jax.files import write_atomic
from parscale_jax.runs import Run
from parscale_jax.training.loop import train
from parscale_jax.transforms.import_hf import import_checkpoint

STEP0 = "bench_step0.json"  # a run's held-out loss at step 0, kept beside it


def variants(streams: tuple[int, ...]) -> dict[str, tuple[int, str]]:
    """name: (P, train.trainable)."""
    if any(p < 2 for p in streams):
        raise ConfigError("--streams", f"values of P above 1 (P = 1 is always measured), got {list(streams)}")
    return {"p1_full": (1, "all"),
            **{f"p{p}_full": (p, "all") for p in streams},
            **{f"p{p}_peft": (p, "parscale") for p in streams}}


def curve(run: Run) -> list[dict[str, float]]:
    """(step, tokens, held-out loss) at step 0 and at every evaluation the run logged."""
    step0 = run.directory / STEP0
    if not step0.is_file():
        loss = evaluate_run(run, limit=run.config.train.eval_batches, step=0)["loss"]
        write_atomic(step0, json.dumps({"eval_loss": loss}) + "\n")
    records = [json.loads(line) for line in (run.directory / "metrics.jsonl").read_text().splitlines()]
    evals = {0: json.loads(step0.read_text())["eval_loss"],
             **{r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}}
    tokens_per_step = run.config.train.batch_size * run.config.data.seq_len
    return [{"step": s, "tokens": s * tokens_per_step, "eval_loss": evals[s]} for s in sorted(evals)]


def run(source: Path, work: Path, overrides: list[str], base: dict[str, Any] | None, streams: tuple[int, ...],
        lrs: tuple[float, ...], peft_lrs: tuple[float, ...], progress: bool = True) -> dict[str, Any]:
    """Import and train every variant at every learning rate of its sweep in `work` (finishing runs
    already there); the curves, and each variant's best learning rate."""
    sweeps: dict[str, dict[str, list]] = {}
    for name, (p, trainable) in variants(streams).items():
        sweeps[name] = {}
        for lr in peft_lrs if trainable == "parscale" else lrs:
            run_dir = work / f"{name}_lr{lr:g}"
            if not (run_dir / "config.yaml").exists():
                settings = [*overrides, f"model.parscale_n={p}", f"train.trainable={trainable}", f"train.lr={lr}"]
                import_checkpoint(source, run_dir, settings, base)
            the_run = Run.open(run_dir)
            done = max(complete_steps(the_run.checkpoint_dir), default=0) >= the_run.config.train.steps
            print(f"{name} lr {lr:g}: {'finished already' if done else 'training'} {run_dir}", flush=True)
            if not done:
                train(the_run.config, run_dir, progress=progress)
            sweeps[name][f"{lr:g}"] = curve(the_run)
    return summarize(sweeps)


def summarize(sweeps: dict[str, dict[str, list]]) -> dict[str, Any]:
    """Each variant's best learning rate (lowest final held-out loss) and its curve; the base model's
    loss (P = 1 at step 0) to compare against."""
    best = {}
    for name, by_lr in sweeps.items():
        lr = min(by_lr, key=lambda lr: by_lr[lr][-1]["eval_loss"])
        best[name] = {"lr": float(lr), "final_loss": by_lr[lr][-1]["eval_loss"], "curve": by_lr[lr]}
    return {"base_loss": best["p1_full"]["curve"][0]["eval_loss"], "best": best, "sweeps": sweeps}


def format_report(result: dict[str, Any]) -> str:
    base = result["base_loss"]
    lines = [f"the imported model alone (P = 1, step 0): held-out loss {base:.4f}",
             "variant     best lr   step 0    final     final - base   first eval below base"]
    for name, best in result["best"].items():
        below = next((p["step"] for p in best["curve"] if p["eval_loss"] < base), None)
        lines.append(f"{name:10s}  {best['lr']:<8g}  {best['curve'][0]['eval_loss']:.4f}   {best['final_loss']:.4f}"
                     f"    {best['final_loss'] - base:+.4f}        {'-' if below is None else f'step {below}'}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    plt = plotting.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, best in result["best"].items():
        points = best["curve"]
        ax.plot([p["tokens"] for p in points], [p["eval_loss"] for p in points], marker="o",
                label=f"{name} (lr {best['lr']:g})")
    ax.axhline(result["base_loss"], color="gray", linestyle="--", label="imported, untouched")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("recycling a pretrained model: streams vs. continued training")
    ax.legend(fontsize=8)
    return plotting.save(fig, path)
