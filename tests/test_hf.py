"""Hugging Face interop: import Qwen2/Llama checkpoints, export ours, load them in transformers 5.

transformers and torch (CPU) build the reference models here; no hub is contacted.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from parscale_jax.interop import hf
from parscale_jax.cli import main
from parscale_jax.config import load_config
from parscale_jax.errors import ConfigError
from parscale_jax.model import init_params, model_graphdef, split_params
from conftest import TINY as BASE

REFERENCE = Path(__file__).parent / "data" / "official_reference"
SHAPE = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0)
OUR_TINY = [*BASE, "model.hidden_size=64", "model.intermediate_size=128", "model.parscale_n=1", "model.init_std=0.1",
            "model.max_position_embeddings=128", "train.batch_size=4"]
TEXT = "Now is the winter of our discontent — ça va? 🙂"


def our_logits(params, cfg, ids, mask=None) -> np.ndarray:
    model = nnx.merge(model_graphdef(cfg), nnx.State(jax.tree.map(np.asarray, params)))
    return np.asarray(model(np.asarray(ids), None, None if mask is None else np.asarray(mask))[0])


def our_greedy(params, cfg, prompt, new_tokens) -> list[int]:
    """Greedy decoding by recomputing the whole sequence each step (no cache to get wrong)."""
    ids = list(prompt)
    for _ in range(new_tokens):
        ids.append(int(our_logits(params, cfg, [ids])[0, -1].argmax()))
    return ids


def torch_logits(model, ids, mask=None) -> np.ndarray:
    with torch.no_grad():
        kwargs = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(ids), **kwargs).logits.float().numpy()


def random_hf_model(kind: str, tie: bool, seed: int = 0):
    """A tiny transformers Qwen2 or Llama with weights far from their initial values."""
    torch.manual_seed(seed)
    if kind == "qwen2":
        config = transformers.Qwen2Config(**SHAPE, tie_word_embeddings=tie)
        model = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.LlamaConfig(**SHAPE, tie_word_embeddings=tie, attention_bias=False)
        model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            tensor.copy_(1.0 + 0.1 * torch.randn_like(tensor) if "norm" in name else 0.1 * torch.randn_like(tensor))
    return model.eval()


def load_hf(directory, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, trust_remote_code=True, dtype=torch.float32, **kwargs)


pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, 257, (2, 24))


# --- Import -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,tie,shard", [("qwen2", True, None), ("qwen2", False, "40KB"), ("llama", False, None)])
def test_imported_qwen2_and_llama_give_transformers_logits(tmp_path, ids, kind, tie, shard):
    model = random_hf_model(kind, tie)
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard)
    cfg, params = hf.read_hf_checkpoint(tmp_path)
    assert cfg.qkv_bias == (kind == "qwen2") and cfg.tie_embeddings == tie and cfg.parscale_n == 1
    np.testing.assert_allclose(our_logits(params, cfg, ids), torch_logits(model, ids), atol=1e-4, rtol=0)


def test_transformers5_rope_parameters_are_read(tmp_path):
    model = random_hf_model("qwen2", True)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_theta", None)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 5000.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert hf.read_hf_checkpoint(tmp_path)[0].rope_theta == 5000.0
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="RoPE scaling 'llama3' is not supported"):
        hf.read_hf_checkpoint(tmp_path)


# --- Export -----------------------------------------------------------------------------------


@pytest.mark.parametrize("P", [1, 4])
def test_exported_model_loads_in_transformers_with_our_logits_and_tokens(tmp_path, ids, P):
    config = load_config(overrides=[*OUR_TINY, f"model.parscale_n={P}"])
    params = jax.jit(lambda: init_params(config.model, 1))()
    out = hf.write_hf_checkpoint(tmp_path / "hf", params, config.model, "byte")
    exported = json.loads((out / "config.json").read_text())
    assert exported["model_type"] == ("qwen2" if P == 1 else "qwen2_parscale")
    assert (out / "modeling_qwen2_parscale.py").exists() == (P > 1)

    model, info = load_hf(out, output_loading_info=True)
    model.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(model).__name__ == ("Qwen2ForCausalLM" if P == 1 else "Qwen2ParScaleForCausalLM")
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    np.testing.assert_allclose(torch_logits(model, ids), our_logits(params, config.model, ids), atol=1e-4, rtol=0)
    real = mask.astype(bool)  # left padding: compare the real positions
    np.testing.assert_allclose(torch_logits(model, ids, mask)[real], our_logits(params, config.model, ids, mask)[real],
                               atol=1e-4, rtol=0)

    prompt = [int(t) for t in ids[0, :6]]
    generated = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                               attention_mask=torch.ones(1, 6, dtype=torch.long))
    assert generated[0].tolist() == our_greedy(params, config.model, prompt, 10)

    tokenizer = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    encoded = tokenizer(TEXT)["input_ids"]
    assert encoded == list(TEXT.encode("utf-8"))  # our byte-level ids
    assert tokenizer.decode(encoded) == TEXT and tokenizer.eos_token_id == 256


def test_llama_shape_exports_as_llama(tmp_path, ids):
    config = load_config(overrides=[*OUR_TINY, "model.qkv_bias=false", "model.tie_embeddings=false"])
    params = jax.jit(lambda: init_params(config.model, 2))()
    out = hf.write_hf_checkpoint(tmp_path / "hf", params, config.model, "byte", dtype="float32")
    model = load_hf(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    np.testing.assert_allclose(torch_logits(model, ids), our_logits(params, config.model, ids), atol=1e-4, rtol=0)


def test_export_then_import_is_the_identity(tmp_path):
    config = load_config(overrides=[*OUR_TINY, "model.parscale_n=4", "model.tie_embeddings=false"])
    params = jax.tree.map(np.asarray, jax.jit(lambda: init_params(config.model, 3))())
    out = hf.write_hf_checkpoint(tmp_path / "hf", params, config.model, "byte", max_shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # really sharded
    cfg, back = hf.read_hf_checkpoint(out)
    assert cfg == config.model
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_official_checkpoint_survives_import_and_export_unchanged(tmp_path):
    """Same names, shapes and values as the official code saved: it can load what we write."""
    cfg, params = hf.read_hf_checkpoint(REFERENCE / "tiny_p4")
    out = hf.write_hf_checkpoint(tmp_path / "hf", params, cfg, "byte")
    ours = load_file(str(out / "model.safetensors"))
    official = load_file(str(REFERENCE / "tiny_p4" / "model.safetensors"))
    assert sorted(ours) == sorted(official)
    for name, tensor in official.items():
        np.testing.assert_array_equal(ours[name], tensor, err_msg=name)
    exported = json.loads((out / "config.json").read_text())
    reference = json.loads((REFERENCE / "tiny_p4" / "config.json").read_text())
    for key in ("parscale_n", "parscale_n_tokens", "parscale_attn_smooth", "hidden_size", "num_key_value_heads"):
        assert exported[key] == reference[key], key


def test_block_wise_aggregator_columns_would_be_caught(tmp_path, ids):
    """Writing the aggregator input stream-major instead of interleaved changes transformers' logits."""
    cfg, params = hf.read_hf_checkpoint(REFERENCE / "tiny_p4")
    out = hf.write_hf_checkpoint(tmp_path / "hf", params, cfg, "byte")
    tensors = load_file(str(out / "model.safetensors"))
    np.testing.assert_array_equal(tensors["model.aggregate_layer.0.weight"],
                                  hf.aggregator_kernel_to_hf(np.asarray(params["aggregate_in_kernel"]), 4))
    good = torch_logits(load_hf(out), ids % 256)
    np.testing.assert_allclose(good, our_logits(params, cfg, ids % 256), atol=1e-4, rtol=0)
    wrong = dict(tensors, **{"model.aggregate_layer.0.weight": np.ascontiguousarray(params["aggregate_in_kernel"].T)})
    from safetensors.numpy import save_file

    save_file(wrong, str(out / "model.safetensors"), metadata={"format": "pt"})
    assert np.abs(torch_logits(load_hf(out), ids % 256) - good).max() > 1e-2


