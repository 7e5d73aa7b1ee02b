"""`parscale-jax bench btm`: Branch-Train-Merge (Li et al., 2022) against one dense model trained on
the mixture of the domains with the same total training compute.

Two domains, both offline: the built-in Shakespeare corpus and the Python standard library's own
source files. The protocol, every step an ordinary run in the work folder:

- seed: the base config trained `seed_steps` on the mixture (both domains' training text);
- experts: `branch` of the seed, one per domain, each `expert_steps` on its own domain;
- dense: the seed continued on the mixture for (number of domains) x `expert_steps` steps, so that
  seed + dense costs what seed + experts cost (training FLOPs, counted by `growth.Schedule.flops`,
  which reads `model.counting`);
- average: `merge --average` of the experts, not trained further;
- BTX: `merge --moe` of the experts (their MLPs become the experts of an MoE layer, a new router),
  then the whole model trained `btx_steps` on the mixture (its FLOPs added);
- ensemble: the experts as one model (`eval --ensemble`), weighted by each expert's posterior given
  the sequence so far (and, for reference, uniformly);
- stream-level BTM: a P = `streams` seed trained `seed_steps` on the mixture (its own compute),
  branched with `--streams-only` (each expert trains only its prefixes and aggregator on the frozen
  backbone) for `expert_steps` each, evaluated as a posterior ensemble.

Each method is measured on held-out text no run trained on: Shakespeare's held-out plays (the
corpus's own split), standard-library files that were not copied into the training folder, and a
mixed text made of other pieces of both, alternating. Reported per method: those three losses, the
total training FLOPs, the parameter bytes that serving it holds (an ensemble holds every expert;
stream-level BTM one backbone and one stream set per expert) and the tokens/s of evaluating the
mixed text (the whole ensemble for an ensemble), with the fixed cost of a call (reading the weights,
compiling) taken out: (tokens of the mixed text - tokens of a one-batch probe) / (its time - the
probe's).

The work folder is resumable: finished runs are not trained again, a cut-off one resumes, and each
method's figures are kept in WORK/eval/ once measured.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from parscale_jax.analysis import plotting
from parscale_jax.analysis.bench_moe import train_or_finish
from parscale_jax.checkpoint import complete_steps
from parscale_jax.config import Config, load_config, to_dict
from parscale_jax.data.corpus import corpus_documents, split_documents
from parscale_jax.errors import ConfigError
from parscale_jax.evaluate import evaluate_run, text_rows
from parscale_jax.files import write_atomic
from parscale_jax.growth import Schedule
from parscale_jax.model.lm import param_info
from parscale_jax.runs import Run
from parscale_jax.training.loop import train
from parscale_jax.transforms.branch import branch, train_experts
from parscale_jax.transforms.merge import merge

DOMAINS = ("shakespeare", "stdlib")
TEXTS = ("shakespeare", "stdlib", "mixed")
CHUNK = 4096  # characters of one domain's piece in the mixed text
SETTINGS = "settings.json"


@dataclasses.dataclass(frozen=True)
class BTMOptions:
    seed_steps: int = 100
    expert_steps: int = 150
    btx_steps: int = 30
    streams: int = 2
    stdlib_mb: float = 0.0  # 0: as many bytes as the Shakespeare training text
    shakespeare_mb: float = 0.0  # 0: every Shakespeare training document
    heldout_kb: float = 32.0  # each domain's held-out text; the mixed text takes as much of each
    timing_repeats: int = 3  # tokens/s: the fastest of this many evaluations (not part of the runs' settings)


# ---------------------------------------------------------------------------------------------
# The data


def _cut(text: str, chars: int) -> str:
    """The first `chars` characters of `text`, ended at a line break where there is one."""
    if len(text) <= chars:
        return text
    end = text.rfind("\n", 0, chars)
    return text[:end + 1] if end > 0 else text[:chars]


def _take(docs: list[str], limit: float) -> list[str]:
    """Whole documents from the front until `limit` bytes (all of them for 0)."""
    if not limit:
        return docs
    kept, total = [], 0
    for doc in docs:
        if kept and total >= limit:
            break
        kept.append(doc)
        total += len(doc.encode())
    return kept


def stdlib_files() -> list[tuple[str, str]]:
    """(relative path, text) of the standard library's own `*.py` files in name order: no tests, no
    site-packages, only UTF-8 files with some text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root)
        if any(part == "site-packages" or "test" in part for part in rel.parts[:-1]) or rel.name.startswith("test"):
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            found.append((rel.as_posix(), text))
    return found


