"""What P streams cost, measured: decode latency and memory, ParScale against parameter scaling at
equal predicted loss (SPEC §5), and training throughput.

Every benchmark measures all of its variants in one process, one after the other on the same
machine, and reports ratios next to the absolute figures: timings on a shared machine drift, ratios
taken side by side much less. Memory is the compiled program's own account (arguments + outputs -
donated + temporaries), which does not depend on the allocator or on what else runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from parscale_jax.analysis import plotting, torch_peer
from parscale_jax.analysis.timing import median_seconds, step_latency_s
from parscale_jax.config import Config, ModelConfig, SamplingConfig
from parscale_jax.errors import ConfigError
from parscale_jax.model.counting import non_embedding_params, train_flops_per_token
from parscale_jax.inference.generate import Generator
from parscale_jax.layout import Layout
from parscale_jax.model import init_params, model_graphdef

STACK_V2_K = 0.3935  # k of the published Stack-V2-Python fit (SPEC §4)


def _decode_figures(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int,
                    repeats: int) -> dict[str, float]:
    """Per-token decode latency (s) and decode-step memory (bytes) of `cfg` at `batch`, on one device."""
    layout = Layout.one_device(cfg)
    graphdef = model_graphdef(cfg)
    params = jax.jit(lambda: init_params(cfg, 0))()
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len)).tolist()
    generator = Generator(graphdef, cfg, layout, batch, prompt_len + new_tokens, SamplingConfig(new_tokens))
    generator.run(params, prompts)  # compile
    stamps = []
    for _ in range(repeats):
        stamps.append([])
        generator.run(params, prompts, on_tokens=lambda _: stamps[-1].append(time.perf_counter()))
    return {"latency_s": step_latency_s(stamps), "memory_bytes": generator.decode_memory_bytes(params)}


def weight_products_s(cfg: ModelConfig, rows: int, repeats: int) -> float:
    """The floor of a decode step: the time its weight products alone take at `rows` rows (B·P: the
    streams share the weights), every layer's q, k, v, o, gate, up, down and the LM head, chained so
    that none can be skipped."""
    D, F, N, K, H, L = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.num_layers)
    shapes = {"q": (D, N * H), "k": (D, K * H), "v": (D, K * H), "o": (N * H, D), "gate": (D, F), "up": (D, F),
              "down": (F, D)}
    keys = iter(jax.random.split(jax.random.key(0), L * len(shapes) + 2))
    weights = [{name: 0.02 * jax.random.normal(next(keys), shape) for name, shape in shapes.items()} for _ in range(L)]
    head = 0.02 * jax.random.normal(next(keys), (D, cfg.vocab_size))

    def products(x_RD, weights, head):
        for w in weights:
            q_RN, k_RK, v_RK = x_RD @ w["q"], x_RD @ w["k"], x_RD @ w["v"]
            x_RD = (q_RN + jnp.tile(k_RK + v_RK, N // K)) @ w["o"]
            x_RD = ((x_RD @ w["gate"]) * (x_RD @ w["up"])) @ w["down"]
        return x_RD @ head

    step = jax.jit(products)
    x_RD = jax.random.normal(next(keys), (rows, D))
    step(x_RD, weights, head).block_until_ready()
    return median_seconds(lambda: step(x_RD, weights, head), max(repeats, 5) * 4)


def decode_cost(model: ModelConfig, streams=(1, 2, 4, 8), batches=(1, 2, 4, 8), prompt_len: int = 64,
                new_tokens: int = 32, repeats: int = 3, peer: str | None = None) -> list[dict[str, Any]]:
    """Per-token decode latency and memory for every P x batch, with ratios to P = 1 at the same batch,
    and to the floor (the weight products alone at B·P rows); with `peer="torch"` the PyTorch
    implementation's latency too, measured right after ours."""
    rows = []
    for batch in batches:
        base = None
        for P in streams:
            cfg = dataclasses.replace(model, parscale_n=P)
            figures = _decode_figures(cfg, batch, prompt_len, new_tokens, repeats)
            base = base or figures
            floor_s = weight_products_s(cfg, batch * P, repeats)
            row = {"P": P, "batch": batch, **figures,
                   # A latency too small to tell from timing noise has no ratio.
                   "latency_ratio": 1.0 if figures is base else _ratio(figures["latency_s"], base["latency_s"]),
                   "memory_ratio": figures["memory_bytes"] / base["memory_bytes"],
                   "floor_s": floor_s, "vs_floor": _ratio(figures["latency_s"], floor_s)}
            if peer == "torch":
                row["peer_latency_s"] = torch_peer.decode_latency_s(cfg, batch, prompt_len, new_tokens, repeats)
                row["vs_peer"] = _ratio(row["peer_latency_s"], figures["latency_s"])
            rows.append(row)
    return rows


