"""`parscale-jax bench moe`: what Mixture-of-Experts costs and buys here, against the dense model of
equal active parameters (each expert F/k wide, k chosen per token: the same MLP FLOPs per token).

- speed: training tokens/s and the compiled step's memory of the dense model and of the MoE model,
  side by side in one process, at each sequence length (the same tokens per step);
- quality: dense, MoE with each number of experts, and MoE with P streams trained on the config's
  corpus for the same steps and tokens: held-out loss, tokens/s, memory;
- upcycling: from the dense run's last checkpoint, continued dense training against the upcycled
  MoE (every expert a copy of the MLP) trained for the same steps and tokens.

Runs go to a work folder and are reused when finished (a killed benchmark starts again where it
stopped: the train loop resumes each run).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from parscale_jax.analysis import plotting
from parscale_jax.analysis.bench import train_step_figures
from parscale_jax.config import Config, load_config, to_dict
from parscale_jax.errors import ConfigError
from parscale_jax.layout import Layout
from parscale_jax.model.counting import active_non_embedding_params, non_embedding_params, train_flops_per_token
from parscale_jax.checkpoint import complete_steps
from parscale_jax.runs import Run, initial_weights, read_source
from parscale_jax.training.loop import train
from parscale_jax.transforms.upcycle import upcycle


@dataclasses.dataclass(frozen=True)
class MoEOptions:
    experts: tuple[int, ...] = (4, 8)
    top_k: int = 2
    capacity: float = 1.25
    streams: int = 2
    seq_lens: tuple[int, ...] = (1024, 4096)
    tokens_per_step: int = 4096
    timed_steps: int = 5
    upcycle_steps: int = 150


def moe_variant(config: Config, experts: int, o: MoEOptions, streams: int | None = None) -> Config:
    """`config` with its MLP split into `experts` experts of F/k, k per token."""
    m = config.model
    if m.intermediate_size % o.top_k:
        raise ConfigError("--top-k", f"{o.top_k} does not divide model.intermediate_size={m.intermediate_size}")
    model = dataclasses.replace(m, ffn="moe", num_experts=experts, experts_per_token=o.top_k,
                                moe_intermediate_size=m.intermediate_size // o.top_k, moe_capacity_factor=o.capacity,
                                parscale_n=streams or m.parscale_n)
    return _checked(config, model=model)


def _checked(config: Config, **sections) -> Config:
    values = to_dict(dataclasses.replace(config, **sections))
    return load_config(base=values)


def speed(config: Config, o: MoEOptions) -> list[dict[str, Any]]:
    rows = []
    for S in o.seq_lens:
        B = max(1, o.tokens_per_step // S)
        base = _checked(config, data=dataclasses.replace(config.data, seq_len=S),
                        train=dataclasses.replace(config.train, batch_size=B, grad_accum=1),
                        model=dataclasses.replace(config.model, max_position_embeddings=max(S, config.model.max_position_embeddings)))
        dense = train_step_figures(base, o.timed_steps)
        moe = train_step_figures(moe_variant(base, max(o.experts), o), o.timed_steps)
        rows.append({"seq_len": S, "batch": B, "experts": max(o.experts), "dense_tokens_per_s": dense["tokens_per_s"],
                     "moe_tokens_per_s": moe["tokens_per_s"], "throughput_ratio": moe["tokens_per_s"] / dense["tokens_per_s"],
                     "dense_memory_bytes": dense["memory_bytes"], "moe_memory_bytes": moe["memory_bytes"],
                     "memory_ratio": moe["memory_bytes"] / dense["memory_bytes"]})
    return rows


def train_or_finish(config: Config, run_dir: Path, progress: bool) -> list[dict[str, Any]]:
    """Train the run, or finish it where it stopped (a finished one is not reopened); its records."""
    if (run_dir / "config.yaml").is_file():
        config = Run.open(run_dir).config
        done = max(complete_steps(Run(run_dir, config).checkpoint_dir), default=0) >= config.train.steps
    else:
        done = False
    print(f"{run_dir.name}: {'finished already' if done else 'training'}", flush=True)
    if not done:
        train(config, run_dir, progress=progress)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summary(config: Config, records: list[dict[str, Any]], timed_steps: int) -> dict[str, Any]:
    """A finished run's held-out curve, and its step's tokens/s and memory measured now, one run right
    after the other (the training windows' tokens/s depend on what else ran meanwhile)."""
    tokens = config.train.batch_size * config.data.seq_len
    evals = [r for r in records if "eval_loss" in r]
    figures = train_step_figures(config, timed_steps)
    return {"final_eval_loss": evals[-1]["eval_loss"],
            "curve": [{"step": r["step"], "tokens": r["step"] * tokens, "eval_loss": r["eval_loss"]} for r in evals],
            "tokens_per_s": figures["tokens_per_s"], "memory_bytes": figures["memory_bytes"],
            "params": non_embedding_params(config.model), "active_params": active_non_embedding_params(config.model),
            "train_flops_per_token": train_flops_per_token(config.model, config.data.seq_len)}


def quality(config: Config, work: Path, o: MoEOptions, progress: bool) -> dict[str, Any]:
    if not config.train.eval_every:
        raise ConfigError("train.eval_every", "bench moe compares held-out losses: set it above 0")
    variants = {"dense": config, **{f"moe{E}": moe_variant(config, E, o) for E in o.experts}}
    variants[f"moe{min(o.experts)}-p{o.streams}"] = moe_variant(config, min(o.experts), o, o.streams)
    records = {name: train_or_finish(cfg, work / name, progress) for name, cfg in variants.items()}
    return {name: summary(cfg, records[name], o.timed_steps) for name, cfg in variants.items()}


def upcycling(config: Config, work: Path, o: MoEOptions, progress: bool) -> dict[str, Any]:
    """From the dense run's last checkpoint: dense training continued, and the upcycled MoE
    (experts F wide, top-k: k times the dense MLP FLOPs), each `upcycle_steps` more steps."""
    more = dataclasses.replace(config.train, steps=o.upcycle_steps, warmup_steps=max(1, o.upcycle_steps // 10))
    continued_dir, upcycled_dir = work / "dense-continued", work / f"upcycled{max(o.experts)}"
    if not continued_dir.exists():
        source = read_source(work / "dense", "bench moe")
        new = _checked(config, train=more)
        layout = Layout.create(new)
        with jax.set_mesh(layout.mesh):
            Run.create(continued_dir, new, initial_weights(layout, source.params, new.model, np.float32),
                       "continue", [source.parent])
    if not upcycled_dir.exists():
        upcycle(work / "dense", upcycled_dir, [f"model.num_experts={max(o.experts)}", f"model.experts_per_token={o.top_k}",
                                               f"model.moe_capacity_factor={o.capacity}", f"train.steps={more.steps}",
                                               f"train.warmup_steps={more.warmup_steps}"], noise=0.01)
    run_dirs = {"dense-continued": continued_dir, "upcycled": upcycled_dir}
    configs = {name: Run.open(run_dir).config for name, run_dir in run_dirs.items()}
    records = {name: train_or_finish(configs[name], run_dirs[name], progress) for name in run_dirs}
    return {name: summary(cfg, records[name], o.timed_steps) for name, cfg in configs.items()}


def run(config: Config, work: Path, o: MoEOptions, progress: bool = True) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    return {"options": dataclasses.asdict(o), "speed": speed(config, o),
            "quality": quality(config, work, o, progress), "upcycling": upcycling(config, work, o, progress)}


def format_report(result: dict[str, Any]) -> str:
    lines = ["speed (one device; MoE of equal active parameters, gather dispatch)",
             "seq    batch  experts  dense tok/s  MoE tok/s  ratio   dense MiB  MoE MiB  ratio"]
    for r in result["speed"]:
        lines.append(f"{r['seq_len']:<6d} {r['batch']:<6d} {r['experts']:<8d} {r['dense_tokens_per_s']:11,.0f} "
                     f"{r['moe_tokens_per_s']:10,.0f} {r['throughput_ratio']:5.2f}   {r['dense_memory_bytes'] / 2**20:9.1f} "
                     f"{r['moe_memory_bytes'] / 2**20:8.1f} {r['memory_ratio']:5.2f}")
    for part in ("quality", "upcycling"):
        lines += ["", part, "run               params   active   eval loss  tok/s   MiB    GFLOP/token"]
        for name, r in result[part].items():
            lines.append(f"{name:17s} {r['params'] / 1e6:6.2f}M  {r['active_params'] / 1e6:6.2f}M  "
                         f"{r['final_eval_loss']:9.4f}  {r['tokens_per_s']:6,.0f}  {r['memory_bytes'] / 2**20:6.1f} "
                         f"{r['train_flops_per_token'] / 1e9:8.3f}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    plt = plotting.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, part, title in zip(axes, ("quality", "upcycling"), ("equal active parameters and tokens",
                                                                "from the dense run's last checkpoint")):
        for name, r in result[part].items():
            ax.plot([p["tokens"] for p in r["curve"]], [p["eval_loss"] for p in r["curve"]], marker="o", label=name)
        ax.set_xlabel("training tokens")
        ax.set_ylabel("held-out loss (nats/token)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    return plotting.save(fig, path)