def _interleave(a: str, b: str) -> str:
    """Pieces of about CHUNK characters of `a` and `b`, alternating, cut at line breaks."""
    def pieces(text: str) -> list[str]:
        out = []
        while text:
            piece = _cut(text, CHUNK)
            out.append(piece)
            text = text[len(piece):]
        return out

    first, second = pieces(a), pieces(b)
    mixed = [p for pair in zip(first, second) for p in pair]
    longer = first if len(first) > len(second) else second
    return "".join(mixed + longer[min(len(first), len(second)):])


def prepare_data(config: Config, data: Path, o: BTMOptions) -> dict[str, Any]:
    """The domains' training folders and the held-out texts under `data` (made once; a description)."""
    described = data / "data.json"
    if described.is_file():
        return json.loads(described.read_text())
    partial = data.with_name(data.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    heldout_chars = int(o.heldout_kb * 1000)
    # Shakespeare: the corpus's own split (the plays an expert on `shakespeare` holds out too).
    plays = dataclasses.replace(config.data, corpus="shakespeare", paths=(), sources=())
    train_docs, eval_docs = split_documents(corpus_documents(plays), plays.eval_fraction, plays.seed)
    train_docs = _take(train_docs, o.shakespeare_mb * 1e6)
    shakespeare_pool = "\n".join(eval_docs)
    # The standard library: every tenth file (by name) is held out, the others fill the training folder.
    files = stdlib_files()
    held_files = [f for i, f in enumerate(files) if i % 10 == 9]
    train_files = _take_files([f for i, f in enumerate(files) if i % 10 != 9],
                              o.stdlib_mb * 1e6 or sum(len(d.encode()) for d in train_docs))
    stdlib_pool = "".join(f"# {name}\n{text}\n" for name, text in held_files)
    for name, pool in (("shakespeare", shakespeare_pool), ("stdlib", stdlib_pool)):
        if len(pool) < 2 * heldout_chars:
            raise ConfigError("--heldout-kb", f"{name} has {len(pool):,} held-out characters, fewer than the "
                              f"{2 * heldout_chars:,} that {o.heldout_kb:g} KB of held-out and of mixed text need")
    for i, doc in enumerate(train_docs):
        _write(partial / "mixture" / "shakespeare" / f"{i:03d}.txt", doc)
    for name, text in train_files:
        _write(partial / "mixture" / "stdlib" / (name.replace("/", "__") + ".txt"), text)
    texts = {}
    for name, pool in (("shakespeare", shakespeare_pool), ("stdlib", stdlib_pool)):
        texts[name] = _cut(pool, heldout_chars)
        _write(partial / f"heldout_{name}.txt", texts[name])
        texts[f"{name}_rest"] = _cut(pool[len(texts[name]):], heldout_chars)
    mixed = _interleave(texts["shakespeare_rest"], texts["stdlib_rest"])
    _write(partial / "mixed.txt", mixed)
    probe_chars = max(1, (config.train.batch_size - 1) * config.data.seq_len)  # one evaluation batch
    _write(partial / "probe.txt", mixed[:probe_chars])
    description = {
        "python": sys.version.split()[0], "stdlib": sysconfig.get_paths()["stdlib"],
        "shakespeare_train_documents": len(train_docs),
        "shakespeare_train_bytes": sum(len(d.encode()) for d in train_docs),
        "shakespeare_heldout_documents": len(eval_docs),
        "stdlib_train_files": len(train_files), "stdlib_train_bytes": sum(len(t.encode()) for _, t in train_files),
        "stdlib_first_file": train_files[0][0], "stdlib_last_file": train_files[-1][0],
        "stdlib_heldout_files": len(held_files),
        "heldout_bytes": {name: len(texts[name].encode()) for name in DOMAINS},
        "mixed_bytes": len(mixed.encode())}
    write_atomic(partial / "data.json", json.dumps(description, indent=2) + "\n")
    partial.rename(data)
    return description


def _take_files(files: list[tuple[str, str]], limit: float) -> list[tuple[str, str]]:
    kept, total = [], 0
    for name, text in files:
        if kept and total >= limit:
            break
        kept.append((name, text))
        total += len(text.encode())
    return kept


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# The runs


def _steps(steps: int) -> list[str]:
    """A run of `steps` steps: its warm-up a tenth, its held-out loss logged at the end."""
    return [f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 10)}", f"train.eval_every={steps}"]