def dense_equivalent(base: ModelConfig, P: int, k: float = STACK_V2_K) -> ModelConfig:
    """The P = 1 model the law says P streams are worth: N·(k ln P + 1) non-embedding parameters at
    the same depth and head count, widened the way the paper's sizes grow (SPEC §2: a larger
    head_dim, the MLP in proportion)."""
    target = non_embedding_params(dataclasses.replace(base, parscale_n=1)) * (k * math.log(P) + 1)
    best = None
    for head_dim in range(base.head_dim + 2, 8 * base.head_dim + 1, 2):  # wider, and even for RoPE
        hidden = base.num_heads * head_dim
        mlp = 8 * max(1, round(base.intermediate_size * hidden / base.hidden_size / 8))
        candidate = dataclasses.replace(base, parscale_n=1, hidden_size=hidden, intermediate_size=mlp,
                                        head_dim=head_dim)
        error = abs(non_embedding_params(candidate) - target)
        if best is None or error < best[0]:
            best = (error, candidate)
        if non_embedding_params(candidate) > target:
            break
    return best[1]


def equal_loss(base: ModelConfig, streams=(2, 4, 8), batches=(1, 2, 4, 8), prompt_len: int = 64,
               new_tokens: int = 32, repeats: int = 3, k: float = STACK_V2_K) -> list[dict[str, Any]]:
    """ParScale against parameter scaling at equal predicted loss: how much memory and latency each
    adds over the P = 1 base, and the ratio of the two increases (the paper's 22x and 6x at 1.6B, P = 8)."""
    base = dataclasses.replace(base, parscale_n=1)
    rows = []
    for batch in batches:
        reference = _decode_figures(base, batch, prompt_len, new_tokens, repeats)
        for P in streams:
            parscale = _decode_figures(dataclasses.replace(base, parscale_n=P), batch, prompt_len,
                                       new_tokens, repeats)
            dense_cfg = dense_equivalent(base, P, k)
            dense = _decode_figures(dense_cfg, batch, prompt_len, new_tokens, repeats)
            increase = {name: {key: figures[key] - reference[key] for key in ("latency_s", "memory_bytes")}
                        for name, figures in (("parscale", parscale), ("dense", dense))}
            rows.append({
                "P": P, "batch": batch, "base_params": non_embedding_params(base),
                "dense_params": non_embedding_params(dense_cfg), "dense_hidden": dense_cfg.hidden_size,
                "base": reference, "parscale": parscale, "dense": dense,
                "memory_increase_ratio": _ratio(increase["dense"]["memory_bytes"],
                                                increase["parscale"]["memory_bytes"]),
                "latency_increase_ratio": _ratio(increase["dense"]["latency_s"], increase["parscale"]["latency_s"]),
            })
    return rows


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def _shown(ratio: float | None, digits: int = 2) -> str:
    return "n/a" if ratio is None else f"{ratio:.{digits}f}"


