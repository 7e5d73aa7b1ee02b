"""`parscale-jax branch`: the Branch step of Branch-Train-Merge (Li et al., 2022).

One seed run becomes one expert run per domain, OUT/<NAME>/, each starting from the seed's weights
bit for bit (prefixes and aggregator included) and reading only its own data: a prepared dataset
(a folder with a `prepare` manifest: data.sources), a text folder or file (data.corpus=files) or the
built-in corpus `shakespeare`. Each expert is an ordinary run, trained and resumed by `train
--run-dir` anywhere; `train_experts` trains them one after another here, like a sweep (a finished
expert is skipped, a cut-off one resumes). With `streams_only` the experts train only the streams'
prefixes and aggregator on the seed's frozen backbone (train.trainable=parscale).

OUT/branch.json records the seed and the settings, so that running the same command again finishes
what a killed one left and a different one is refused. An expert is made in a hidden folder and
renamed into place, so OUT/<NAME>/ exists only once it is complete.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from parscale_jax.checkpoint import complete_steps
from parscale_jax.config import Config, DataConfig, load_config, to_dict
from parscale_jax.data.corpus import corpus_files
from parscale_jax.data.prepared import MANIFEST as PREPARED
from parscale_jax.data.prepared import open_sources
from parscale_jax.errors import ConfigError
from parscale_jax.evaluate import evaluate_run
from parscale_jax.files import write_atomic
from parscale_jax.layout import Layout
from parscale_jax.runs import Run, Source, check_same_shapes, initial_weights, read_source

MANIFEST = "branch.json"
RESULT = "result.json"  # an expert trained and evaluated by `train_experts`
BUILT_IN = "shakespeare"
NAME = re.compile(r"[A-Za-z0-9_-]+")  # a domain's name is its expert's folder
DATA_KEYS = ("corpus", "paths", "sources", "tokenizer")  # what the domain (and the seed's tokens) fix


@dataclasses.dataclass(frozen=True)
class Domain:
    name: str
    path: str  # absolute, or BUILT_IN

    @classmethod
    def parse(cls, text: str) -> Domain:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise ConfigError("--domain", f"'{text}' is not NAME=PATH")
        if not NAME.fullmatch(name):
            raise ConfigError("--domain", f"'{name}' names a folder: use letters, digits, '_' and '-'")
        if path == BUILT_IN:
            return cls(name, path)
        if not Path(path).exists():
            raise ConfigError("--domain", f"{name}={path}: not found")
        return cls(name, str(Path(path).absolute()))

    def data(self) -> dict[str, Any]:
        """The data settings that make a run read this domain and nothing else."""
        if self.path == BUILT_IN:
            return {"corpus": BUILT_IN, "paths": [], "sources": []}
        if (Path(self.path) / PREPARED).is_file():
            return {"corpus": DataConfig().corpus, "paths": [], "sources": [{"path": self.path, "weight": 1.0}]}
        return {"corpus": "files", "paths": [self.path], "sources": []}


def parse_domains(texts: Sequence[str]) -> list[Domain]:
    domains = [Domain.parse(text) for text in texts]
    if not domains:
        raise ConfigError("--domain", "name at least one domain, NAME=PATH")
    names = [d.name for d in domains]
    if twice := next((name for name in names if names.count(name) > 1), None):
        raise ConfigError("--domain", f"two domains are named '{twice}'")
    return domains


def expert_config(seed: Config, domain: Domain, overrides: Sequence[str], streams_only: bool) -> Config:
    """The seed's config reading `domain`, then the overrides, which may change neither the data
    nor the parameters (their shapes and dtype): the expert must start as the seed."""
    values = to_dict(seed)
    values["data"].update(domain.data())
    if streams_only:
        values["train"]["trainable"] = "parscale"
    config = load_config(base=values, overrides=list(overrides))
    wanted = load_config(base=values)  # the same, before the overrides
    for key in DATA_KEYS:
        if getattr(config.data, key) != getattr(wanted.data, key):
            raise ConfigError(f"data.{key}", f"each expert reads its own --domain with the seed's tokenizer; "
                              "the overrides may not change it")
    check_same_shapes({"the seed": seed.model, "the expert": config.model}, "overrides")
    if config.model.param_dtype != seed.model.param_dtype:
        raise ConfigError("model.param_dtype", f"the experts start as the seed, whose weights are "
                          f"{seed.model.param_dtype}")
    if streams_only and config.train.trainable != "parscale":
        raise ConfigError("train.trainable", "--streams-only trains only the streams (train.trainable=parscale)")
    return config


def check_data(config: Config, domain: Domain) -> None:
    """Fail now, in one line, on data the expert could not read (cheap: no document is read)."""
    if config.data.sources:  # the manifest against the seed's tokenizer and vocabulary
        open_sources(config.data, config.model.vocab_size)
    elif config.data.corpus == "files":
        corpus_files(config.data.paths, f"--domain {domain.name}")


def _recorded(out: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of an earlier branch into `out` with the same settings (None for a new folder);
    anything else in `out` is refused, so that no expert mixes two branches."""
    path = out / MANIFEST
    if path.is_file():
        recorded = json.loads(path.read_text())
        differ = [key for key in settings if recorded.get(key) != settings[key]]
        if differ:
            raise ConfigError("--out", f"{out} holds a branch of other settings ({', '.join(differ)} differ); "
                              "branch into a new --out")
        return recorded
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError("--out", f"{out} exists and is not a branch folder; branch into a new --out")
    return None