def test_bfloat16_export(tmp_path, ids):
    config = load_config(overrides=[*OUR_TINY, "model.parscale_n=2"])
    params = jax.jit(lambda: init_params(config.model, 1))()
    out = hf.write_hf_checkpoint(tmp_path / "hf", params, config.model, "byte", dtype="bfloat16")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert next(model.parameters()).dtype == torch.bfloat16
    cfg, back = hf.read_hf_checkpoint(out)
    assert back["embed_tokens"]["embedding"].dtype.name == "bfloat16"


# --- Run directories: import, train, PEFT, dynamic P, export -----------------------------------


def run(*argv: str) -> int:
    return main(["--debug", *argv])


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("qwen")
    random_hf_model("qwen2", True, seed=5).save_pretrained(directory)
    return directory


PEFT_TRAIN = ["train.steps=3", "train.warmup_steps=1", "train.eval_every=0", "train.log_every=1",
              "data.seq_len=32", "train.batch_size=4", "train.lr=1e-2", "model.parscale_n_tokens=4"]


@pytest.fixture(scope="module")
def peft_run(tmp_path_factory, qwen_dir) -> Path:
    """A P = 1 Qwen2 imported with P raised to 2, then only the new streams trained; then P = 4 too."""
    run_dir = tmp_path_factory.mktemp("peft") / "run"
    assert run("import", "--hf", str(qwen_dir), "--out", str(run_dir), "model.parscale_n=2",
               "train.trainable=parscale", *PEFT_TRAIN) == 0
    assert run("train", "--run-dir", str(run_dir), "--no-progress") == 0
    assert run("train", "--run-dir", str(run_dir), "--no-progress", "model.parscale_n=4") == 0
    return run_dir