def _mixture(data: Path) -> list[str]:
    return ["data.corpus=files", f"data.paths={json.dumps([str((data / 'mixture').absolute())])}", "data.sources=[]"]


def _finished(run_dir: Path) -> None:
    """A ConfigError unless the run in `run_dir` has done all its steps (a stop signal ended it)."""
    config = Run.open(run_dir).config
    if max(complete_steps(Run(run_dir, config).checkpoint_dir), default=0) < config.train.steps:
        raise ConfigError("--work", f"{run_dir} stopped before step {config.train.steps}; "
                          "run the same command again to resume")


def _made_once(out: Path, make: Callable[[Path], Any]) -> None:
    """`make(folder)` into a hidden folder renamed to `out`, unless `out` is there already."""
    if (out / "config.yaml").is_file():
        return
    partial = out.with_name(f".{out.name}.partial")
    if partial.exists():
        shutil.rmtree(partial)
    make(partial)
    partial.rename(out)


def train_runs(config: Config, work: Path, o: BTMOptions, progress: bool) -> dict[str, Any]:
    """Every run of the protocol, trained (or finished, or found finished); their folders."""
    data = work / "data"
    domains = [f"{name}={(data / 'mixture' / name).absolute()}" for name in DOMAINS]
    base = to_dict(config)
    train_fn = lambda cfg, run_dir: train(cfg, run_dir, progress=progress)  # noqa: E731
    runs: dict[str, Any] = {}
    for streams in (None, o.streams):
        seed_dir = work / (f"seed-p{streams}" if streams else "seed")
        extra = [f"model.parscale_n={streams}"] if streams else []
        seed = load_config(base=base, overrides=[*_mixture(data), *_steps(o.seed_steps), *extra])
        train_or_finish(seed, seed_dir, progress)
        _finished(seed_dir)
        experts_dir = work / ("stream-experts" if streams else "experts")
        branch(seed_dir, experts_dir, domains, _steps(o.expert_steps), streams_only=bool(streams))
        if len(train_experts(experts_dir, train_fn)) < len(DOMAINS):
            raise ConfigError("--work", f"an expert in {experts_dir} stopped early; run the same command again")
        key = "stream" if streams else "token"
        runs[f"{key}_seed"] = seed_dir
        runs[f"{key}_experts"] = [experts_dir / name for name in DOMAINS]
    seed_dir = runs["token_seed"]
    dense = work / "dense"
    branch(seed_dir, dense, [f"mixture={(data / 'mixture').absolute()}"], _steps(len(DOMAINS) * o.expert_steps))
    if not train_experts(dense, train_fn):
        raise ConfigError("--work", f"{dense / 'mixture'} stopped early; run the same command again")
    runs["dense"] = dense / "mixture"
    experts = [str(p) for p in runs["token_experts"]]
    _made_once(work / "average", lambda out: merge(experts, out, "average", overrides=_mixture(data)))
    runs["average"] = work / "average"
    _made_once(work / "btx", lambda out: merge(experts, out, "moe", overrides=[*_mixture(data),
                                                                                  *_steps(o.btx_steps)]))
    train_or_finish(Run.open(work / "btx").config, work / "btx", progress)
    _finished(work / "btx")
    runs["btx"] = work / "btx"
    return runs


