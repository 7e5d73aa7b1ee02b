"""What a new user hit on a first try, each with the command that showed it: the run's files follow it
from any directory, the defaults fit short runs and other tokenizers, and commands say what they did
(or did not do) instead of doing it silently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
import yaml
from conftest import TINY

from parscale_jax.cli import main
from parscale_jax.config import load_config, packaged_config_path
from parscale_jax.data import pipeline
from parscale_jax.errors import DataError
from parscale_jax.interop import hf


def bpe_tokenizer(path: Path, vocab_size: int) -> Path:
    """A byte-level BPE tokenizer with about `vocab_size` tokens, trained here on a little English."""
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    text = " ".join(f"word{i} and another{i % 37} thing{i % 11}" for i in range(3000))
    tokenizer.train_from_iterator([text], trainer)
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 4-step run trained from a directory of its own, with its tokenizer named by a relative path."""
    home = tmp_path_factory.mktemp("home")
    (home / "bpe.json").write_text(hf.byte_tokenizer_json())
    directory = home / "run"
    previous = Path.cwd()
    try:
        import os

        os.chdir(home)
        assert main(["train", "--run-dir", str(directory), "--no-progress", *TINY, "train.steps=4",
                     "checkpoint.every=2", "data.tokenizer=bpe.json", "model.max_position_embeddings=48"]) == 0
    finally:
        os.chdir(previous)
    return directory


def test_a_run_made_with_relative_paths_works_from_any_directory(run_dir, monkeypatch, capsys):
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["tokenizer"] == str(run_dir.parent / "bpe.json")  # resolved when the run was made
    monkeypatch.chdir("/")  # `cd / && parscale-jax eval --run-dir /abs/run`
    assert main(["eval", "--run-dir", str(run_dir), "--batches", "1"]) == 0
    # An older run whose config holds a relative path: it is read from the current directory, and
    # where it is not there the message names the key and the path it looked for.
    saved["data"]["tokenizer"] = "bpe.json"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    try:
        capsys.readouterr()
        assert main(["eval", "--run-dir", str(run_dir), "--batches", "1"]) == 2
        assert "error: data.tokenizer: file not found: /bpe.json" in capsys.readouterr().err
    finally:
        saved["data"]["tokenizer"] = str(run_dir.parent / "bpe.json")
        (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))


def test_a_short_run_of_the_default_config_needs_no_warmup_setting():
    """`train train.steps=20` failed on the default warmup of 30 steps: left out, warmup is a tenth."""
    assert load_config(packaged_config_path("default"), ["train.steps=20"]).train.warmup_steps == 2
    assert load_config(packaged_config_path("default")).train.warmup_steps == 30  # the quickstart's, as before


def test_the_vocabulary_follows_the_tokenizer_unless_set(tmp_path):
    bpe = bpe_tokenizer(tmp_path / "bpe.json", 600)
    size = tokenizers.Tokenizer.from_file(str(bpe)).get_vocab_size()
    assert 512 < size <= 600
    config = load_config(packaged_config_path("default"), [f"data.tokenizer={bpe}"])
    assert config.model.vocab_size == 640  # rounded up to a multiple of 64
    assert load_config(packaged_config_path("default")).model.vocab_size == 320  # bytes: 257 -> 320
    too_small = load_config(packaged_config_path("default"), [f"data.tokenizer={bpe}", "model.vocab_size=320"])
    with pytest.raises(DataError, match=f"the tokenizer has {size} tokens but model.vocab_size is 320; set "
                                        "model.vocab_size=640"):
        pipeline.train_dataset(too_small)


def test_generating_past_the_position_limit_says_so(run_dir, capsys):
    assert main(["generate", "--run-dir", str(run_dir), "--prompt", "To be", "--max-new-tokens", "100"]) == 0
    err = capsys.readouterr().err
    assert ("--max-new-tokens 100: after a prompt of 5 tokens only 43 fit within model.max_position_embeddings=48; "
            "generating at most those") in err


def test_stop_at_says_what_it_does(run_dir, capsys):
    assert main(["train", "--run-dir", str(run_dir), "--no-progress", "--stop-at", "-3"]) == 2
    assert "error: --stop-at: must be a step >= 1, got -3" in capsys.readouterr().err
    assert main(["train", "--run-dir", str(run_dir), "--no-progress", "--stop-at", "2"]) == 0
    assert f"{run_dir} is complete: 4 of 4 steps" in capsys.readouterr().out


def test_a_resumed_run_says_where_it_continues_and_a_finished_one_that_it_is_complete(tmp_path, capsys):
    args = ["train", "--run-dir", str(tmp_path / "run"), "--no-progress", *TINY, "train.steps=4", "checkpoint.every=2"]
    assert main([*args, "--stop-at", "2"]) == 0
    capsys.readouterr()
    assert main([*args, "--stop-at", "2"]) == 0
    assert f"{tmp_path / 'run'} is at step 2 already, at or past --stop-at 2; nothing to train" in capsys.readouterr().out
    assert main(args) == 0
    assert f"resuming at step 2 of 4 from {tmp_path / 'run' / 'checkpoints'}" in capsys.readouterr().out
    assert main(args) == 0
    out = capsys.readouterr().out
    assert (f"{tmp_path / 'run'} is complete: 4 of 4 steps (train.steps); nothing to train. Continue it with a "
            "larger train.steps and --override-config") in out


def test_info_shows_a_runs_state(run_dir, capsys):
    assert main(["info", "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"run          {run_dir}" in out
    assert "steps        4 of 4 (complete)" in out
    assert "checkpoints  2, 4" in out
    assert "lineage\n  init: seed 0" in out
    # Every setting the run changed from the shipped default, with its value.
    assert "  model.hidden_size = 32" in out and "  train.steps = 4" in out
    assert f"  data.tokenizer = '{run_dir.parent / 'bpe.json'}'" in out
    assert "loss" in out and "model        hidden 32, MLP 64, 4 heads (2 kv), 2 layers, P = 2" in out


def test_info_of_a_transformed_run_shows_its_parents(run_dir, tmp_path, capsys):
    assert main(["upscale", "--from", str(run_dir), "--out", str(tmp_path / "deep"), "--drop", "1"]) == 0
    capsys.readouterr()
    assert main(["info", "--run-dir", str(tmp_path / "deep")]) == 0
    out = capsys.readouterr().out
    assert "steps        0 of 4 (in progress)" in out
    assert "(and starting weights as step 0)" in out
    assert "upscale: method solar, layer_map [0, 1], identity_layers []" in out
    assert f"from run {run_dir} at step 4" in out and "init: seed 0" in out
    lineage = json.loads((tmp_path / "deep" / "lineage.json").read_text())
    assert lineage["made_from"] == "upscale" and [p["kind"] for p in lineage["parents"]] == ["run"]