def matmul_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large float32 matrix product on the default device: the MFU denominator."""
    a = jnp.ones((size, size), jnp.float32)
    product = jax.jit(lambda x: x @ x)
    product(a).block_until_ready()
    return 2 * size**3 / median_seconds(lambda: product(a), repeats)


def train_step_figures(config: Config, steps: int) -> dict[str, float]:
    """Training tokens/s of `config`'s step on one device (random tokens, the mean over `steps`
    steps after one to warm up) and the compiled step's memory (bytes)."""
    from parscale_jax.training.step import Trainer, shardings_of

    B, S = config.train.batch_size, config.data.seq_len
    tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (B, S + 1)).astype(np.int32)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((B, S), np.int32),
             "positions": np.broadcast_to(np.arange(S, dtype=np.int32), (B, S)), "loss_mask": np.ones((B, S), np.int32)}
    trainer = Trainer.of(config)
    layout = Layout.one_device(config.model)
    with jax.set_mesh(layout.mesh):
        state = trainer.init_state(layout, jax.jit(lambda: init_params(config.model, 0))())
        halted = jnp.zeros((), bool)
        step = trainer.train_step(layout, shardings_of(state), {}).lower(state, {}, batch, halted).compile()
        memory = step.memory_analysis()
        state, metrics = step(state, {}, batch, halted)  # run once
        jax.block_until_ready(metrics)  # before the clock starts: the steps run asynchronously
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, {}, batch, halted)
        jax.block_until_ready(metrics)
        seconds = (time.perf_counter() - start) / steps
    memory_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                    + memory.temp_size_in_bytes)
    return {"tokens_per_s": B * S / seconds, "memory_bytes": memory_bytes}


def train_throughput(config: Config, streams=(1, 2, 4, 8), steps: int = 5,
                     peer: str | None = None) -> list[dict[str, Any]]:
    """Training tokens/s and model FLOP utilization for every P, the peak measured in the same run;
    with `peer="torch"` the PyTorch implementation's tokens/s too, measured right after ours."""
    peak = matmul_peak_flops()
    S = config.data.seq_len
    rows, base = [], None
    for P in streams:
        cfg = dataclasses.replace(config, model=dataclasses.replace(config.model, parscale_n=P))
        tokens_per_s = train_step_figures(cfg, steps)["tokens_per_s"]
        flops = tokens_per_s * train_flops_per_token(cfg.model, S)
        base = base or tokens_per_s
        row = {"P": P, "tokens_per_s": tokens_per_s, "model_flops_per_s": flops, "peak_flops_per_s": peak,
               "mfu": flops / peak, "throughput_ratio": tokens_per_s / base}
        if peer == "torch":
            peer_tokens_per_s = torch_peer.train_tokens_per_s(cfg, steps)
            row.update(peer_tokens_per_s=peer_tokens_per_s, peer_mfu=peer_tokens_per_s * flops / tokens_per_s / peak,
                       vs_peer=tokens_per_s / peer_tokens_per_s)
        rows.append(row)
    return rows


BENCHMARKS = ("decode", "equal-loss", "train")


def run_benchmark(name: str, config: Config, streams: tuple[int, ...], batches: tuple[int, ...], prompt_len: int,
                  new_tokens: int, repeats: int, steps: int, peer: str | None) -> list[dict[str, Any]]:
    """The rows of one of BENCHMARKS, its options checked first."""
    if new_tokens < 2:
        raise ConfigError("--new-tokens", f"must be >= 2 (latency is the interval between consecutive tokens), "
                          f"got {new_tokens}")
    if prompt_len + new_tokens > config.model.max_position_embeddings:
        raise ConfigError("--prompt-len", f"{prompt_len} + {new_tokens} new tokens exceed "
                          f"model.max_position_embeddings={config.model.max_position_embeddings}")
    decode = dict(prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats)
    if name == "decode":
        return decode_cost(config.model, streams, batches, **decode, peer=peer)
    if name == "equal-loss":
        return equal_loss(config.model, tuple(p for p in streams if p > 1), batches, **decode)
    return train_throughput(config, streams, steps, peer)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {"device": str(jax.devices()[0].device_kind), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()}


# ---------------------------------------------------------------------------------------------
# Reports


def write_report(name: str, rows: list[dict[str, Any]], out_dir: str | Path, meta: dict[str, Any]) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, **meta, "rows": rows}, indent=2) + "\n")
    return path