def branch(seed: str | Path, out: str | Path, domains: Sequence[str], overrides: Sequence[str] = (),
           streams_only: bool = False) -> dict[str, Any]:
    """Write (or finish writing) one expert run per domain under `out`; returns a summary. Every
    input is checked before anything is written."""
    out = Path(out).absolute()
    parsed = parse_domains(domains)
    settings = {"seed": str(Path(seed).absolute()), "domains": {d.name: d.path for d in parsed},
                "overrides": list(overrides), "streams_only": streams_only}
    recorded = _recorded(out, settings)
    missing = [d for d in parsed if not (out / d.name / "config.yaml").is_file()]
    seed_step = recorded["seed_step"] if recorded else None
    if missing:
        source = read_source(seed, "branch")
        seed_step = source.parent.get("step")
        if recorded and recorded["seed_step"] != seed_step:
            raise ConfigError("--from", f"{seed} is at step {seed_step} now, and the experts in {out} were branched "
                              f"from step {recorded['seed_step']}; branch into a new --out")
        if streams_only and source.config.model.parscale_n < 2:
            raise ConfigError("--streams-only", f"stream-level experts train the streams, and {seed} has one "
                              "(model.parscale_n=1): branch without --streams-only, or from a P > 1 run")
        configs = {d.name: expert_config(source.config, d, overrides, streams_only) for d in missing}
        for d in missing:
            check_data(configs[d.name], d)
        if recorded is None:
            out.mkdir(parents=True, exist_ok=True)
            write_atomic(out / MANIFEST, json.dumps({**settings, "seed_step": seed_step}, indent=2) + "\n")
        _make_experts(out, missing, configs, source, streams_only)
    made = {d.name for d in missing}
    experts = [{"name": d.name, "run_dir": str(out / d.name), "data": d.path, "made_now": d.name in made}
               for d in parsed]
    return {"out": str(out), "seed": settings["seed"], "seed_step": seed_step, "streams_only": streams_only,
            "experts": experts}


def _make_experts(out: Path, domains: list[Domain], configs: dict[str, Config], source: Source,
                  streams_only: bool) -> None:
    first = configs[domains[0].name]  # every expert has the seed's parameters: place them once
    layout = Layout.create(first)
    with jax.set_mesh(layout.mesh):
        initial = initial_weights(layout, source.params, first.model, np.dtype(first.model.param_dtype))
        for d in domains:
            partial = out / f".{d.name}.partial"
            if partial.exists():  # half written by a branch that was killed
                shutil.rmtree(partial)
            Run.create(partial, configs[d.name], initial, "branch", [source.parent], domain=d.name, data=d.path,
                       streams_only=streams_only)
            partial.rename(out / d.name)


def read_manifest(out: str | Path) -> dict[str, Any]:
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise ConfigError("--out", f"{out} is not a branch folder (no {MANIFEST})")
    return json.loads(path.read_text())


def train_experts(out: str | Path, train: Callable[[Config, Path], dict[str, Any]]) -> list[dict[str, Any]]:
    """Train the experts of the branch folder `out` one after another with `train(config, run_dir)`
    (the training loop, which sits above transforms/: the caller hands it in), each evaluated on its
    own domain's held-out data when it finishes (`result.json`). A finished expert is skipped; an
    expert whose session ended early (a stop signal, a --stop-at) ends this call, and running it
    again resumes it. Returns the results of the finished experts."""
    out = Path(out)
    names = list(read_manifest(out)["domains"])
    results = []
    for index, name in enumerate(names, 1):
        directory, tag = out / name, f"[{index}/{len(names)}] {name}"
        if (directory / RESULT).is_file():
            results.append(json.loads((directory / RESULT).read_text()))
            print(f"{tag}: finished already, eval loss {results[-1]['eval_loss']:.4f}", flush=True)
            continue
        run = Run.open(directory)
        steps = run.config.train.steps
        print(f"{tag}: {steps} steps in {directory}", flush=True)
        last = train(run.config, directory)
        done = max(complete_steps(run.checkpoint_dir), default=0)
        if done < steps:
            print(f"{tag}: stopped at step {done} of {steps}; run the same command again to resume", flush=True)
            break
        evaluation = evaluate_run(run, limit=run.config.train.eval_batches)
        result = {"expert": name, "run_dir": str(directory.absolute()), "steps": done,
                  "train_loss": last.get("loss"), "eval_loss": evaluation["loss"],
                  "eval_tokens": evaluation["target_tokens"]}
        write_atomic(directory / RESULT, json.dumps(result, indent=2) + "\n")
        results.append(result)
        print(f"{tag}: eval loss {result['eval_loss']:.4f} on its domain's held-out data", flush=True)
    return results
