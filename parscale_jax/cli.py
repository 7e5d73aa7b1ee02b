"""The `parscale-jax` command: one table of subcommands (`COMMANDS`), each declared with its options
(shared ones are built by the helpers below) and a small function that calls the library and
reports. Errors a user can fix are one line (errors.py says which exit status each gets).

A new command is a function `cmd_<name>(args) -> exit status` and one `Command` entry; the options
it shares with others (`--run-dir`, `--out`, `--step`, `--no-progress`, overrides) are the helpers'.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import gc
import inspect
import json
import logging
import sys
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from parscale_jax.config import Config, config_file, load_config, read_yaml
from parscale_jax.errors import RUN_ERRORS, USER_ERRORS, ConfigError

# ---------------------------------------------------------------------------------------------
# Options, and the ones commands share


@dataclasses.dataclass(frozen=True)
class Option:
    """One argparse argument: its flags and settings."""

    flags: tuple[str, ...]
    settings: dict


@dataclasses.dataclass(frozen=True)
class OneOf:
    """Options of which one (or, unless `required`, none) may be given."""

    options: tuple[Option, ...]
    required: bool = False


def option(*flags: str, **settings) -> Option:
    return Option(flags, settings)


def run_dir(required: bool = True, help: str = "the run directory") -> Option:
    return option("--run-dir", required=required, help=help)


def source(metavar: str = "RUN_OR_HF_DIR", help: str | None = None) -> Option:
    """`--from`: the run (or Hugging Face directory) a transform starts from."""
    return option("--from", dest="source", required=True, metavar=metavar, help=help)


def out(help: str, default: str | None = None, required: bool = False) -> Option:
    return option("--out", default=default, required=required, help=help)


def step() -> Option:
    return option("--step", type=int, help="which checkpoint (default: the latest; 0: the starting weights)")


def config(default: str | None, help: str = "a YAML file or the name of a shipped config") -> Option:
    return option("--config", default=default, help=help + (f" (default: '{default}')" if default else ""))


def overrides(help: str | None = None) -> Option:
    return option("overrides", nargs="*", metavar="section.key=value", help=help)


NO_PROGRESS = option("--no-progress", action="store_true", help="no progress bars")


def float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got '{text}'")
    return values


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got '{text}'")
    return values


def load(args: argparse.Namespace) -> Config:
    """The config of `--config` under the command's overrides."""
    return load_config(args.config, args.overrides)


def plot_or_say(draw: Callable[[], object]) -> None:
    """Draw a figure, or say in one line why not: matplotlib is optional."""
    try:
        print(f"plot: {draw()}")
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install 'parscale-jax[bench]')")