def train_flops(run_dir: Path) -> float:
    """The training FLOPs of a run's steps (`growth.Schedule.flops`: `model.counting` per token)."""
    config = Run.open(run_dir).config
    return float(Schedule(config).flops(config.train.steps))


def param_bytes(run_dir: Path, streams_only: bool = False) -> int:
    """Bytes of a run's parameters, or of its stream set alone (prefixes and aggregator)."""
    model = Run.open(run_dir).config.model
    infos = jax.tree.leaves(param_info(model), is_leaf=lambda x: hasattr(x, "parscale"))
    count = sum(info.size for info in infos if info.parscale or not streams_only)
    return count * np.dtype(model.param_dtype).itemsize


# ---------------------------------------------------------------------------------------------
# The measurements


def _timed(measure: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], float]:
    start = time.perf_counter()
    result = measure()
    return result, time.perf_counter() - start


def evaluate_method(paths: list[Path], weighting: str | None, texts: dict[str, Path], probe: Path,
                    repeats: int = 3) -> dict[str, Any]:
    """Losses on every text of one model (`weighting` None) or ensemble, and the tokens/s of the mixed
    text's evaluation less the fixed cost of a call (a one-batch probe's), each time the fastest of
    `repeats` calls (the machine may be shared)."""
    def evaluate(text: Path) -> dict[str, Any]:
        if weighting is None:
            run = Run.open(paths[0])
            return evaluate_run(run, rows=text_rows(run, str(text)))
        from parscale_jax.inference.ensemble import evaluate_ensemble

        return evaluate_ensemble([str(p) for p in paths], weighting=weighting, text=str(text))

    losses, experts, seconds, held = {}, {}, {}, None
    for name, text in texts.items():
        result, seconds[name] = _timed(lambda: evaluate(text))
        losses[name] = result["loss"]
        held = result.get("held_bytes", held)  # what the ensemble says it holds, where it says so
        for expert in result.get("experts", []):
            experts.setdefault(Path(expert["run_dir"]).name, {})[name] = expert["loss"]
        if name == "mixed":
            mixed_tokens = result["target_tokens"]
    mixed_seconds = min([seconds["mixed"], *(_timed(lambda: evaluate(texts["mixed"]))[1] for _ in range(repeats - 1))])
    probes = [_timed(lambda: evaluate(probe)) for _ in range(max(1, repeats))]
    probe_tokens, probe_seconds = probes[0][0]["target_tokens"], min(s for _, s in probes)
    extra_tokens, extra_seconds = mixed_tokens - probe_tokens, mixed_seconds - probe_seconds
    figures = {"loss": losses, "eval_seconds": seconds, "mixed_tokens": mixed_tokens, "mixed_seconds": mixed_seconds,
               "probe_tokens": probe_tokens, "probe_seconds": probe_seconds, "timing_repeats": repeats,
               "tokens_per_s": extra_tokens / extra_seconds if extra_seconds > 0 and extra_tokens > 0 else None}
    if experts:
        figures["experts"] = experts
    if held is not None:
        figures["ensemble_held_bytes"] = held
    return figures


