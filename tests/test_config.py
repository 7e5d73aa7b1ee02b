"""Config loading, dotted overrides and validation: every user mistake is a ConfigError naming its key."""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parscale_jax.errors import ConfigError
from parscale_jax.sharding import mesh_axes
from parscale_jax.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    GrowthStage,
    ModelConfig,
    SourceConfig,
    TrainConfig,
    from_dict,
    load_config,
    packaged_config_path,
    parse_overrides,
    to_dict,
    validate,
    validate_model,
)

CONFIG_DIR = Path(str(importlib.resources.files("parscale_jax") / "configs"))
SHIPPED = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))

SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
# The keys a user writes: every field, the mesh's axes (mesh.data, ...) rather than its `sizes`.
LEAF_KEYS = sorted(f"{section}.{name}" for section, fields in to_dict(Config()).items() for name in fields)
ALL_KEYS = set(LEAF_KEYS) | set(SECTIONS)


def absolute(*paths: str) -> tuple[str, ...]:
    """Local paths as a loaded config holds them."""
    return tuple(str(Path(path).absolute()) for path in paths)


def config_error(overrides: list[str], path=None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value


# ---------------------------------------------------------------------------------------------
# Shipped configs and defaults


def test_all_expected_configs_are_shipped():
    assert {"default", "paper_0.5b", "paper_0.7b", "paper_1.1b", "paper_1.6b", "paper_2.8b",
            "paper_4.4b"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_loads_and_validates(name):
    config = load_config(packaged_config_path(name), [])
    assert isinstance(config, Config)
    m = config.model
    assert m.head_dim is not None and m.head_dim % 2 == 0
    assert m.num_heads % m.num_kv_heads == 0
    assert config.data.seq_len <= m.max_position_embeddings
    assert validate(config) == config
    # The saved form (what goes next to checkpoints) round-trips.
    assert from_dict(to_dict(config)) == config
    assert from_dict(yaml.safe_load(yaml.safe_dump(to_dict(config)))) == config


@pytest.mark.parametrize("name", [n for n in SHIPPED if n.startswith("paper_")])
def test_paper_configs_take_a_parscale_override(name):
    config = load_config(packaged_config_path(name), ["model.parscale_n=8"])
    assert config.model.parscale_n == 8


def test_unknown_shipped_config_name_lists_the_shipped_ones():
    with pytest.raises(ConfigError) as info:
        packaged_config_path("paper_9b")
    assert info.value.key == "--config"
    assert "paper_9b" in str(info.value) and "paper_1.6b" in str(info.value)


def test_no_file_no_overrides_gives_the_dataclass_defaults():
    config = load_config(None, [])
    m = ModelConfig()
    assert config == Config(model=dataclasses.replace(m, head_dim=m.hidden_size // m.num_heads),
                            data=DataConfig(), train=TrainConfig(), checkpoint=CheckpointConfig())
    assert config.model.head_dim == 32
    assert load_config() == config


def test_explicit_head_dim_is_kept_and_may_not_divide_hidden_size():
    config = load_config(None, ["model.hidden_size=96", "model.num_heads=5", "model.num_kv_heads=1",
                                "model.head_dim=16"])
    assert config.model.head_dim == 16
    assert validate_model(config.model) == config.model


# ---------------------------------------------------------------------------------------------
# Overrides and precedence


def test_overrides_set_fields_with_their_types():
    config = load_config(None, ["model.parscale_n=4", "train.steps=200", "data.paths=[a.txt,b.txt]",
                                "model.qkv_bias=false", "train.schedule=wsd", "model.head_dim=null"])
    assert config.model.parscale_n == 4 and type(config.model.parscale_n) is int
    assert config.train.steps == 200 and type(config.train.steps) is int
    assert config.data.paths == absolute("a.txt", "b.txt") and isinstance(config.data.paths, tuple)
    assert config.model.qkv_bias is False
    assert config.train.schedule == "wsd"
    assert config.model.head_dim == 32  # null -> derived


def test_paths_accept_a_comma_separated_string_and_a_single_path():
    assert load_config(None, ["data.paths=a.txt,b.jsonl"]).data.paths == absolute("a.txt", "b.jsonl")
    assert load_config(None, ["data.paths=corpus/"]).data.paths == absolute("corpus/")
    assert load_config(None, ["data.paths=[]"]).data.paths == ()


def test_float_fields_accept_integers():
    config = load_config(None, ["train.lr=1", "model.rope_theta=500000", "model.parscale_attn_smooth=0"])
    assert config.train.lr == 1.0 and type(config.train.lr) is float
    assert config.model.rope_theta == 500000.0 and type(config.model.rope_theta) is float
    assert type(config.model.parscale_attn_smooth) is float


def test_override_values_are_yaml():
    config = load_config(None, ["train.lr=3.0e-4", "train.weight_decay=0.0", "data.text_key=content"])
    assert config.train.lr == pytest.approx(3e-4)
    assert config.data.text_key == "content"


def test_later_overrides_win():
    assert load_config(None, ["model.parscale_n=2", "model.parscale_n=8"]).model.parscale_n == 8
    assert load_config(None, ["train.steps=10", "train.warmup_steps=5", "train.steps=50"]).train.steps == 50


def test_whole_section_override_merges_with_the_rest():
    config = load_config(None, ["model={parscale_n: 2, num_layers: 3}"])
    assert config.model.parscale_n == 2 and config.model.num_layers == 3
    assert config.model.hidden_size == ModelConfig().hidden_size


def test_file_overrides_defaults_and_cli_overrides_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"model": {"parscale_n": 2, "num_layers": 6},
                                    "train": {"steps": 1000, "lr": 1e-3}}))
    from_file = load_config(path, [])
    assert from_file.model.parscale_n == 2 and from_file.model.num_layers == 6
    assert from_file.train.steps == 1000 and from_file.train.lr == pytest.approx(1e-3)
    assert from_file.model.hidden_size == ModelConfig().hidden_size  # untouched field: default

    both = load_config(path, ["model.parscale_n=4", "train.lr=2e-3"])
    assert both.model.parscale_n == 4  # CLI over file
    assert both.model.num_layers == 6  # file over default
    assert both.train.lr == pytest.approx(2e-3)
    assert both.train.steps == 1000