def format_table(name: str, rows: list[dict[str, Any]]) -> str:
    if name == "decode":
        header = "   P  batch  ms/token  latency x  decode memory (MiB)  memory x  floor ms  x floor"
        lines = [f"{r['P']:4d}  {r['batch']:5d}  {r['latency_s'] * 1e3:8.2f}  {_shown(r['latency_ratio']):>9}  "
                 f"{r['memory_bytes'] / 2**20:19.2f}  {r['memory_ratio']:8.2f}  {r['floor_s'] * 1e3:8.2f}  "
                 f"{_shown(r['vs_floor']):>7}" for r in rows]
        if "vs_peer" in rows[0]:
            header += "  torch ms/token  torch / ours"
            lines = [f"{line}  {r['peer_latency_s'] * 1e3:14.2f}  {_shown(r['vs_peer']):>12}"
                     for line, r in zip(lines, rows)]
    elif name == "equal-loss":
        header = ("   P  batch  dense params/base  memory +: dense / ParScale  latency +: dense / ParScale  "
                  "memory-increase x  latency-increase x")
        lines = []
        for r in rows:
            mem = [(r[m]["memory_bytes"] - r["base"]["memory_bytes"]) / 2**20 for m in ("dense", "parscale")]
            lat = [(r[m]["latency_s"] - r["base"]["latency_s"]) * 1e3 for m in ("dense", "parscale")]
            lines.append(f"{r['P']:4d}  {r['batch']:5d}  {r['dense_params'] / r['base_params']:17.2f}  "
                         f"{mem[0]:9.2f} / {mem[1]:8.2f} MiB  {lat[0]:10.3f} / {lat[1]:7.3f} ms    "
                         f"{_shown(r['memory_increase_ratio'], 1):>15}  {_shown(r['latency_increase_ratio'], 1):>18}")
    else:
        header = "   P  tokens/s  throughput x    MFU"
        lines = [f"{r['P']:4d}  {r['tokens_per_s']:8.0f}  {r['throughput_ratio']:12.2f}  {r['mfu']:6.1%}" for r in rows]
        if "vs_peer" in rows[0]:
            header += "   torch tokens/s  torch MFU  ours / torch"
            lines = [f"{line}   {r['peer_tokens_per_s']:14.0f}  {r['peer_mfu']:9.1%}  {r['vs_peer']:12.2f}"
                     for line, r in zip(lines, rows)]
    return "\n".join([header, *lines])


def plot(name: str, rows: list[dict[str, Any]], out_dir: str | Path) -> Path:
    plt = plotting.pyplot()

    path = Path(out_dir) / f"{name}.png"
    if name == "decode":
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for batch in sorted({r["batch"] for r in rows}):
            mine = [r for r in rows if r["batch"] == batch]
            Ps = [r["P"] for r in mine]
            axes[0].plot(Ps, [r["latency_s"] * 1e3 for r in mine], "o-", label=f"batch {batch}")
            axes[1].plot(Ps, [r["memory_bytes"] / 2**20 for r in mine], "o-", label=f"batch {batch}")
        axes[0].set(xlabel="P (streams)", ylabel="ms per decoded token", xscale="log", title="decode latency")
        axes[1].set(xlabel="P (streams)", ylabel="MiB (decode step)", xscale="log", title="decode memory")
    elif name == "equal-loss":
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for P in sorted({r["P"] for r in rows}):
            mine = [r for r in rows if r["P"] == P]
            axes[0].plot([r["batch"] for r in mine], [r["memory_increase_ratio"] or np.nan for r in mine], "o-",
                         label=f"P = {P}")
            axes[1].plot([r["batch"] for r in mine], [r["latency_increase_ratio"] or np.nan for r in mine], "o-",
                         label=f"P = {P}")
        axes[0].set(xlabel="batch", ylabel="dense / ParScale", title="memory increase over P = 1")
        axes[1].set(xlabel="batch", ylabel="dense / ParScale", title="latency increase over P = 1")
    else:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        axes[0].plot([r["P"] for r in rows], [r["tokens_per_s"] for r in rows], "o-")
        axes[1].plot([r["P"] for r in rows], [r["mfu"] * 100 for r in rows], "o-")
        axes[0].set(xlabel="P (streams)", ylabel="training tokens/s", xscale="log", title="throughput")
        axes[1].set(xlabel="P (streams)", ylabel="MFU (%)", xscale="log", title="model FLOP utilization")
    for ax in axes:
        if ax.get_xscale() == "log":  # P = 1, 2, 4, 8 evenly spaced, labelled plainly
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({r["P"] for r in rows}), [str(P) for P in sorted({r["P"] for r in rows})])
            ax.minorticks_off()
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        ax.grid(alpha=0.3)
    return plotting.save(fig, path)