def test_peft_trains_only_the_streams_and_leaves_the_backbone_bitwise(peft_run, qwen_dir):
    _, imported = hf.read_hf_checkpoint(qwen_dir)
    for P in (2, 4):
        params, step, config = restored(peft_run, f"model.parscale_n={P}")
        assert step == 3
        streams, backbone = split_params(params, config.model)
        jax.tree.map(np.testing.assert_array_equal, backbone, imported)  # bitwise
        fresh, _ = split_params(jax.tree.map(np.asarray, init_params(config.model, config.train.seed)), config.model)
        changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), streams, fresh)
        assert all(jax.tree.leaves(changed)), changed
    # The optimizer state exists for the streams only.
    metadata = json.loads((peft_run / "checkpoints_p2" / "3" / "state" / "_METADATA").read_text())
    moments = [k for k in metadata["tree_metadata"] if "opt_state" in k and "mu" in k]
    assert moments and all(("prefix" in k or "aggregate" in k) for k in moments), moments


def restored(run_dir: Path, *overrides: str, step: int | None = None):
    """(parameters as numpy, their step, the config) of a run's newest checkpoint (or starting weights)."""
    from parscale_jax.layout import Layout
    from parscale_jax.runs import Run

    run = Run.open(run_dir, overrides)
    layout = Layout.create(run.config)
    with jax.set_mesh(layout.mesh):
        params, step = run.params(layout, step)
    return jax.tree.map(np.asarray, params), step, run.config


def test_dynamic_p_picks_a_stream_set_for_eval_and_export(peft_run, tmp_path, ids, capsys):
    assert sorted(p.name for p in peft_run.iterdir() if p.name.startswith("checkpoints")) == \
        ["checkpoints_p2", "checkpoints_p4"]
    losses = {}
    for P in (2, 4):
        assert run("eval", "--run-dir", str(peft_run), "--batches", "2", f"model.parscale_n={P}",
                   "--out", str(tmp_path / f"eval{P}.json")) == 0
        losses[P] = json.loads((tmp_path / f"eval{P}.json").read_text())["loss"]
        out = tmp_path / f"hf{P}"
        assert run("export", "--run-dir", str(peft_run), "--out", str(out), f"model.parscale_n={P}") == 0
        assert json.loads((out / "config.json").read_text())["parscale_n"] == P
        cfg, params = hf.read_hf_checkpoint(out)
        np.testing.assert_allclose(torch_logits(load_hf(out), ids[:, :16] % 256),
                                   our_logits(params, cfg, ids[:, :16] % 256), atol=1e-4, rtol=0)
    assert losses[2] != losses[4]


def test_imported_run_trains_all_weights_with_new_streams(tmp_path, qwen_dir):
    run_dir = tmp_path / "run"
    assert run("import", "--hf", str(qwen_dir), "--out", str(run_dir), "model.parscale_n=2", *PEFT_TRAIN) == 0
    start, step, config = restored(run_dir)
    assert step == 0
    assert run("train", "--run-dir", str(run_dir), "--no-progress", "train.steps=2") == 0
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))
    trained, step, _ = restored(run_dir)
    assert step == 2
    # Every tensor moved: the imported backbone and the new streams alike.
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), trained, start)
    assert all(jax.tree.leaves(moved)), moved
    _, imported = hf.read_hf_checkpoint(qwen_dir)
    jax.tree.map(np.testing.assert_array_equal, split_params(start, config.model)[1], imported)


@pytest.mark.parametrize("P", [1, 2])
def test_an_imported_run_is_usable_before_it_trains(tmp_path, qwen_dir, ids, capsys, P):
    """eval, generate and export work on the starting weights (step 0) right after the import."""
    run_dir, out = tmp_path / "run", tmp_path / "hf"
    assert run("import", "--hf", str(qwen_dir), "--out", str(run_dir), f"model.parscale_n={P}", *PEFT_TRAIN) == 0
    lineage = json.loads((run_dir / "lineage.json").read_text())
    assert lineage["made_from"] == "import" and lineage["parents"] == [{"kind": "huggingface",
                                                                       "path": str(qwen_dir.absolute())}]
    assert lineage["new_streams"] == (P > 1)
    capsys.readouterr()
    assert run("eval", "--run-dir", str(run_dir), "--batches", "1") == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 0 and np.isfinite(result["loss"])
    assert run("generate", "--run-dir", str(run_dir), "--prompt", "To be", "--max-new-tokens", "4") == 0
    assert capsys.readouterr().out.startswith("To be")
    assert run("export", "--run-dir", str(run_dir), "--out", str(out)) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 0
    exported = torch_logits(load_hf(out), ids % 256)
    if P == 1:  # the checkpoint itself, unchanged
        reference = torch_logits(transformers.AutoModelForCausalLM.from_pretrained(qwen_dir), ids % 256)
        np.testing.assert_allclose(exported, reference, atol=1e-5, rtol=0)
    cfg, params = hf.read_hf_checkpoint(out)
    np.testing.assert_allclose(exported, our_logits(params, cfg, ids % 256), atol=1e-4, rtol=0)