def test_base_dict_is_overridden_by_file_and_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  steps: 77\n")
    config = load_config(path, ["train.warmup_steps=7"],
                         base={"train": {"steps": 5, "warmup_steps": 1, "lr": 0.5}})
    assert (config.train.steps, config.train.warmup_steps, config.train.lr) == (77, 7, 0.5)


def test_empty_yaml_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    assert load_config(path, []) == load_config(None, [])


def test_parse_overrides_builds_a_nested_dict():
    assert parse_overrides(["model.parscale_n=4", "train.steps=200", "model.dtype=bfloat16"]) == {
        "model": {"parscale_n": 4, "dtype": "bfloat16"}, "train": {"steps": 200}}
    assert parse_overrides(["data.text_key="]) == {"data": {"text_key": ""}}


# ---------------------------------------------------------------------------------------------
# Validation errors: (overrides, key, a distinctive part of the message)

ERRORS = [
    # unknown names, with the closest valid one suggested
    (["model.parscle_n=2"], "model.parscle_n", "parscale_n"),
    (["train.stepz=2"], "train.stepz", "'steps'"),
    (["modle.parscale_n=2"], "modle", "'model'"),
    (["optimizer.lr=0.1"], "optimizer", "unknown key"),
    # wrong types
    (["model.parscale_n=two"], "model.parscale_n", "expected an integer"),
    (["train.steps=1.5"], "train.steps", "expected an integer"),
    (["train.steps=true"], "train.steps", "expected an integer"),
    (["train.steps=null"], "train.steps", "expected an integer"),
    (["model.qkv_bias=1"], "model.qkv_bias", "expected true or false"),
    (["model.tie_embeddings='yes'"], "model.tie_embeddings", "expected true or false"),
    (["checkpoint.async_save=maybe"], "checkpoint.async_save", "expected true or false"),
    (["train.lr=fast"], "train.lr", "expected a number"),
    (["train.lr=true"], "train.lr", "expected a number"),
    (["train.lr=[1]"], "train.lr", "expected a number"),
    (["model.dtype=16"], "model.dtype", "expected a string"),
    (["data.paths=3"], "data.paths", "expected a list"),
    (["data.paths=[a.txt, 3]"], "data.paths", "expected a string"),
    (["model=4"], "model", "expected a mapping"),
    (["model.parscale_n.x=4"], "model.parscale_n", "expected an integer"),
    # model rules
    (["model.num_heads=5"], "model.num_heads", "do not divide hidden_size"),
    (["model.num_kv_heads=3"], "model.num_kv_heads", "do not divide num_heads"),
    (["model.num_heads=0"], "model.num_heads", ">= 1"),
    (["model.num_kv_heads=0"], "model.num_kv_heads", ">= 1"),
    (["model.hidden_size=24", "model.num_heads=8", "model.num_kv_heads=4"], "model.head_dim", "even"),
    (["model.parscale_n=0"], "model.parscale_n", "P must be >= 1"),
    (["model.parscale_n=-3"], "model.parscale_n", "P must be >= 1"),
    (["model.parscale_n_tokens=-1"], "model.parscale_n_tokens", "T must be >= 0"),
    (["model.parscale_attn_smooth=1.5"], "model.parscale_attn_smooth", "[0, 1]"),
    (["model.parscale_attn_smooth=-0.1"], "model.parscale_attn_smooth", "[0, 1]"),
    (["model.rope_theta=0"], "model.rope_theta", "> 0"),
    (["model.dtype=bfloat61"], "model.dtype", "bfloat16"),
    (["model.param_dtype=fp32"], "model.param_dtype", "float32"),
    (["model.remat=dot"], "model.remat", "did you mean 'dots'"),
    # data rules
    (["data.seq_len=4096"], "data.seq_len", "max_position_embeddings=2048"),
    (["data.seq_len=1"], "data.seq_len", ">= 2"),
    (["data.corpus=files"], "data.paths", "needs at least one path"),
    (["data.corpus=wikipedia"], "data.corpus", "'shakespeare' or 'files'"),
    (["data.eval_fraction=1"], "data.eval_fraction", "strictly between 0 and 1"),
    # train rules
    (["train.batch_size=16", "train.grad_accum=3"], "train.grad_accum", "do not divide train.batch_size=16"),
    (["train.grad_accum=0"], "train.grad_accum", ">= 1"),
    (["train.schedule=cosin"], "train.schedule", "did you mean 'cosine'"),
    (["train.schedule=linear"], "train.schedule", "must be one of"),
    (["train.steps=10", "train.warmup_steps=20"], "train.warmup_steps", "[0, train.steps=10]"),
    (["train.warmup_steps=-1"], "train.warmup_steps", "[0, train.steps="),
    (["train.lr=0"], "train.lr", "> 0"),
    (["train.lr=.inf"], "train.lr", "finite"),
    (["train.lr=.nan"], "train.lr", "finite"),
    (["train.b2=1.0"], "train.b2", "[0, 1)"),
    (["train.grad_clip=-1"], "train.grad_clip", ">= 0"),
    (["checkpoint.keep=0"], "checkpoint.keep", ">= 1"),
    # malformed overrides
    (["model.parscale_n"], "model.parscale_n", "section.key=value"),
    (["=4"], "=4", "section.key=value"),
    ([""], "''", "section.key=value"),
    (["model..parscale_n=2"], "model..parscale_n", "empty name"),
    ([".=2"], ".", "empty name"),
    (["model.parscale_n=[1, 2"], "model.parscale_n", "cannot parse"),
    (["train.steps=2024-13-45"], "train.steps", "cannot parse"),
    (["model.parscale_n=!!python/object:os.system x"], "model.parscale_n", "cannot parse"),
]


