"""`parscale-jax bench growth`: does growing a model during training (`train.growth`) reach the
loss of the final model trained from scratch for less compute?

Both runs train on the same data with the same optimizer settings and number of steps: one with the
config's growth schedule, one with the final (largest) model from the first step. Each run's
held-out loss is logged every `train.eval_every` steps beside the training FLOPs spent so far,
counted at each phase's model size (`growth.Schedule.flops`). The answer is the FLOPs at which the
growing run first reaches the scratch run's final loss, against the scratch run's total, or that it
does not reach it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from parscale_jax.analysis import plotting
from parscale_jax.config import Config, stage_models
from parscale_jax.errors import ConfigError
from parscale_jax.model.counting import non_embedding_params
from parscale_jax.training.loop import train


def runs(config: Config) -> dict[str, Config]:
    if not config.train.growth:
        raise ConfigError("train.growth", "bench growth needs a config with a growth schedule (e.g. --config growth)")
    if not config.train.eval_every:
        raise ConfigError("train.eval_every", "bench growth compares held-out losses: set it above 0")
    final = stage_models(config)[-1]
    scratch = dataclasses.replace(config, model=final, train=dataclasses.replace(config.train, growth=()))
    return {"growth": config, "scratch": scratch}


def curve(run_dir: Path) -> list[dict[str, float]]:
    """(step, FLOPs, eval loss) of every evaluation a run logged."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    flops = {r["step"]: r["flops"] for r in records if "flops" in r}
    return [{"step": r["step"], "flops": flops[r["step"]], "eval_loss": r["eval_loss"]}
            for r in records if "eval_loss" in r and r["step"] in flops]


def compare(curves: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    scratch, growth = curves["scratch"], curves["growth"]
    target, scratch_flops = scratch[-1]["eval_loss"], scratch[-1]["flops"]
    reached = next((point for point in growth if point["eval_loss"] <= target), None)
    return {"scratch_final_loss": target, "scratch_flops": scratch_flops,
            "growth_final_loss": growth[-1]["eval_loss"], "growth_flops": growth[-1]["flops"],
            "growth_reaches_scratch_at_flops": None if reached is None else reached["flops"],
            "flops_ratio": None if reached is None else reached["flops"] / scratch_flops}


def format_report(result: dict[str, Any]) -> str:
    lines = ["run       params (non-emb.)   final eval loss   training FLOPs"]
    for name in ("growth", "scratch"):
        params = " -> ".join(f"{n / 1e6:.2f}M" for n in result["params"][name])
        lines.append(f"{name:9s} {params:20s} {result[f'{name}_final_loss']:15.4f}   {result[f'{name}_flops']:.3e}")
    if result["flops_ratio"] is None:
        lines.append("the growing run does not reach the scratch run's final loss in its steps")
    else:
        lines.append(f"the growing run reaches the scratch run's final loss at {result['flops_ratio']:.2f}x its FLOPs")
    return "\n".join(lines)


def plot(curves: dict[str, list[dict[str, float]]], path: Path) -> Path:
    plt = plotting.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        ax.plot([p["flops"] for p in points], [p["eval_loss"] for p in points], marker="o", label=name)
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("growing during training vs. the final model from scratch")
    ax.legend()
    return plotting.save(fig, path)


def run(config: Config, work: Path, progress: bool = True) -> tuple[dict[str, Any], dict[str, list]]:
    """Train both runs in `work` (resuming any already there) and compare them."""
    configs = runs(config)
    curves = {}
    for name, run_config in configs.items():
        train(run_config, work / name, progress=progress)
        curves[name] = curve(work / name)
    result = compare(curves)
    result["params"] = {"growth": [non_embedding_params(m) for m in stage_models(config)],
                        "scratch": [non_embedding_params(configs["scratch"].model)]}
    result["curves"] = curves
    return result, curves
