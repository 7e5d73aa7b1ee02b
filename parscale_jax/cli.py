"""The `parscale-jax` command: parse, call the library, report. Errors a user can fix are one line."""

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
import warnings
from pathlib import Path

from parscale_jax.config import Config, load_config, packaged_config_path, read_yaml
from parscale_jax.errors import ConfigError


def _resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    return packaged_config_path(name_or_path)


def train_config(config_arg: str | None, run_dir: Path, overrides: list[str]) -> Config:
    """--config if given; else the config saved in an existing run directory; else the default."""
    if config_arg is None and (run_dir / "config.yaml").is_file():
        from parscale_jax.runs import Run

        return Run.open(run_dir, overrides).config
    return load_config(_resolve_config_path(config_arg or "default"), overrides)


def cmd_train(args: argparse.Namespace) -> int:
    name = Path(args.config).stem if args.config else "default"
    run_dir = Path(args.run_dir or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    config = train_config(args.config, run_dir, args.overrides)  # validated before anything compiles

    import jax

    from parscale_jax.config import resolve_mesh
    from parscale_jax.runs import Run
    from parscale_jax.training.loop import train

    resolve_mesh(config, jax.device_count())  # and the mesh against the devices
    if jax.process_count() > 1 and not args.run_dir:
        raise ConfigError("--run-dir", "a multi-process run needs one --run-dir shared by every process")
    is_main = jax.process_index() == 0
    if is_main:
        print(f"run directory: {run_dir.absolute()}")
    started = time.perf_counter()
    last = train(config, run_dir, progress=not args.no_progress, stop_at=args.stop_at, fallback=args.fallback,
                 override_config=args.override_config)
    summary = {"run_dir": str(run_dir.absolute()), "wall_time_s": round(time.perf_counter() - started, 1),
               **{k: last[k] for k in ("step", "loss", "eval_loss", "tokens_per_s", "stopped_by") if k in last}}
    if is_main:
        print(json.dumps(summary))
        if "stopped_by" in last:
            print(f"stopped by {last['stopped_by']} after step {last['step']}, checkpointed; resume with:\n"
                  f"  parscale-jax train --run-dir {run_dir}")
            return 0
        print(f"checkpoints: {Run(run_dir, config).checkpoint_dir}\nmetrics:     {run_dir / 'metrics.jsonl'}\n"
              f"tensorboard: tensorboard --logdir {run_dir / 'tensorboard'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from parscale_jax.data import pipeline as data
    from parscale_jax.runs import Run
    from parscale_jax.training.loop import evaluate

    run = Run.open(args.run_dir, args.overrides)
    rows = None  # the held-out split
    if args.text:
        rows = data.text_file_rows(args.text, data.load_tokenizer(run.config.data), run.config.data.seq_len)
    result = {**evaluate(run, rows, args.batches, args.step), "source": args.text or "held-out split"}
    out = Path(args.out) if args.out else run.directory / f"eval_step{result['step']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


def sampling_config(args: argparse.Namespace):
    """The sampling flags as a checked SamplingConfig; a bad value is named by its flag."""
    from parscale_jax.config import SamplingConfig, validate_sampling

    try:
        return validate_sampling(SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                                args.seed))
    except ConfigError as err:
        raise ConfigError("--" + err.key.replace("_", "-"), str(err).removeprefix(f"{err.key}: ")) from None


def cmd_generate(args: argparse.Namespace) -> int:
    from parscale_jax.runs import Run

    run = Run.open(args.run_dir, args.overrides).settled(args.step, "generate")
    config = run.config
    if (args.prompt is None) == (args.prompts is None):
        raise ConfigError("--prompt", "give one --prompt TEXT or a --prompts FILE (one prompt per line)")
    if args.prompts is not None:
        if not Path(args.prompts).is_file():
            raise ConfigError("--prompts", f"file not found: {args.prompts}")
        texts = [line for line in Path(args.prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            raise ConfigError("--prompts", f"{args.prompts} holds no prompt")
    else:
        texts = [args.prompt]

    import jax

    from parscale_jax.data import pipeline as data
    from parscale_jax.inference.generate import Generator
    from parscale_jax.layout import Layout
    from parscale_jax.model import model_graphdef

    sampling = sampling_config(args)
    tokenizer = data.load_tokenizer(config.data)
    prompts = [tokenizer.encode(text).tolist() for text in texts]
    longest = max(map(len, prompts))
    if longest >= config.model.max_position_embeddings:
        raise ConfigError("--prompt", f"a prompt of {longest} tokens leaves no room to generate within "
                          f"model.max_position_embeddings={config.model.max_position_embeddings}")
    max_len = min(config.model.max_position_embeddings, longest + sampling.max_new_tokens)
    layout = Layout.create(config)
    stop_ids = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    with jax.set_mesh(layout.mesh):
        params, _ = run.params(layout, args.step)
        generator = Generator(model_graphdef(config.model), config.model, layout, len(prompts), max_len, sampling)
        if len(prompts) == 1:  # stream the text as it comes
            shown = ""
            tokens: list[int] = []
            print(texts[0], end="", flush=True)

            def show(step_tokens):
                nonlocal shown
                if step_tokens[0] >= 0 and step_tokens[0] not in stop_ids:
                    tokens.append(int(step_tokens[0]))
                    text = tokenizer.decode(tokens)
                    print(text[len(shown):], end="", flush=True)
                    shown = text

            generator.run(params, prompts, stop_ids, on_tokens=show)
            print()
        else:
            outputs, _ = generator.run(params, prompts, stop_ids)
            for text, output in zip(texts, outputs):
                print(text + tokenizer.decode([t for t in output if t not in stop_ids]))
                print("-" * 40)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from parscale_jax.transforms.import_hf import import_checkpoint

    base = read_yaml(_resolve_config_path(args.config)) if args.config else None
    summary = import_checkpoint(args.hf, args.out, args.overrides, base)
    print(json.dumps(summary))
    print(f"train it with: parscale-jax train --run-dir {args.out}")
    return 0


def cmd_upscale(args: argparse.Namespace) -> int:
    if args.insert is not None and not args.identity:
        raise ConfigError("--identity", "--insert K adds identity blocks: say so with --identity")
    from parscale_jax.transforms.upscale import upscale

    summary = upscale(args.source, args.out, args.drop, args.insert, args.overrides)
    print(f"{summary['run_dir']}: {summary['layers']} layers ({summary['method']}), from layers "
          f"{summary['layer_map']}" + (f"; identity blocks at {summary['identity_layers']}"
                                       if summary["identity_layers"] else "") +
          f". Train it with: parscale-jax train --run-dir {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from parscale_jax.transforms.import_hf import export_run
    from parscale_jax.runs import Run

    summary = export_run(Run.open(args.run_dir, args.overrides), args.out, args.step, args.dtype,
                         int(args.max_shard_gb * 1024**3), args.overwrite)
    print(json.dumps(summary))
    return 0


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got '{text}'")
    return values


def cmd_bench(args: argparse.Namespace) -> int:
    config = load_config(_resolve_config_path(args.config), args.overrides)
    if args.new_tokens < 2:
        raise ConfigError("--new-tokens", f"must be >= 2 (latency is the interval between consecutive tokens), "
                          f"got {args.new_tokens}")
    if args.prompt_len + args.new_tokens > config.model.max_position_embeddings:
        raise ConfigError("--prompt-len", f"{args.prompt_len} + {args.new_tokens} new tokens exceed "
                          f"model.max_position_embeddings={config.model.max_position_embeddings}")

    import os
    import platform

    import jax

    from parscale_jax.analysis import bench

    names = ["decode", "equal-loss", "train"] if args.which == "all" else [args.which]
    decode_options = dict(prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats)
    meta = {"device": str(jax.devices()[0].device_kind), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "config": args.config, "overrides": args.overrides}
    for name in names:
        started = time.perf_counter()
        if name == "decode":
            rows = bench.decode_cost(config.model, args.streams, args.batches, **decode_options, peer=args.peer)
        elif name == "equal-loss":
            rows = bench.equal_loss(config.model, tuple(p for p in args.streams if p > 1), args.batches,
                                    **decode_options)
        else:
            rows = bench.train_throughput(config, args.streams, args.steps, args.peer)
        meta_run = {**meta, "seconds": round(time.perf_counter() - started, 1),
                    "options": {**decode_options, "steps": args.steps}}
        path = bench.write_report(name, rows, args.out, meta_run)
        print(f"== {name} ({meta_run['seconds']} s; {path})")
        print(bench.format_table(name, rows))
        _plot_or_say(lambda: bench.plot(name, rows, args.out))
    return 0


def cmd_bench_data(args: argparse.Namespace) -> int:
    from parscale_jax.analysis import bench_data

    started = time.perf_counter()
    results = bench_data.run(Path(args.work), args.small_mb, args.large_mb)
    results["seconds"] = round(time.perf_counter() - started, 1)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / "data.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"== data ({results['seconds']} s; {path})")
    print(bench_data.format_report(results))
    return 0


def cmd_bench_growth(args: argparse.Namespace) -> int:
    from parscale_jax.analysis import bench_growth
    from parscale_jax.training.loop import train

    config = load_config(_resolve_config_path(args.config), args.overrides)
    started = time.perf_counter()
    result, curves = bench_growth.run(config, Path(args.work), lambda c, d: train(c, d, progress=not args.no_progress))
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["config"], result["overrides"] = args.config, args.overrides
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / "growth.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"== growth ({result['seconds']} s; {path})")
    print(bench_growth.format_report(result))
    _plot_or_say(lambda: bench_growth.plot(curves, Path(args.out) / "growth.png"))
    return 0


def _fit_and_plot(groups: dict, plot: str, predict: tuple[float, float] | None = None) -> dict:
    """Fit the law to each group of (N, P, loss) points, print the fits and plot them."""
    from parscale_jax.analysis import scaling_law

    fits = {}
    for name, (N, P, loss) in groups.items():
        try:
            fit = scaling_law.fit_law(N, P, loss)
        except ValueError as err:
            raise ConfigError("RESULTS", f"group '{name}': {err}") from None
        fits[name] = (fit, (N, P, loss))
        print(scaling_law.format_fit(name, fit, N, P, loss))
        if predict:
            n, p = predict
            print(f"predicted loss at N = {n:.4g}, P = {int(p)}: {float(fit.law.loss(n, p)):.4f}; a P = 1 model "
                  f"needs N = {float(fit.law.dense_equivalent(n, p)):.4g} for it")
    _plot_or_say(lambda: scaling_law.plot_fits(fits, plot))
    return fits


def _plot_or_say(draw) -> None:
    """Draw a figure, or say in one line why not: matplotlib is optional."""
    try:
        print(f"plot: {draw()}")
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install 'parscale-jax[bench]')")


def cmd_fit_law(args: argparse.Namespace) -> int:
    from parscale_jax.analysis import scaling_law

    groups = scaling_law.read_results(args.results, args.group)
    _fit_and_plot(groups, args.plot or str(Path(args.results).with_suffix(".law.png")), args.predict)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    base = load_config(_resolve_config_path(args.config), args.overrides)

    import jax

    from parscale_jax.analysis import scaling_law
    from parscale_jax.analysis import sweep
    from parscale_jax.config import resolve_mesh
    from parscale_jax.files import write_atomic

    runs = sweep.grid(base, args.sizes, args.parscale, args.tokens)  # every config checked before training
    for config in runs.values():
        resolve_mesh(config, jax.device_count())
    out = Path(args.out)
    rows = sweep.run_sweep(runs, out, progress=not args.no_progress)
    if jax.process_index() != 0:
        return 0
    print(sweep.format_table(rows))
    if len(args.sizes) < 2 or len(args.parscale) < 2:
        print("fit skipped: the law needs at least two widths and two values of P")
        return 0
    fits = _fit_and_plot(scaling_law.read_results(str(out / "results.csv"), None), str(out / "results.law.png"))
    fit = fits["all"][0]
    write_atomic(out / "fit.json", json.dumps({**dataclasses.asdict(fit.law), "r2": fit.r2}, indent=2) + "\n")
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
    config = load_config(_resolve_config_path(args.config), args.overrides)
    if (args.topology is None) == (args.gpus is None):
        raise ConfigError("--topology", "name a TPU topology (--topology v5p-256) or a GPU count (--gpus 8)")

    from parscale_jax.analysis import plan

    if args.topology:
        target = plan.tpu_target(args.topology, args.slices)
    else:
        target = plan.gpu_target(args.gpus, args.gpu_memory)
    report = plan.plan(config, target)
    print(plan.format_report(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["fits"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parscale-jax", description="ParScale language models in JAX.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    multi_host = parser.add_argument_group(
        "multi-host", "automatic on TPU pods, SLURM and Open MPI; elsewhere name the coordinator "
        "(or set PARSCALE_COORDINATOR, PARSCALE_NUM_PROCESSES, PARSCALE_PROCESS_ID)")
    multi_host.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
    multi_host.add_argument("--num-processes", type=int, metavar="N")
    multi_host.add_argument("--process-id", type=int, metavar="I")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train or resume a run")
    train.add_argument("--config", help="a YAML file or the name of a shipped config (default: 'default')")
    train.add_argument("--run-dir", help="where checkpoints and logs go; an existing run resumes")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--stop-at", type=int, metavar="STEP",
                       help="checkpoint and exit at this step; the same command resumes")
    train.add_argument("--fallback", action="store_true",
                       help="if the newest checkpoint is damaged, set it aside and resume from the one before")
    train.add_argument("--override-config", action="store_true",
                       help="continue an existing run under settings that differ from the ones it started with")
    train.add_argument("overrides", nargs="*", metavar="section.key=value")
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("eval", help="mean next-token loss of a run's latest checkpoint")
    evaluate.add_argument("--run-dir", required=True)
    evaluate.add_argument("--text", help="a text file to evaluate on instead of the held-out split")
    evaluate.add_argument("--batches", type=int, default=0, help="stop after this many batches (0: all)")
    evaluate.add_argument("--step", type=int, help="which checkpoint (default: the latest; 0: the starting weights)")
    evaluate.add_argument("--out", help="where to write the JSON result (default: RUN_DIR/eval_stepN.json)")
    evaluate.add_argument("overrides", nargs="*", metavar="section.key=value")
    evaluate.set_defaults(func=cmd_eval)

    generate = commands.add_parser("generate", help="continue prompts with a run's model (KV cache, sampling)")
    generate.add_argument("--run-dir", required=True)
    generate.add_argument("--prompt", help="one prompt; its continuation is printed as it is generated")
    generate.add_argument("--prompts", metavar="FILE", help="a file of prompts, one per line, generated as a batch")
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    generate.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--step", type=int, help="which checkpoint (default: the latest; 0: the starting weights)")
    generate.add_argument("overrides", nargs="*", metavar="section.key=value",
                          help="e.g. model.parscale_n=4 to pick that stream set of a dynamic-P run")
    generate.set_defaults(func=cmd_generate)

    importer = commands.add_parser(
        "import", help="turn a Hugging Face Qwen2/Llama/ParScale checkpoint into a run directory",
        description="Raise P with model.parscale_n=P (new streams start fresh); train only them with "
                    "train.trainable=parscale. The run can be evaluated, sampled and exported at once (step 0); "
                    "parscale-jax train --run-dir OUT trains it.")
    importer.add_argument("--hf", required=True, help="a local Hugging Face checkpoint directory (safetensors)")
    importer.add_argument("--out", required=True, help="the run directory to create")
    importer.add_argument("--config", help="data/train settings to start from (a YAML file or shipped config name)")
    importer.add_argument("overrides", nargs="*", metavar="section.key=value")
    importer.set_defaults(func=cmd_import)

    upscaler = commands.add_parser(
        "upscale", help="a deeper run from a trained one: SOLAR depth up-scaling or identity blocks",
        description="--drop M stacks layers 0..n-M-1 and M..n-1 (SOLAR); --insert K --identity adds K copies "
                    "of existing blocks, evenly interleaved, with zero output projections (the function is "
                    "unchanged). Prefixes follow the layers; the new run starts with a fresh optimizer.")
    upscaler.add_argument("--from", dest="source", required=True, metavar="RUN_OR_HF_DIR")
    upscaler.add_argument("--out", required=True, help="the run directory to create")
    method = upscaler.add_mutually_exclusive_group(required=True)
    method.add_argument("--drop", type=int, metavar="M", help="SOLAR: drop M layers from each copy")
    method.add_argument("--insert", type=int, metavar="K", help="insert K identity blocks (with --identity)")
    upscaler.add_argument("--identity", action="store_true", help="the inserted blocks start as the identity")
    upscaler.add_argument("overrides", nargs="*", metavar="section.key=value",
                          help="data/train settings of the new run (the model's shape is fixed)")
    upscaler.set_defaults(func=cmd_upscale)

    exporter = commands.add_parser("export", help="write a run's model as a Hugging Face checkpoint")
    exporter.add_argument("--run-dir", required=True)
    exporter.add_argument("--out", required=True, help="the checkpoint directory to write")
    exporter.add_argument("--step", type=int, help="which checkpoint (default: the latest; 0: the starting weights)")
    exporter.add_argument("--dtype", help="float32 or bfloat16 (default: model.param_dtype)")
    exporter.add_argument("--max-shard-gb", type=float, default=5.0, help="split the weights above this size")
    exporter.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    exporter.add_argument("overrides", nargs="*", metavar="section.key=value",
                          help="e.g. model.parscale_n=4 to pick that stream set of a dynamic-P run")
    exporter.set_defaults(func=cmd_export)

    bencher = commands.add_parser(
        "bench", help="measure what P streams cost: decode, equal-loss comparison, training throughput",
        description="Each benchmark runs all its variants in one process and prints ratios next to absolute "
                    "figures; it writes OUT/<name>.json and OUT/<name>.png.")
    benchmarks = bencher.add_subparsers(dest="which", required=True)
    for name, summary in (("decode", "per-token decode latency and memory for every P x batch"),
                          ("equal-loss", "P streams against the dense model of equal predicted loss"),
                          ("train", "training tokens/s and model FLOP utilization for every P"),
                          ("all", "the three, one after the other")):
        one = benchmarks.add_parser(name, help=summary)
        one.add_argument("--config", default="bench_cpu", help="the model (and, for train, the batch) to measure")
        one.add_argument("--out", default="bench/results", help="where the JSON and PNG files go")
        one.add_argument("--streams", type=_int_list, default=(1, 2, 4, 8), help="values of P, e.g. 1,2,4,8")
        one.add_argument("--batches", type=_int_list, default=(1, 2, 4, 8), help="decode batch sizes")
        one.add_argument("--prompt-len", type=int, default=64)
        one.add_argument("--new-tokens", type=int, default=32)
        one.add_argument("--repeats", type=int, default=3, help="timings are the median of this many runs")
        one.add_argument("--steps", type=int, default=5, help="timed training steps")
        one.add_argument("--peer", choices=("torch",), help="also measure the PyTorch implementation side by side "
                         "(parscale_jax/interop/hf_remote/ with torch AdamW; torch comes with the test extra)")
        one.add_argument("overrides", nargs="*", metavar="section.key=value")
        one.set_defaults(func=cmd_bench)

    data_bench = benchmarks.add_parser("data", help="prepare throughput, start-up and memory against corpus "
                                       "size, input pipeline against the training step")
    data_bench.add_argument("--work", default="bench/data-work", help="where the corpora and datasets go")
    data_bench.add_argument("--small-mb", type=float, default=10, help="the small corpus, in MB of text")
    data_bench.add_argument("--large-mb", type=float, default=2000, help="the large corpus, in MB of text")
    data_bench.add_argument("--out", default="bench/results", help="where data.json goes")
    data_bench.set_defaults(func=cmd_bench_data)

    growth_bench = benchmarks.add_parser("growth", help="a run that grows (train.growth) against the final model "
                                         "trained from scratch: loss against training FLOPs")
    growth_bench.add_argument("--config", default="growth", help="a config with a train.growth schedule")
    growth_bench.add_argument("--work", default="bench/growth-work", help="where the two runs go (resumed if there)")
    growth_bench.add_argument("--out", default="bench/results", help="where growth.json and growth.png go")
    growth_bench.add_argument("--no-progress", action="store_true")
    growth_bench.add_argument("overrides", nargs="*", metavar="section.key=value")
    growth_bench.set_defaults(func=cmd_bench_growth)

    law = commands.add_parser(
        "fit-law", help="fit the parallel scaling law L = (A / (N (k ln P + 1)))^alpha + E to measured losses",
        description="RESULTS is a CSV with columns non_embedding_params (or N), P and final_loss (or eval_loss, "
                    "loss). The fit is the paper's: Huber loss on log losses, L-BFGS-B from a grid of starts.")
    law.add_argument("results", metavar="RESULTS.csv")
    law.add_argument("--group", help="fit each value of this column separately (e.g. corpus)")
    law.add_argument("--predict", nargs=2, type=float, metavar=("N", "P"), help="predict the loss of one model")
    law.add_argument("--plot", help="where to write the PNG plot (default: RESULTS.law.png)")
    law.set_defaults(func=cmd_fit_law)

    sweeper = commands.add_parser(
        "sweep", help="train a grid of widths x P on equal tokens, then fit the scaling law to it",
        description="Each run goes to OUT/d<width>_p<P>; finished runs are not trained again and a cut-off one "
                    "resumes. Widths keep the base config's depth, head size and MLP ratio. Writes "
                    "OUT/results.csv, OUT/fit.json and OUT/results.law.png.")
    sweeper.add_argument("--config", default="sweep", help="the base config (default: the shipped 'sweep')")
    sweeper.add_argument("--sizes", type=_int_list, default=(32, 64, 128), help="model widths (hidden sizes)")
    sweeper.add_argument("--parscale", type=_int_list, default=(1, 2, 4), help="values of P")
    sweeper.add_argument("--tokens", type=int, help="training tokens of every run (default: the base config's "
                         "steps x batch_size x seq_len)")
    sweeper.add_argument("--out", default="runs/sweep", help="the sweep's directory")
    sweeper.add_argument("--no-progress", action="store_true", help="no progress bars")
    sweeper.add_argument("overrides", nargs="*", metavar="section.key=value", help="applied to the base config")
    sweeper.set_defaults(func=cmd_sweep)

    preparer = commands.add_parser(
        "prepare", help="tokenize corpora once into sharded token files for data.sources",
        description="Reads .txt (a file is a document), .jsonl, .jsonl.gz, .jsonl.zst and .parquet files, "
                    "or folders of them, from local paths or anything etils.epath opens; writes ArrayRecord "
                    "shards and a manifest. A killed run continues where it stopped when run again.")
    preparer.add_argument("--out", required=True, help="the dataset folder to write")
    preparer.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizer.json (default: byte)")
    preparer.add_argument("--eval-fraction", type=float, default=0.01,
                          help="share of documents held out for evaluation (default: 0.01)")
    preparer.add_argument("--text-key", default="text", help="the JSON field or Parquet column of the text")
    preparer.add_argument("--shard-tokens", type=int, default=1 << 26, help="tokens per shard (default: 2^26)")
    preparer.add_argument("--no-progress", action="store_true")
    preparer.add_argument("inputs", nargs="+", metavar="INPUT")
    preparer.set_defaults(func=cmd_prepare)

    planner = commands.add_parser(
        "plan", help="compile the train step for a TPU topology or GPU count and report per-device memory",
        description="Exit status: 0 if the step fits the target's memory, 1 if not, 2 on bad input.")
    planner.add_argument("--config", default="default", help="a YAML file or the name of a shipped config")
    planner.add_argument("--topology", help="a TPU slice: v5p-256, v5e-64, v6e-256, v4-32 or e.g. v5p:4x4x8")
    planner.add_argument("--slices", type=int, default=1, help="TPU slices joined over DCN (set mesh.dcn_data too)")
    planner.add_argument("--gpus", type=int, help="a GPU count instead (simulated on CPU: memory is estimated)")
    planner.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB", help="memory per GPU (default 80)")
    planner.add_argument("--out", help="also write the report as JSON here")
    planner.add_argument("overrides", nargs="*", metavar="section.key=value")
    planner.set_defaults(func=cmd_plan)
    return parser


def _quiet_library_errors() -> None:
    """Orbax and TensorStore report a failed background write (a full disk) with tracebacks from their
    threads, and the writes it abandoned as never-awaited coroutines when the interpreter exits; the
    error that reaches us says the same in one line, so theirs show only with --debug."""
    for name in ("absl", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    sys.unraisablehook = lambda unraisable: None
    threading.excepthook = lambda args: None
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    # The filter does not cover coroutines collected while the interpreter tears its modules down
    # (which ones are depends on the import order): close them, unstarted, before that.
    atexit.register(_close_abandoned_coroutines)


def _close_abandoned_coroutines() -> None:
    for obj in gc.get_objects():
        # The exact type, not isinstance: that reads `__class__`, which some modules' objects warn on.
        if type(obj) is types.CoroutineType and inspect.getcoroutinestate(obj) == inspect.CORO_CREATED:
            obj.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        _quiet_library_errors()
    from parscale_jax.errors import DataError
    from parscale_jax.errors import CheckpointError, NonFiniteError

    try:
        if args.command in ("train", "eval", "generate", "sweep"):
            from parscale_jax import distributed

            setup = distributed.initialize(args.coordinator, args.num_processes, args.process_id)
            if setup != "single process":
                print(setup, flush=True)
        return args.func(args)
    except (ConfigError, DataError, FileNotFoundError) as err:
        if args.debug:
            raise
        print(f"parscale-jax {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (CheckpointError, NonFiniteError) as err:  # the run's files or numbers, not its command line
        if args.debug:
            raise
        print(f"parscale-jax {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