@pytest.mark.parametrize("overrides,key,fragment", ERRORS, ids=[" ".join(e[0]) for e in ERRORS])
def test_validation_error_names_its_key(overrides, key, fragment):
    err = config_error(overrides)
    assert err.key == key
    message = str(err)
    assert message.startswith(f"{key}: ")
    assert fragment in message
    assert "\n" not in message


def test_errors_are_value_errors_and_one_line():
    err = config_error(["model.num_heads=5"])
    assert isinstance(err, ValueError)
    assert str(err) == ("model.num_heads: 5 heads do not divide hidden_size 128 "
                        "(set model.head_dim explicitly to allow this)")


def test_unknown_key_in_a_file_is_named_with_its_dotted_path(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  parscale_m: 2\n")
    err = config_error([], path)
    assert err.key == "model.parscale_m" and "parscale_n" in str(err)


def test_invalid_yaml_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  parscale_n: [1, 2\n")
    err = config_error([], path)
    assert err.key == "--config"
    assert "not valid YAML" in str(err) and str(path) in str(err)
    assert "\n" not in str(err)


def test_non_utf8_yaml_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model:\n  dtype: caf\xe9\n".encode("latin-1"))
    err = config_error([], path)
    assert err.key == "--config" and "not valid YAML" in str(err)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    err = config_error([], path)
    assert err.key == "--config"
    assert "file not found" in str(err) and str(path) in str(err)


def test_a_folder_is_not_a_config_file(tmp_path):
    err = config_error([], tmp_path)
    assert err.key == "--config" and "file not found" in str(err)


@pytest.mark.parametrize("text", ["- model\n- train\n", "just a string\n", "42\n"])
def test_yaml_that_is_not_a_mapping(tmp_path, text):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    err = config_error([], path)
    assert err.key == "--config" and "mapping" in str(err)


@pytest.mark.parametrize("text,key", [("'': 1\n", "''"), ("model:\n  '': 1\n", "model.''"),
                                      ("1: 2\n", "1"), ("~: 2\n", "None")])
def test_odd_keys_in_a_file_are_unknown_keys(tmp_path, text, key):
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    err = config_error([], path)
    assert err.key == key and "unknown key" in str(err)


def test_section_that_is_not_a_mapping_in_a_file(tmp_path):
    path = tmp_path / "flat.yaml"
    path.write_text("model: 4\n")
    err = config_error([], path)
    assert err.key == "model" and "expected a mapping" in str(err)


def test_override_into_a_non_section_value():
    err = config_error(["model=4", "model.parscale_n=2"])
    assert err.key == "model.parscale_n" and "not a section" in str(err)


# ---------------------------------------------------------------------------------------------
# Property-based: any input gives a valid Config or a ConfigError naming a real key.

scalars = st.one_of(
    st.integers(min_value=-4, max_value=4),
    st.integers(min_value=-10**6, max_value=10**6),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0.0, max_value=1.0),
    st.text(max_size=12),
    st.sampled_from(["cosine", "wsd", "constant", "bfloat16", "float32", "dots", "files",
                     "shakespeare", "byte", "a.txt", "", "none", "full"]),
    st.booleans(),
    st.none(),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3))