def write_json(path: Path, value: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")
    return path


def finish_bench(name: str, result: dict, started: float, args: argparse.Namespace, report: Callable[[dict], str],
                 plot: Callable[[Path], object] | None = None, **recorded: Any) -> int:
    """Time a benchmark's `result`, write it to OUT/<name>.json with what it was `recorded` from,
    print its report and draw its plot (OUT/<name>.png)."""
    result.update(seconds=round(time.perf_counter() - started, 1), **recorded)
    path = write_json(Path(args.out) / f"{name}.json", result)
    print(f"== {name} ({result['seconds']} s; {path})")
    print(report(result))
    if plot is not None:
        plot_or_say(lambda: plot(Path(args.out) / f"{name}.png"))
    return 0


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_train(args: argparse.Namespace) -> int:
    import jax

    from parscale_jax.runs import Run
    from parscale_jax.training.loop import train

    name = Path(args.config).stem if args.config else "default"
    directory = Path(args.run_dir or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    saved = directory / "config.yaml"  # an existing run resumes under its own config, unless told otherwise
    config = load_config(saved if args.config is None and saved.is_file() else args.config or "default", args.overrides)
    if jax.process_count() > 1 and not args.run_dir:
        raise ConfigError("--run-dir", "a multi-process run needs one --run-dir shared by every process")
    is_main = jax.process_index() == 0
    started = time.perf_counter()
    last = train(config, directory, progress=not args.no_progress, stop_at=args.stop_at, fallback=args.fallback,
                 override_config=args.override_config)
    if not is_main:
        return 0
    print(json.dumps({"run_dir": str(directory.absolute()), "wall_time_s": round(time.perf_counter() - started, 1),
                      **{k: last[k] for k in ("step", "loss", "eval_loss", "tokens_per_s", "stopped_by") if k in last}}))
    if "stopped_by" in last:
        print(f"stopped by {last['stopped_by']} after step {last['step']}, checkpointed; resume with:\n"
              f"  parscale-jax train --run-dir {directory}")
    else:
        print(f"checkpoints: {Run(directory, config).checkpoint_dir}\nmetrics:     {directory / 'metrics.jsonl'}\n"
              f"tensorboard: tensorboard --logdir {directory / 'tensorboard'}")
    return 0


def ensemble_options(what: str) -> tuple[Option | OneOf, ...]:
    """`--run-dir` or `--ensemble`, and how an ensemble's runs are weighted (eval, generate)."""
    return (
        OneOf((run_dir(False), option("--ensemble", metavar="RUN1,RUN2,...",
                                      help=f"{what} with several runs as one model: the mixture of their "
                                           "probabilities (Branch-Train-Merge); they must share a tokenizer")),
              required=True),
        option("--weighting", help="an ensemble's weights: posterior (default: each run's posterior given the "
                                   "document so far), uniform, or fixed:w1,w2,..."),
        option("--prior-text", metavar="FILE", help="estimate the posterior weighting's prior on this text "
                                                    "(default: uniform)"),
        option("--weights-out", metavar="FILE", help="write an ensemble's weights at every position "
                                                     "(.npy: [rows, positions, runs]; else JSON)"))


def ensemble_paths(args: argparse.Namespace) -> list[str] | None:
    """The runs of `--ensemble RUN1,RUN2,...` (None without it), refusing what only a single run takes."""
    if args.ensemble is None:
        for flag in ("weighting", "prior_text", "weights_out"):
            if getattr(args, flag) is not None:
                raise ConfigError("--" + flag.replace("_", "-"), "goes with --ensemble RUN1,RUN2,...")
        return None
    if args.step is not None:
        raise ConfigError("--step", "an --ensemble reads every run at its newest checkpoint")
    return [path.strip() for path in args.ensemble.split(",") if path.strip()]


def cmd_eval(args: argparse.Namespace) -> int:
    from parscale_jax.evaluate import evaluate_run, text_rows
    from parscale_jax.runs import Run

    paths = ensemble_paths(args)
    if args.tasks is not None:
        return eval_tasks(args, paths)
    for flag in ("num_fewshot", "limit", "include_path"):
        if getattr(args, flag) is not None:
            raise ConfigError("--" + flag.replace("_", "-"), "goes with --tasks NAME[,NAME...]")
    if paths is not None:
        from parscale_jax.inference.ensemble import evaluate_ensemble

        result = {**evaluate_ensemble(paths, args.weighting or "posterior", args.text, args.batches, args.prior_text,
                                      args.weights_out, args.overrides), "source": args.text or "held-out split"}
        if args.out:
            write_json(Path(args.out), result)
        print(json.dumps(result))
        return 0
    run = Run.open(args.run_dir, args.overrides)
    rows = text_rows(run, args.text) if args.text else None  # default: the held-out split
    result = {**evaluate_run(run, rows, args.batches, args.step), "source": args.text or "held-out split"}
    write_json(Path(args.out) if args.out else run.directory / f"eval_step{result['step']}.json", result)
    print(json.dumps(result))
    return 0


def eval_tasks(args: argparse.Namespace, ensemble: list[str] | None) -> int:
    """`eval --tasks`: the lm-evaluation-harness's tasks (docs/evaluation.md)."""
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    if not names:
        raise ConfigError("--tasks", "name at least one task, e.g. --tasks shakespeare_mc,facts_qa")
    if ensemble is not None and args.weights_out is not None:
        raise ConfigError("--weights-out", "does not go with --tasks")
    if args.text is not None or args.batches:
        raise ConfigError("--text" if args.text is not None else "--batches", "does not go with --tasks")
    if args.limit is not None and not args.limit > 0:
        raise ConfigError("--limit", f"must be > 0, got {args.limit}")
    if not args.debug:  # the harness's notes on every task it builds; its warnings stay
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    from parscale_jax.inference import harness  # one line if the optional extra is missing
    from parscale_jax.runs import Run

    limit = None if args.limit is None else int(args.limit) if args.limit >= 1 else args.limit
    if ensemble is not None:  # written only to --out
        result = harness.evaluate_ensemble_tasks(ensemble, names, args.num_fewshot, limit, args.include_path or (),
                                                 args.batch_size, args.weighting or "posterior", args.overrides,
                                                 args.prior_text)
        print(harness.table([harness.TaskScore(**score) for score in result["scores"]]))
        if args.out:
            print(f"written to {write_json(Path(args.out), result)}")
        return 0
    run = Run.open(args.run_dir, args.overrides)
    result = harness.evaluate_run_tasks(run, names, args.num_fewshot, limit, args.include_path or (),
                                        args.batch_size, args.step)
    result = {"run_dir": str(run.directory), **result}
    path = write_json(Path(args.out) if args.out else run.directory / f"eval_tasks_step{result['step']}.json", result)
    print(harness.table([harness.TaskScore(**score) for score in result["scores"]]))
    print(f"written to {path}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from parscale_jax.config import SamplingConfig, validate_sampling
    from parscale_jax.inference.generate import generate_text, read_prompts
    from parscale_jax.runs import Run

    paths = ensemble_paths(args)
    texts = read_prompts(args.prompt, args.prompts)
    try:
        sampling = validate_sampling(SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                                    args.seed))
    except ConfigError as err:  # named by its flag
        raise ConfigError("--" + err.key.replace("_", "-"), str(err).removeprefix(f"{err.key}: ")) from None
    show = lambda text: print(text, end="", flush=True)  # noqa: E731
    if paths is not None:
        from parscale_jax.inference.ensemble import generate_ensemble_text

        generate_ensemble_text(paths, texts, sampling, show, args.weighting or "posterior", args.prior_text,
                               args.weights_out, args.overrides)
        return 0
    generate_text(Run.open(args.run_dir, args.overrides), texts, sampling, args.step, show)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from parscale_jax.transforms.import_hf import import_checkpoint

    base = read_yaml(config_file(args.config)) if args.config else None
    print(json.dumps(import_checkpoint(args.hf, args.out, args.overrides, base, args.calibrate, args.calibrate_lr)))
    print(f"train it with: parscale-jax train --run-dir {args.out}")
    return 0


def cmd_upscale(args: argparse.Namespace) -> int:
    if args.insert is not None and not args.identity:
        raise ConfigError("--identity", "--insert K adds identity blocks: say so with --identity")
    from parscale_jax.transforms.upscale import upscale

    summary = upscale(args.source, args.out, args.drop, args.insert, args.overrides)
    identity = f"; identity blocks at {summary['identity_layers']}" if summary["identity_layers"] else ""
    print(f"{summary['run_dir']}: {summary['layers']} layers ({summary['method']}), from layers "
          f"{summary['layer_map']}{identity}. Train it with: parscale-jax train --run-dir {args.out}")
    return 0


def cmd_upcycle(args: argparse.Namespace) -> int:
    from parscale_jax.transforms.upcycle import upcycle

    summary = upcycle(args.source, args.out, args.overrides, args.noise)
    exact = "computes what the dense model did" if summary["function_preserving"] else \
        "starts near the dense model (noise, capacity or weights that do not sum to 1)"
    print(f"{summary['run_dir']}: {summary['num_experts']} experts, top-{summary['experts_per_token']}; it {exact}. "
          f"Train it with: parscale-jax train --run-dir {args.out}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from parscale_jax.transforms.merge import merge

    runs = [item for item in args.items if "=" not in item]  # the rest are section.key=value settings
    summary = merge(runs, args.out, "average" if args.average else "moe", args.weights,
                    [item for item in args.items if "=" in item])
    weights = ", ".join(f"{w:.3g}" for w in summary["weights"])
    print(f"{summary['run_dir']}: {summary['method']} of {summary['runs']} runs (weights {weights}). "
          f"Train it with: parscale-jax train --run-dir {args.out}")
    return 0


def cmd_branch(args: argparse.Namespace) -> int:
    from parscale_jax.transforms import branch

    summary = branch.branch(args.source, args.out, args.domains, args.overrides, args.streams_only)
    for expert in summary["experts"]:
        print(f"{expert['name']}: {expert['run_dir']} ({'made' if expert['made_now'] else 'made already'}), "
              f"reads {expert['data']}")
    if not args.train:
        print(f"train each with: parscale-jax train --run-dir {summary['out']}/<NAME>, or all of them here "
              "with the same command and --train")
        return 0
    from parscale_jax.training.loop import train

    results = branch.train_experts(args.out, lambda config, run_dir: train(config, run_dir,
                                                                            progress=not args.no_progress))
    finished = ", ".join(f"{r['expert']} {r['eval_loss']:.4f}" for r in results)
    print(f"{len(results)} of {len(summary['experts'])} experts trained; eval loss on their own domains: "
          f"{finished or '-'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from parscale_jax.runs import Run, export_hf

    print(json.dumps(export_hf(Run.open(args.run_dir, args.overrides), args.out, args.step, args.dtype,
                               int(args.max_shard_gb * 1024**3), args.overwrite)))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from parscale_jax.analysis import info
    from parscale_jax.runs import Run

    print(info.format_info(info.run_info(Run.open(args.run_dir))))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from parscale_jax.analysis import bench

    config = load(args)
    meta = {**bench.machine(), "config": args.config, "overrides": args.overrides,
            "options": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                        "steps": args.steps}}
    for name in bench.BENCHMARKS if args.which == "all" else [args.which]:
        started = time.perf_counter()
        rows = bench.run_benchmark(name, config, args.streams, args.batches, args.prompt_len, args.new_tokens,
                                   args.repeats, args.steps, args.peer)
        seconds = round(time.perf_counter() - started, 1)
        path = bench.write_report(name, rows, args.out, {**meta, "seconds": seconds})
        print(f"== {name} ({seconds} s; {path})")
        print(bench.format_table(name, rows))
        plot_or_say(lambda: bench.plot(name, rows, args.out))
    return 0


def cmd_bench_data(args: argparse.Namespace) -> int:
    from parscale_jax.analysis import bench_data

    started = time.perf_counter()
    results = bench_data.run(Path(args.work), args.small_mb, args.large_mb)
    return finish_bench("data", results, started, args, bench_data.format_report)


def cmd_bench_growth(args: argparse.Namespace) -> int:
    from parscale_jax.analysis import bench_growth

    started = time.perf_counter()
    result, curves = bench_growth.run(load(args), Path(args.work), progress=not args.no_progress)
    return finish_bench("growth", result, started, args, bench_growth.format_report,
                        lambda path: bench_growth.plot(curves, path), config=args.config, overrides=args.overrides)


def cmd_bench_recycle(args: argparse.Namespace) -> int:
    from parscale_jax.analysis import bench_recycle

    base = read_yaml(config_file(args.config)) if args.config else None
    started = time.perf_counter()
    result = bench_recycle.run(Path(args.hf), Path(args.work), args.overrides, base, args.streams, args.lr,
                               args.peft_lr, progress=not args.no_progress)
    return finish_bench("recycle", result, started, args, bench_recycle.format_report,
                        lambda path: bench_recycle.plot(result, path), source=args.hf, config=args.config,
                        overrides=args.overrides)


def cmd_bench_moe(args: argparse.Namespace) -> int:
    from parscale_jax.analysis import bench_moe

    options = bench_moe.MoEOptions(experts=args.experts, top_k=args.top_k, capacity=args.capacity,
                                   streams=args.moe_streams, seq_lens=args.seq_lens,
                                   tokens_per_step=args.tokens_per_step, upcycle_steps=args.upcycle_steps)
    started = time.perf_counter()
    result = bench_moe.run(load(args), Path(args.work), options, progress=not args.no_progress)
    return finish_bench("moe", result, started, args, bench_moe.format_report,
                        lambda path: bench_moe.plot(result, path), config=args.config, overrides=args.overrides)


def cmd_bench_btm(args: argparse.Namespace) -> int:
    from parscale_jax.analysis import bench_btm

    options = bench_btm.BTMOptions(seed_steps=args.seed_steps, expert_steps=args.expert_steps,
                                   btx_steps=args.btx_steps, streams=args.btm_streams, stdlib_mb=args.stdlib_mb,
                                   shakespeare_mb=args.shakespeare_mb, heldout_kb=args.heldout_kb,
                                   timing_repeats=args.timing_repeats)
    started = time.perf_counter()
    result = bench_btm.run(load(args), Path(args.work), options, progress=not args.no_progress,
                           config_name=args.config)
    return finish_bench("btm", result, started, args, bench_btm.format_report,
                        lambda path: bench_btm.plot(result, path), config=args.config, overrides=args.overrides)


def cmd_bench_tasks(args: argparse.Namespace) -> int:
    from parscale_jax.analysis import bench_tasks

    options = bench_tasks.TasksOptions(tasks=tuple(t for t in args.tasks.split(",") if t), limit=args.limit,
                                       batch_size=args.batch_size, repeats=args.repeats, max_length=args.max_length,
                                       streams=args.tasks_streams)
    started = time.perf_counter()
    result = bench_tasks.run(Path(args.hf), Path(args.work), options, args.overrides)
    return finish_bench("tasks", result, started, args, bench_tasks.format_report,
                        lambda path: bench_tasks.plot(result, path), source=args.hf, overrides=args.overrides)


def cmd_fit_law(args: argparse.Namespace) -> int:
    from parscale_jax.analysis import scaling_law

    fits, report = scaling_law.fit_groups(scaling_law.read_results(args.results, args.group), args.predict)
    print(report)
    plot_or_say(lambda: scaling_law.plot_fits(fits, args.plot or str(Path(args.results).with_suffix(".law.png"))))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    import jax

    from parscale_jax.analysis import scaling_law, sweep

    runs = sweep.grid(load(args), args.sizes, args.parscale, args.tokens)  # every config checked first
    out = Path(args.out)
    rows = sweep.run_sweep(runs, out, progress=not args.no_progress)
    if jax.process_index() != 0:
        return 0
    print(sweep.format_table(rows))
    if len(args.sizes) < 2 or len(args.parscale) < 2:
        print("fit skipped: the law needs at least two widths and two values of P")
        return 0
    fits, report = sweep.fit_results(out)
    print(report)
    plot_or_say(lambda: scaling_law.plot_fits(fits, str(out / "results.law.png")))
    print(f"results: {out / 'results.csv'}\nfit:     {out / 'fit.json'}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from parscale_jax.data.prepare import prepare

    start = time.monotonic()
    manifest = prepare(args.out, args.inputs, args.tokenizer, args.eval_fraction, args.text_key, args.shard_tokens,
                       progress=not args.no_progress)
    print(f"{args.out}: {manifest['documents']:,} documents, {manifest['train_tokens']:,} training and "
          f"{manifest['eval_tokens']:,} held-out tokens in {len(manifest['shards'])} shard(s) "
          f"({time.monotonic() - start:.1f} s); train on it with data.sources={args.out}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    config = load(args)
    if (args.topology is None) == (args.gpus is None):
        raise ConfigError("--topology", "name a TPU topology (--topology v5p-256) or a GPU count (--gpus 8)")

    from parscale_jax.analysis import plan

    target = plan.tpu_target(args.topology, args.slices) if args.topology else plan.gpu_target(args.gpus,
                                                                                                 args.gpu_memory)
    report = plan.plan(config, target)
    print(plan.format_report(report))
    if args.out:
        write_json(Path(args.out), report)
    return 0 if report["fits"] else 1


# ---------------------------------------------------------------------------------------------
# The table


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    run: Callable[[argparse.Namespace], int] | None  # None: it has subcommands
    help: str
    options: tuple[Option | OneOf, ...] = ()
    description: str | None = None
    joins_cluster: bool = False  # every process of a multi-host run runs it (jax.distributed)
    subcommands: tuple[Command, ...] = ()


BENCH_OPTIONS = (
    config("bench_cpu", "the model (and, for train, the batch) to measure"),
    out("where the JSON and PNG files go", default="bench/results"),
    option("--streams", type=int_list, default=(1, 2, 4, 8), help="values of P, e.g. 1,2,4,8"),
    option("--batches", type=int_list, default=(1, 2, 4, 8), help="decode batch sizes"),
    option("--prompt-len", type=int, default=64),
    option("--new-tokens", type=int, default=32),
    option("--repeats", type=int, default=3, help="timings are the median of this many runs"),
    option("--steps", type=int, default=5, help="timed training steps"),
    option("--peer", choices=("torch",), help="also measure the PyTorch implementation side by side "
           "(parscale_jax/interop/hf_remote/ with torch AdamW; torch comes with the test extra)"),
    overrides(),
)

COMMANDS = (
    Command("train", cmd_train, "train or resume a run", joins_cluster=True, options=(
        config(None, "a YAML file or the name of a shipped config (default: 'default', or an existing run's own)"),
        run_dir(False, "where checkpoints and logs go; an existing run resumes"),
        NO_PROGRESS,
        option("--stop-at", type=int, metavar="STEP", help="checkpoint and exit at this step; the same command resumes"),
        option("--fallback", action="store_true",
               help="if the newest checkpoint is damaged, set it aside and resume from the one before"),
        option("--override-config", action="store_true",
               help="continue an existing run under settings that differ from the ones it started with"),
        overrides())),
    Command("eval", cmd_eval, "mean next-token loss of a run's latest checkpoint, or its scores on "
            "downstream tasks (--tasks)", joins_cluster=True, options=(
        *ensemble_options("evaluate"),
        option("--text", help="a text file to evaluate on instead of the held-out split (an ensemble's: "
                              "the first run's)"),
        option("--batches", type=int, default=0, help="stop after this many batches (0: all)"),
        option("--tasks", metavar="NAME[,NAME...]",
               help="downstream tasks of the lm-evaluation-harness instead of the loss (the extra "
                    "parscale-jax[eval]): its task names, shakespeare_mc, shakespeare_cloze, facts_qa, facts_gen "
                    "(shipped here), or those of --include-path (docs/evaluation.md)"),
        option("--num-fewshot", type=int, help="with --tasks: examples in each prompt (default: each task's)"),
        option("--limit", type=float, help="with --tasks: at most this many examples per task (< 1: a fraction)"),
        option("--include-path", action="append", metavar="DIR",
               help="with --tasks: a folder of task YAML files of your own (repeatable)"),
        option("--batch-size", type=int, default=16, help="with --tasks: rows per model call (default: 16)"),
        step(),
        out("where to write the JSON result (default: RUN_DIR/eval_stepN.json, with --tasks "
            "RUN_DIR/eval_tasks_stepN.json; an ensemble's: none)"),
        overrides())),
    Command("generate", cmd_generate, "continue prompts with a run's model (KV cache, sampling)",
            joins_cluster=True, options=(
                *ensemble_options("generate"),
                OneOf((option("--prompt", help="one prompt; its continuation is printed as it is generated"),
                       option("--prompts", metavar="FILE",
                              help="a file of prompts, one per line, generated as a batch"))),
                option("--max-new-tokens", type=int, default=128),
                option("--temperature", type=float, default=0.0, help="0: greedy (default)"),
                option("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)"),
                option("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)"),
                option("--seed", type=int, default=0),
                step(),
                overrides("e.g. model.parscale_n=4 to pick that stream set of a dynamic-P run"))),
    Command("info", cmd_info, "what a run holds: steps done, checkpoints, growth, lineage, settings", options=(
        run_dir(),)),
    Command("import", cmd_import, "turn a Hugging Face Qwen2/Llama/ParScale checkpoint or GGUF file into a run",
            description="Raise P with model.parscale_n=P (new streams start from the model's own keys and "
                        "values of contexts from the data, or fresh where that keeps its function better); "
                        "train only them with "
                        "train.trainable=parscale. The run can be evaluated, sampled and exported at once (step 0); "
                        "parscale-jax train --run-dir OUT trains it.", options=(
                option("--hf", "--gguf", dest="hf", required=True, metavar="DIR_OR_GGUF",
                       help="a local Hugging Face checkpoint directory (safetensors) or a GGUF file (Llama, Qwen2)"),
                out("the run directory to create", required=True),
                option("--calibrate", type=int, default=0, metavar="N",
                       help="train the new streams alone for N steps to give the checkpoint's own next-token "
                            "distribution (KL) before any training (default 0)"),
                option("--calibrate-lr", type=float, help="Adam's step size for --calibrate (default 1e-3)"),
                config(None, "data/train settings to start from (a YAML file or shipped config name)"),
                overrides())),
    Command("upscale", cmd_upscale, "a deeper run from a trained one: SOLAR depth up-scaling or identity blocks",
            description="--drop M stacks layers 0..n-M-1 and M..n-1 (SOLAR); --insert K --identity adds K copies "
                        "of existing blocks, evenly interleaved, with zero output projections (the function is "
                        "unchanged). Prefixes follow the layers; the new run starts with a fresh optimizer.", options=(
                source(),
                out("the run directory to create", required=True),
                OneOf((option("--drop", type=int, metavar="M", help="SOLAR: drop M layers from each copy"),
                       option("--insert", type=int, metavar="K", help="insert K identity blocks (with --identity)")),
                      required=True),
                option("--identity", action="store_true", help="the inserted blocks start as the identity"),
                overrides("data/train settings of the new run (the model's shape is fixed)"))),
    Command("upcycle", cmd_upcycle, "a Mixture-of-Experts run from a dense one (sparse upcycling)",
            description="Every expert starts as a copy of the dense MLP, the router is new, everything else is "
                        "copied. With model.moe_renormalize=true, model.moe_capacity_factor=0 and no --noise the "
                        "new model computes exactly what the dense one did.", options=(
                source(),
                out("the run directory to create", required=True),
                option("--noise", type=float, default=0.0, metavar="R",
                       help="add Gaussian noise of R times each weight's RMS to every expert's copy (default 0)"),
                overrides("e.g. model.num_experts=8 model.experts_per_token=2, and data/train settings"))),
    Command("merge", cmd_merge, "one run from several: their weighted average, or their MLPs as the experts "
            "of a Mixture-of-Experts (Branch-Train-MiX)",
            description="The runs (or Hugging Face directories) must have the same shape; an average of runs "
                        "that share no ancestor gets a warning. --moe averages every other weight and adds a new "
                        "router. The new run names every source in its lineage.", options=(
                OneOf((option("--average", action="store_true", help="a weighted average of every parameter"),
                       option("--moe", action="store_true", help="run j's MLP becomes expert j (BTX)")),
                      required=True),
                option("--weights", type=float_list, help="one positive weight per run (default: equal)"),
                out("the run directory to create", required=True),
                option("items", nargs="+", metavar="RUN_OR_SETTING",
                       help="the runs to merge, then any section.key=value settings of the new run"))),
    # Not joins_cluster: --train trains the experts on this process's devices; on a cluster, train
    # each with `train --run-dir OUT/NAME`.
    Command("branch", cmd_branch, "one expert run per data domain, each starting as a seed run "
            "(Branch-Train-Merge)",
            description="Each expert OUT/NAME starts bit-identical to the seed and reads only its domain: a "
                        "prepared dataset, a text folder or file, or 'shakespeare'. Running the same command "
                        "again finishes what a killed one left; --train skips finished experts and resumes a "
                        "cut-off one.", options=(
                source("SEED_RUN", "the seed: a run (at its newest checkpoint) or a Hugging Face directory"),
                out("the branch folder to create: one run per domain", required=True),
                option("--domain", dest="domains", action="append", required=True, metavar="NAME=PATH",
                       help="a domain and its data; repeat for each expert"),
                option("--streams-only", action="store_true", help="train only the streams' prefixes and "
                       "aggregator on the frozen backbone (train.trainable=parscale; needs model.parscale_n > 1)"),
                option("--train", action="store_true", help="then train the experts here, one after another"),
                NO_PROGRESS,
                overrides("data/train settings of every expert (the model's shape is fixed)"))),
    Command("export", cmd_export, "write a run's model as a Hugging Face checkpoint", options=(
        run_dir(),
        out("the checkpoint directory to write", required=True),
        step(),
        option("--dtype", help="float32 or bfloat16 (default: model.param_dtype)"),
        option("--max-shard-gb", type=float, default=5.0, help="split the weights above this size"),
        option("--overwrite", action="store_true", help="replace a non-empty --out"),
        overrides("e.g. model.parscale_n=4 to pick that stream set of a dynamic-P run"))),
    Command("bench", None, "measure what P streams cost: decode, equal-loss comparison, training throughput",
            description="Each benchmark runs all its variants in one process and prints ratios next to absolute "
                        "figures; it writes OUT/<name>.json and OUT/<name>.png.", subcommands=(
                Command("decode", cmd_bench, "per-token decode latency and memory for every P x batch",
                        options=BENCH_OPTIONS),
                Command("equal-loss", cmd_bench, "P streams against the dense model of equal predicted loss",
                        options=BENCH_OPTIONS),
                Command("train", cmd_bench, "training tokens/s and model FLOP utilization for every P",
                        options=BENCH_OPTIONS),
                Command("all", cmd_bench, "the three, one after the other", options=BENCH_OPTIONS),
                Command("data", cmd_bench_data, "prepare throughput, start-up and memory against corpus size, "
                        "input pipeline against the training step", options=(
                            option("--work", default="bench/data-work", help="where the corpora and datasets go"),
                            option("--small-mb", type=float, default=10, help="the small corpus, in MB of text"),
                            option("--large-mb", type=float, default=2000, help="the large corpus, in MB of text"),
                            out("where data.json goes", default="bench/results"))),
                Command("growth", cmd_bench_growth, "a run that grows (train.growth) against the final model "
                        "trained from scratch: loss against training FLOPs", options=(
                            config("growth", "a config with a train.growth schedule"),
                            option("--work", default="bench/growth-work",
                                   help="where the two runs go (resumed if there)"),
                            out("where growth.json and growth.png go", default="bench/results"),
                            NO_PROGRESS,
                            overrides())),
                Command("recycle", cmd_bench_recycle, "a pretrained model with P streams (all parameters "
                        "trained, or PEFT) against the model alone trained on the same tokens: held-out loss "
                        "against tokens, each at its best learning rate", options=(
                            option("--hf", "--gguf", dest="hf", required=True, metavar="DIR_OR_GGUF",
                                   help="the pretrained checkpoint (as for import)"),
                            option("--streams", type=int_list, default=(2, 4), help="values of P above 1"),
                            option("--lr", type=float_list, default=(3e-5, 1e-4),
                                   help="learning rates of the full runs (P = 1 and P streams)"),
                            option("--peft-lr", type=float_list, default=(1e-3, 3e-3),
                                   help="learning rates of the PEFT runs"),
                            config(None, "data/train settings (a YAML file or shipped config name)"),
                            option("--work", default="bench/recycle-work",
                                   help="where the runs go (resumed if there)"),
                            out("where recycle.json and recycle.png go", default="bench/results"),
                            NO_PROGRESS,
                            overrides("data/train settings, e.g. train.steps=200 train.eval_every=25"))),
                Command("moe", cmd_bench_moe, "Mixture-of-Experts against the dense model of equal active "
                        "parameters: training speed and memory, held-out loss on equal tokens (with P streams "
                        "too), and upcycling against continued dense training", options=(
                            config("default", "the dense model and its training"),
                            option("--experts", type=int_list, default=(4, 8), help="numbers of experts"),
                            option("--top-k", type=int, default=2, help="experts per token (each F/k wide)"),
                            option("--capacity", type=float, default=1.25, help="model.moe_capacity_factor"),
                            option("--streams", dest="moe_streams", type=int, default=2,
                                   help="P of the MoE run with streams"),
                            option("--seq-lens", type=int_list, default=(1024, 4096),
                                   help="sequence lengths of the speed and memory comparison"),
                            option("--tokens-per-step", type=int, default=4096,
                                   help="tokens per step of the speed comparison"),
                            option("--upcycle-steps", type=int, default=150,
                                   help="steps of continued and upcycled training"),
                            option("--work", default="bench/moe-work", help="where the runs go (resumed if there)"),
                            out("where moe.json and moe.png go", default="bench/results"),
                            NO_PROGRESS,
                            overrides("e.g. train.steps=300"))),
                Command("btm", cmd_bench_btm, "Branch-Train-Merge (ensemble, average, BTX, stream-level) "
                        "against one dense model trained on the mixture with the same training compute: held-out "
                        "loss per domain (Shakespeare, the Python standard library) and on a mixed text, training "
                        "FLOPs, inference memory and tokens/s", options=(
                            config("default", "the seed's model and training (the steps are the options')"),
                            option("--seed-steps", type=int, default=100, help="steps of each seed on the mixture"),
                            option("--expert-steps", type=int, default=150,
                                   help="steps of each expert on its domain (the dense run: this x the domains)"),
                            option("--btx-steps", type=int, default=30, help="steps of the BTX model on the mixture"),
                            option("--streams", dest="btm_streams", type=int, default=2,
                                   help="P of the stream-level BTM seed"),
                            option("--stdlib-mb", type=float, default=0.0,
                                   help="MB of standard-library source to train on (0: as much as Shakespeare)"),
                            option("--shakespeare-mb", type=float, default=0.0,
                                   help="MB of Shakespeare's training plays to use (0: all)"),
                            option("--heldout-kb", type=float, default=32.0,
                                   help="KB of each domain's held-out text (the mixed text takes as much of each)"),
                            option("--timing-repeats", type=int, default=3,
                                   help="tokens/s: the fastest of this many evaluations of the mixed text"),
                            option("--work", default="bench/btm-work", help="where the runs go (resumed if there)"),
                            out("where btm.json and btm.png go", default="bench/results"),
                            NO_PROGRESS,
                            overrides("e.g. train.batch_size=8"))),
                Command("tasks", cmd_bench_tasks, "our lm-evaluation-harness adapter against the harness's "
                        "transformers model on the same checkpoint and tasks: requests/s side by side, and the "
                        "scores of the model (P = 1, ours and transformers) and of it recycled with P streams",
                        options=(
                            option("--hf", "--gguf", dest="hf", required=True, metavar="DIR_OR_GGUF",
                                   help="the pretrained checkpoint (as for import)"),
                            option("--tasks", default="facts_qa,shakespeare_mc,facts_gen",
                                   help="comma-separated task names (default: the local tasks)"),
                            option("--limit", type=float, help="at most N examples per task (below 1: a fraction)"),
                            option("--batch-size", type=int, default=16, help="rows per model call, both models"),
                            option("--repeats", type=int, default=3,
                                   help="timed passes per model after a warm-up; the fastest counts"),
                            option("--max-length", type=int,
                                   help="both models' maximum length (default: the model's positions)"),
                            option("--streams", dest="tasks_streams", type=int, default=2, metavar="P",
                                   help="P of the recycled run"),
                            option("--work", default="bench/tasks-work",
                                   help="where the imported runs go (reused if there)"),
                            out("where tasks.json and tasks.png go", default="bench/results"),
                            overrides("data settings of the imported runs (their new streams' contexts)"))))),
    Command("fit-law", cmd_fit_law, "fit the parallel scaling law L = (A / (N (k ln P + 1)))^alpha + E to measured "
            "losses", description="RESULTS is a CSV with columns non_embedding_params (or N), P and final_loss (or "
            "eval_loss, loss). The fit is the paper's: Huber loss on log losses, L-BFGS-B from a grid of starts.",
            options=(
                option("results", metavar="RESULTS.csv"),
                option("--group", help="fit each value of this column separately (e.g. corpus)"),
                option("--predict", nargs=2, type=float, metavar=("N", "P"), help="predict the loss of one model"),
                option("--plot", help="where to write the PNG plot (default: RESULTS.law.png)"))),
    Command("sweep", cmd_sweep, "train a grid of widths x P on equal tokens, then fit the scaling law to it",
            joins_cluster=True,
            description="Each run goes to OUT/d<width>_p<P>; finished runs are not trained again and a cut-off one "
                        "resumes. Widths keep the base config's depth, head size and MLP ratio. Writes "
                        "OUT/results.csv, OUT/fit.json and OUT/results.law.png.", options=(
                config("sweep", "the base config"),
                option("--sizes", type=int_list, default=(32, 64, 128), help="model widths (hidden sizes)"),
                option("--parscale", type=int_list, default=(1, 2, 4), help="values of P"),
                option("--tokens", type=int, help="training tokens of every run (default: the base config's "
                       "steps x batch_size x seq_len)"),
                out("the sweep's directory", default="runs/sweep"),
                NO_PROGRESS,
                overrides("applied to the base config"))),
    Command("prepare", cmd_prepare, "tokenize corpora once into sharded token files for data.sources",
            description="Reads .txt (a file is a document), .jsonl, .jsonl.gz, .jsonl.zst and .parquet files, "
                        "or folders of them, from local paths or anything etils.epath opens; writes ArrayRecord "
                        "shards and a manifest. A killed run continues where it stopped when run again.", options=(
                out("the dataset folder to write", required=True),
                option("--tokenizer", default="byte", help="'byte' or a tokenizer.json (default: byte)"),
                option("--eval-fraction", type=float, default=0.01,
                       help="share of documents held out for evaluation (default: 0.01)"),
                option("--text-key", default="text", help="the JSON field or Parquet column of the text"),
                option("--shard-tokens", type=int, default=1 << 26, help="tokens per shard (default: 2^26)"),
                NO_PROGRESS,
                option("inputs", nargs="+", metavar="INPUT"))),
    Command("plan", cmd_plan, "compile the train step for a TPU topology or GPU count and report per-device memory",
            description="Exit status: 0 if the step fits the target's memory, 1 if not, 2 on bad input.", options=(
                config("default"),
                option("--topology", help="a TPU slice: v5p-256, v5e-64, v6e-256, v4-32 or e.g. v5p:4x4x8"),
                option("--slices", type=int, default=1, help="TPU slices joined over DCN (set mesh.dcn_data too)"),
                option("--gpus", type=int, help="a GPU count instead (simulated on CPU: memory is estimated)"),
                option("--gpu-memory", type=float, default=80.0, metavar="GIB", help="memory per GPU (default 80)"),
                out("also write the report as JSON here"),
                overrides())),
)


def _add(parser: argparse.ArgumentParser, options: tuple[Option | OneOf, ...]) -> None:
    for entry in options:
        if isinstance(entry, OneOf):
            group = parser.add_mutually_exclusive_group(required=entry.required)
            for one in entry.options:
                group.add_argument(*one.flags, **one.settings)
        else:
            parser.add_argument(*entry.flags, **entry.settings)


def _add_commands(subparsers, commands: tuple[Command, ...]) -> None:
    for command in commands:
        parser = subparsers.add_parser(command.name, help=command.help, description=command.description)
        _add(parser, command.options)
        parser.set_defaults(command=command)
        if command.subcommands:
            _add_commands(parser.add_subparsers(dest="which", required=True), command.subcommands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parscale-jax", description="ParScale language models in JAX.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    multi_host = parser.add_argument_group(
        "multi-host", "automatic on TPU pods, SLURM and Open MPI; elsewhere name the coordinator "
        "(or set PARSCALE_COORDINATOR, PARSCALE_NUM_PROCESSES, PARSCALE_PROCESS_ID)")
    multi_host.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
    multi_host.add_argument("--num-processes", type=int, metavar="N")
    multi_host.add_argument("--process-id", type=int, metavar="I")
    _add_commands(parser.add_subparsers(dest="name", required=True), COMMANDS)
    return parser


# ---------------------------------------------------------------------------------------------
# Errors from the libraries' own threads


LIBRARY_PATHS = ("/orbax/", "/tensorstore/")  # whose background work may fail after we report it in one line


def _from_library(code_or_traceback) -> bool:
    """Whether a traceback passes through, or a code object belongs to, Orbax or TensorStore."""
    if isinstance(code_or_traceback, types.CodeType):
        return any(part in code_or_traceback.co_filename for part in LIBRARY_PATHS)
    tb = code_or_traceback
    while tb is not None:
        if _from_library(tb.tb_frame.f_code):
            return True
        tb = tb.tb_next
    return False


def _late_native_callback(unraisable) -> bool:
    """A TensorStore thread handing a finished write to the event loop of a save that already
    failed: native code calls `call_soon_threadsafe` directly, so no Orbax frame is on the stack."""
    tb = unraisable.exc_traceback
    return (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"
            and tb is not None and tb.tb_frame.f_code.co_name == "call_soon_threadsafe")


# The codes of the absl status that TensorStore turns into a Python exception's "CODE: message".
STATUS_CODES = ("CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
                "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
                "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")


def _native_status(err: BaseException | None) -> bool:
    """An error TensorStore's native code set on an asyncio future: never raised in Python (so no
    traceback) and worded as an absl status."""
    return (err is not None and err.__traceback__ is None
            and str(err).split(":", 1)[0] in STATUS_CODES)


class _LibraryRecords(logging.Filter):
    """Drops log records that Orbax or TensorStore write about their own failed work, including
    asyncio's report of a TensorStore write whose failure no one awaited once the save had failed."""

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        return not (any(part in record.pathname for part in LIBRARY_PATHS)
                    or (record.exc_info and _from_library(record.exc_info[2]))
                    or (record.name == "asyncio" and _native_status(err)))


def _quiet_library_errors() -> None:
    """Orbax and TensorStore report a failed background write (a full disk) with tracebacks from their
    threads, and the writes it abandoned as never-awaited coroutines when the interpreter exits; the
    error that reaches us says the same in one line, so theirs show only with --debug. Anything
    else that fails in a thread, or is raised where Python cannot raise it, is reported as usual."""
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_LibraryRecords())
    default_thread_hook, default_unraisable_hook = threading.excepthook, sys.unraisablehook

    def thread_hook(args):
        if not _from_library(args.exc_traceback):
            default_thread_hook(args)

    def unraisable_hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        if not (_from_library(unraisable.exc_traceback) or (code is not None and _from_library(code))
                or _late_native_callback(unraisable)):
            default_unraisable_hook(unraisable)

    threading.excepthook, sys.unraisablehook = thread_hook, unraisable_hook
    # The coroutines a failed save abandons are collected while the interpreter tears its modules
    # down (which ones is up to the import order), where no filter reaches: close them, unstarted,
    # before that. Closing an unstarted coroutine does not warn.
    atexit.register(_close_abandoned_coroutines)


def _close_abandoned_coroutines() -> None:
    for obj in gc.get_objects():
        # The exact type, not isinstance: that reads `__class__`, which some modules' objects warn on.
        if (type(obj) is types.CoroutineType and inspect.getcoroutinestate(obj) == inspect.CORO_CREATED
                and _from_library(obj.cr_code)):
            obj.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command: Command = args.command
    if not args.debug:
        _quiet_library_errors()
    try:
        if command.joins_cluster:
            from parscale_jax import distributed

            setup = distributed.initialize(args.coordinator, args.num_processes, args.process_id)
            if setup != "single process":
                print(setup, flush=True)
        return command.run(args)
    except USER_ERRORS + RUN_ERRORS as err:  # the user's input: 2; the run's own files or numbers: 1
        if args.debug:
            raise
        print(f"parscale-jax {args.name}: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, USER_ERRORS) else 1


if __name__ == "__main__":
    sys.exit(main())