def methods(runs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each method: what it evaluates, how it is weighted, which runs' training it took, what it holds."""
    token, stream = runs["token_experts"], runs["stream_experts"]
    seed, stream_seed = runs["token_seed"], runs["stream_seed"]
    experts_flops = [seed, *token]
    ensemble_bytes = sum(param_bytes(p) for p in token)
    stream_bytes = param_bytes(stream[0]) + sum(param_bytes(p, streams_only=True) for p in stream[1:])
    return {
        "dense": {"paths": [runs["dense"]], "weighting": None, "trained": [seed, runs["dense"]],
                  "bytes": param_bytes(runs["dense"])},
        "ensemble": {"paths": token, "weighting": "posterior", "trained": experts_flops, "bytes": ensemble_bytes},
        "ensemble-uniform": {"paths": token, "weighting": "uniform", "trained": experts_flops,
                             "bytes": ensemble_bytes},
        "average": {"paths": [runs["average"]], "weighting": None, "trained": experts_flops,
                    "bytes": param_bytes(runs["average"])},
        "btx": {"paths": [runs["btx"]], "weighting": None, "trained": [*experts_flops, runs["btx"]],
                "bytes": param_bytes(runs["btx"])},
        "stream-btm": {"paths": stream, "weighting": "posterior", "trained": [stream_seed, *stream],
                       "bytes": stream_bytes},
        "stream-btm-uniform": {"paths": stream, "weighting": "uniform", "trained": [stream_seed, *stream],
                               "bytes": stream_bytes},
        "seed": {"paths": [seed], "weighting": None, "trained": [seed], "bytes": param_bytes(seed)},
    }


def _name(work: Path, path: Path) -> str:
    return path.relative_to(work).as_posix()


def commands(config_name: str, work: Path, o: BTMOptions) -> list[str]:
    """The same protocol as separate commands (the base config's overrides left out)."""
    W, D = work, work / "data"
    domains = " ".join(f"--domain {n}={D}/mixture/{n}" for n in DOMAINS)
    mixture = f"data.corpus=files data.paths=[{D}/mixture] data.sources=[]"
    steps = lambda n: " ".join(_steps(n))  # noqa: E731
    experts = f"{W}/experts/shakespeare {W}/experts/stdlib"
    return [
        f"parscale-jax train --config {config_name} --run-dir {W}/seed {mixture} {steps(o.seed_steps)}",
        f"parscale-jax branch --from {W}/seed --out {W}/experts {domains} --train {steps(o.expert_steps)}",
        f"parscale-jax branch --from {W}/seed --out {W}/dense --domain mixture={D}/mixture --train "
        f"{steps(len(DOMAINS) * o.expert_steps)}",
        f"parscale-jax merge --average --out {W}/average {experts} {mixture}",
        f"parscale-jax merge --moe --out {W}/btx {experts} {mixture} {steps(o.btx_steps)}",
        f"parscale-jax train --run-dir {W}/btx",
        f"parscale-jax train --config {config_name} --run-dir {W}/seed-p{o.streams} {mixture} "
        f"{steps(o.seed_steps)} model.parscale_n={o.streams}",
        f"parscale-jax branch --from {W}/seed-p{o.streams} --out {W}/stream-experts {domains} --streams-only --train "
        f"{steps(o.expert_steps)}",
        *(f"parscale-jax eval --ensemble {W}/{folder}/shakespeare,{W}/{folder}/stdlib --weighting {w} "
          f"--text {D}/{{heldout_shakespeare,heldout_stdlib,mixed}}.txt"
          for folder in ("experts", "stream-experts") for w in ("posterior", "uniform")),
        *(f"parscale-jax eval --run-dir {W}/{run} --text {D}/{{heldout_shakespeare,heldout_stdlib,mixed}}.txt"
          for run in ("dense/mixture", "average", "btx", "seed")),
    ]


def _check_settings(work: Path, settings: dict[str, Any]) -> None:
    path = work / SETTINGS
    if path.is_file():
        recorded = json.loads(path.read_text())
        if recorded != settings:
            differ = sorted(k for k in settings if recorded.get(k) != settings[k])
            raise ConfigError("--work", f"{work} holds a btm benchmark of other settings ({', '.join(differ)} "
                              "differ); use a new --work")
    else:
        work.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(settings, indent=2) + "\n")