keys = st.sampled_from(sorted(ALL_KEYS))


def render(value, raw: bool) -> str:
    """An override's right-hand side: the value as YAML, or (for strings) the raw text itself."""
    if raw and isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip().removesuffix("...").strip()


# The cross-field rules: an error may name a key that was not set when it is one of these, and one
# of the keys its rule reads was set.
CROSS_FIELD = {
    "model.num_heads": {"model.hidden_size", "model.head_dim"},
    "model.head_dim": {"model.hidden_size", "model.num_heads"},
    "model.num_kv_heads": {"model.num_heads"},
    "data.paths": {"data.corpus"},
    "data.seq_len": {"model.max_position_embeddings"},
    "train.grad_accum": {"train.batch_size"},
    "train.warmup_steps": {"train.steps"},
    "train.trainable": {"model.parscale_n"},
    # A mesh axis that does not divide a split dimension: the sizes of the model, the micro-batch, or
    # the mesh's other settings (which rules apply, e.g. FSDP's) are to blame.
    **{f"mesh.{axis}": {"model.", "train.batch_size", "train.grad_accum", "mesh."} for axis in mesh_axes()},
    "mesh.dcn_data": {"mesh.data"},
}


def names_the_offending_key(key: str, offending: list[str]) -> bool:
    """The key the error names is one that was set (or a part of it, e.g. its section, or a key
    inside a section that was set whole), or a key whose cross-field rule reads one that was set."""
    related = CROSS_FIELD.get(key, set())
    return any(key.startswith(k) or k.startswith(key) or any(k.startswith(r) or r.startswith(k) for r in related)
               for k in offending if k)


def test_the_property_checks_reject_an_error_naming_another_key():
    assert names_the_offending_key("train.warmup_steps", ["train.steps"])
    assert names_the_offending_key("model.qkv_bias", ["model"])
    assert not names_the_offending_key("model.dtype", ["train.steps"])
    assert not names_the_offending_key("train.warmup_steps", ["model.hidden_size"])


def check_outcome(make, offending: list[str]) -> None:
    try:
        config = make()
    except ConfigError as err:
        assert isinstance(err.key, str)
        assert err.key, "empty key"
        assert names_the_offending_key(err.key, offending), (err.key, offending)
        assert str(err).startswith(f"{err.key}: ")
        return
    assert isinstance(config, Config)
    assert validate(config) == config
    assert from_dict(to_dict(config)) == config
    assert config.model.head_dim is not None


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(keys, st.tuples(values, st.booleans()), max_size=6))
def test_random_overrides_give_a_valid_config_or_a_config_error(overrides):
    items = [f"{key}={render(value, raw)}" for key, (value, raw) in overrides.items()]
    check_outcome(lambda: load_config(None, items), list(overrides))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(LEAF_KEYS), values, max_size=6))