@pytest.mark.parametrize("args,fragment", [
    (["model.hidden_size=32"], "model.hidden_size: is fixed by the checkpoint (64)"),
    (["train.trainable=parscale"], "train.trainable: 'parscale' trains the prefixes and aggregator"),
])
def test_import_refuses_bad_overrides(tmp_path, qwen_dir, args, fragment):
    with pytest.raises(ConfigError) as info:
        run("import", "--hf", str(qwen_dir), "--out", str(tmp_path / "run"), "data.seq_len=32", *args)
    assert fragment in str(info.value)
    assert not (tmp_path / "run").exists()


def test_export_refuses_a_non_empty_directory(tmp_path, peft_run, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", "--run-dir", str(peft_run), "--out", str(out)]) == 2
    assert "exists and is not empty (pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["export", "--run-dir", str(peft_run), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".taken")]  # no temporary left


def test_import_of_an_unsupported_model_is_one_line(tmp_path, capsys):
    source = tmp_path / "gpt"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert main(["import", "--hf", str(source), "--out", str(tmp_path / "run")]) == 2
    assert "model_type 'gpt2' is not supported" in capsys.readouterr().err


def test_official_checkpoints_import_into_a_run(tmp_path):
    shutil.copytree(REFERENCE / "tiny_p2", tmp_path / "p2")
    assert run("import", "--hf", str(tmp_path / "p2"), "--out", str(tmp_path / "run")) == 0
    assert (tmp_path / "run" / "initial" / "parscale_p2").exists()


def test_a_users_tokenizer_is_shipped_as_is_padding_on_the_left(tmp_path):
    source = tmp_path / "mine" / "tokenizer.json"
    source.parent.mkdir()
    source.write_text(hf.byte_tokenizer_json())
    config = load_config(overrides=[*OUR_TINY, f"data.tokenizer={source}"])
    params = jax.jit(lambda: init_params(config.model, 0))()
    out = hf.write_hf_checkpoint(tmp_path / "hf", params, config.model, config.data.tokenizer)
    assert (out / "tokenizer.json").read_text() == source.read_text()
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == hf.BYTE_EOS
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 256
    assert oct((out / "model.safetensors").stat().st_mode & 0o777) == oct((out / "config.json").stat().st_mode & 0o777)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.decode(tokenizer(TEXT)["input_ids"]) == TEXT
    # A decoder-only model generates a batch from left-padded prompts; the shipped tokenizer pads so,
    # whether it is ours or the user's (whose own tokenizer_config.json comes along).
    assert tokenizer.padding_side == "left"
    (source.parent / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    out = hf.write_hf_checkpoint(tmp_path / "hf2", params, config.model, config.data.tokenizer)
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"model_max_length": 77, "padding_side": "left"}
    byte = hf.write_hf_checkpoint(tmp_path / "hf3", params, config.model, "byte")
    assert transformers.AutoTokenizer.from_pretrained(byte).padding_side == "left"


@pytest.mark.parametrize("damage,fragment", [
    ("drop", "lacks tensor model.layers.1.mlp.up_proj.weight that its config.json implies"),
    ("reshape", "tensor model.layers.1.mlp.up_proj.weight has shape [64, 128], but config.json implies [128, 64]"),
    ("truncate", "model.safetensors cannot be read: "),
])
def test_a_damaged_hf_checkpoint_is_one_line(tmp_path, qwen_dir, capsys, damage, fragment):
    from safetensors.numpy import load_file, save_file

    source = tmp_path / "hf"
    shutil.copytree(qwen_dir, source)
    weights = source / "model.safetensors"
    tensors = load_file(weights)
    name = "model.layers.1.mlp.up_proj.weight"
    if damage == "drop":
        del tensors[name]
        save_file(tensors, weights)
    elif damage == "reshape":
        tensors[name] = np.ascontiguousarray(tensors[name].T)
        save_file(tensors, weights)
    else:
        weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["import", "--hf", str(source), "--out", str(tmp_path / "run")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("parscale-jax import: error: --hf: ") and fragment in line
    assert not (tmp_path / "run").exists()