def run(config: Config, work: Path, o: BTMOptions, progress: bool = True, config_name: str = "default"
        ) -> dict[str, Any]:
    for key in ("seed_steps", "expert_steps", "btx_steps", "timing_repeats"):
        if getattr(o, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')}", f"must be at least 1, got {getattr(o, key)}")
    if o.streams < 2:
        raise ConfigError("--streams", f"stream-level BTM needs P > 1, got {o.streams}")
    if config.model.ffn != "swiglu":
        raise ConfigError("model.ffn", f"BTX makes the experts' SwiGLU MLPs an MoE, not model.ffn={config.model.ffn}")
    work = work.absolute()
    runs_settings = {k: v for k, v in dataclasses.asdict(o).items() if k != "timing_repeats"}
    _check_settings(work, {"options": runs_settings, "config": to_dict(config)})
    data = prepare_data(config, work / "data", o)
    runs = train_runs(config, work, o, progress)
    texts = {name: work / "data" / f"heldout_{name}.txt" for name in DOMAINS} | {"mixed": work / "data" / "mixed.txt"}
    results = {}
    for name, method in methods(runs).items():
        saved = work / "eval" / f"{name}.json"
        if saved.is_file():
            figures = json.loads(saved.read_text())
            print(f"{name}: measured already", flush=True)
        else:
            print(f"{name}: evaluating", flush=True)
            figures = evaluate_method(method["paths"], method["weighting"], texts, work / "data" / "probe.txt",
                                      o.timing_repeats)
            figures |= {"runs": [_name(work, p) for p in method["paths"]], "weighting": method["weighting"],
                        "train_flops_parts": {_name(work, p): train_flops(p) for p in method["trained"]},
                        "inference_param_bytes": method["bytes"]}
            figures["train_flops"] = sum(figures["train_flops_parts"].values())
            saved.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(saved, json.dumps(figures, indent=2) + "\n")
        results[name] = figures
    return {"options": dataclasses.asdict(o), "data": data, "work": str(work), "methods": results,
            "commands": commands(config_name, work, o)}


# ---------------------------------------------------------------------------------------------
# Reports


def format_report(result: dict[str, Any]) -> str:
    o = result["options"]
    lines = [f"seed {o['seed_steps']} steps; experts {o['expert_steps']} steps each; dense the seed + "
             f"{len(DOMAINS) * o['expert_steps']} steps; BTX + {o['btx_steps']} steps; stream-level P = {o['streams']}",
             "held-out loss (nats/token)", "method               shakespeare  stdlib   mixed    train FLOPs  "
             "params MiB  eval tok/s"]
    for name, r in result["methods"].items():
        loss, tps = r["loss"], r["tokens_per_s"]
        lines.append(f"{name:20s} {loss['shakespeare']:11.4f}  {loss['stdlib']:7.4f}  {loss['mixed']:7.4f}  "
                     f"{r['train_flops']:11.3e}  {r['inference_param_bytes'] / 2**20:10.2f}  "
                     f"{'-' if tps is None else f'{tps:,.0f}':>10s}")
    for name in ("ensemble", "stream-btm"):
        for expert, loss in result["methods"].get(name, {}).get("experts", {}).items():
            lines.append(f"  {name} expert {expert:12s} alone: " + "  ".join(f"{t} {loss[t]:.4f}" for t in TEXTS))
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    plt = plotting.pyplot()
    names = list(result["methods"])
    fig, ax = plt.subplots(figsize=(10, 4.2))
    width = 0.8 / len(TEXTS)
    x = np.arange(len(names))
    for i, text in enumerate(TEXTS):
        ax.bar(x + (i - 1) * width, [result["methods"][n]["loss"][text] for n in names], width, label=text)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=20, fontsize=8)
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("Branch-Train-Merge against one dense model of the same training compute")
    ax.legend(fontsize=8)
    low = min(r["loss"][t] for r in result["methods"].values() for t in TEXTS)
    ax.set_ylim(bottom=max(0.0, low - 0.3))
    return plotting.save(fig, path)