def test_random_python_values_in_a_base_dict(flat):
    base: dict = {}
    for key, value in flat.items():
        section, name = key.split(".")
        base.setdefault(section, {})[name] = value
    check_outcome(lambda: load_config(base=base), list(flat))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30), values, st.booleans())
def test_random_override_keys(key, value, raw):
    item = f"{key}={render(value, raw)}"
    check_outcome(lambda: load_config(None, [item]), [item, key, key.strip(), key.strip().partition("=")[0]])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=3))
def test_random_override_strings(items):
    # Any text at all: the key is the text up to the first '=', or the whole item if it is malformed.
    offending = items + [repr(i) for i in items] + [i.partition("=")[0].strip() for i in items]
    check_outcome(lambda: load_config(None, items), offending)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(max_size=80),
                 st.dictionaries(st.sampled_from(sorted(SECTIONS) + ["extra"]),
                                 st.one_of(values, st.dictionaries(st.text(max_size=10), values, max_size=3)),
                                 max_size=3).map(lambda d: yaml.safe_dump(d))))
def test_random_yaml_files(tmp_path, text):
    path = tmp_path / "random.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        parsed = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError):
        parsed = None
    top = [str(k) or "''" for k in parsed] if isinstance(parsed, dict) else []
    check_outcome(lambda: load_config(path, []), ["--config", *top])


FIELD_TYPES = {**{f"{section}.{name}": hint
                  for section, cls in typing.get_type_hints(Config).items()
                  for name, hint in typing.get_type_hints(cls).items() if name != "sizes"},
               **{f"mesh.{axis}": int for axis in mesh_axes()}}
CHOICES = {"model.dtype": ["float32", "bfloat16", "float16"], "model.param_dtype": ["float32", "bfloat16"],
           "model.remat": ["none", "full", "dots", "dots_no_batch", "qkv_proj"],
           "train.schedule": ["cosine", "wsd", "constant"], "data.corpus": ["shakespeare", "files"],
           "data.tokenizer": ["byte"], "data.text_key": ["text", "content"]}


@st.composite
def plausible_override(draw):
    """A well-typed value in a small range, so that many drawn configs are valid."""
    key = draw(st.sampled_from(LEAF_KEYS))
    hint = FIELD_TYPES[key]
    if key in CHOICES:
        value = draw(st.sampled_from(CHOICES[key]))
    elif hint is bool:
        value = draw(st.booleans())
    elif hint is float:
        value = draw(st.one_of(st.floats(0.0, 1.0), st.integers(0, 2)))
    elif hint is int or key in ("model.head_dim", "train.warmup_steps"):
        value = draw(st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 300]))
    elif key == "train.growth":
        value = draw(st.lists(st.fixed_dictionaries({"step": st.integers(0, 400), "num_layers": st.integers(1, 8),
                                                     "ramp_steps": st.integers(0, 50)}), max_size=2))
    elif key == "train.eval_tasks":
        value = draw(st.lists(st.sampled_from(["shakespeare_mc", "facts_qa"]), max_size=2))
    else:  # data.paths, data.sources (bare paths are sources of weight 1)
        value = draw(st.lists(st.sampled_from(["a.txt", "b.jsonl", "corpus/"]), max_size=2))
    return key, value


@settings(max_examples=200, deadline=None)
@given(st.lists(plausible_override(), max_size=4))
def test_plausible_overrides_are_applied_exactly(pairs):
    items = [f"{key}={render(value, raw=False)}" for key, value in pairs]
    check_outcome(lambda: load_config(None, items), [key for key, _ in pairs])
    try:
        config = load_config(None, items)
    except ConfigError:
        return
    for key, value in dict(pairs).items():  # later overrides win
        section, name = key.split(".")
        got = to_dict(config)[section][name] if section == "mesh" else getattr(getattr(config, section), name)
        hint = FIELD_TYPES[key]
        if hint in (int, float, bool, str):
            assert got == value and type(got) is hint, key
        elif key == "data.paths":  # local paths are made absolute
            assert got == absolute(*value), key
        elif key == "data.sources":
            assert got == tuple(SourceConfig(path=path) for path in absolute(*value)), key
        elif key == "train.growth":
            assert got == tuple(GrowthStage(**stage) for stage in value), key
        elif key == "train.eval_tasks":
            assert got == tuple(value), key
        else:  # head_dim
            assert got == value, key
