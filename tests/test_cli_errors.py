"""The CLI turns every user mistake into one line on stderr and exit code 2, before anything compiles."""

from __future__ import annotations

import subprocess
import sys

import pytest

from parscale_jax.cli import main
from parscale_jax.errors import ConfigError
from parscale_jax.errors import DataError
from conftest import SUBPROCESS_TIMEOUT

PREFIX = "parscale-jax train: error: "


def run_train(capsys, tmp_path, *args: str) -> tuple[int, str, list[str]]:
    """`parscale-jax train --run-dir TMP ARGS...` in-process: (exit code, stdout, stderr lines)."""
    run_dir = tmp_path / "run"
    code = main(["train", "--run-dir", str(run_dir), "--no-progress", *args])
    captured = capsys.readouterr()
    assert not (run_dir / "checkpoints").exists(), "the run must fail before training starts"
    assert not (run_dir / "config.yaml").exists()
    return code, captured.out, captured.err.splitlines()


def assert_one_error_line(lines: list[str], prefix: str, *fragments: str) -> None:
    assert len(lines) == 1, lines
    (line,) = lines
    assert line.startswith(prefix), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert "Traceback" not in line


CASES = {
    "indivisible heads": (["model.num_heads=5"], ["model.num_heads", "do not divide hidden_size"]),
    "unknown key": (["model.parscle_n=2"], ["model.parscle_n", "did you mean 'parscale_n'"]),
    "unknown section": (["modle.parscale_n=2"], ["modle", "did you mean 'model'"]),
    "bad type": (["train.steps=many"], ["train.steps", "expected an integer"]),
    "zero streams": (["model.parscale_n=0"], ["model.parscale_n", "P must be >= 1"]),
    "too long": (["data.seq_len=4096"], ["data.seq_len", "max_position_embeddings"]),
    "malformed": (["model.parscale_n"], ["model.parscale_n", "section.key=value"]),
    "unparsable": (["model.parscale_n=[2"], ["model.parscale_n", "cannot parse"]),
    "files without paths": (["data.corpus=files"], ["data.paths", "at least one path"]),
    "mesh larger than the devices": (["mesh.data=2"], ["mesh", "= 2 devices, but 1 are available"]),
    "two filled mesh axes": (["mesh.model=-1"], ["mesh.model", "only one axis may be -1"]),
    "streams not divisible": (["model.parscale_n=4", "mesh.stream=3"],
                              ["mesh.stream", "3 devices do not divide the 4 streams"]),
    # What must divide a mesh axis comes from the rules and the declared axes: the first dimension
    # that does not split is named.
    "vocabulary not divisible": (["mesh.model=3", "mesh.data=1"],
                                 ["mesh.model", "3 devices do not divide the 320 logits of a token (model.vocab_size)"]),
    "heads not divisible": (["mesh.model=3", "mesh.data=1", "model.vocab_size=384", "model.intermediate_size=384"],
                            ["mesh.model", "3 devices do not divide dimension 'heads' (128) of parameter "
                             "layers/self_attn/"]),
    "batch not divisible": (["mesh.data=3"], ["mesh.data", "micro-batch of 16 rows", "3 devices"]),
    "fsdp hidden not divisible": (["mesh.data=16", "mesh.fsdp=true", "model.hidden_size=120"],
                                  ["mesh.data", "16 devices do not divide dimension 'embed' (120) of parameter "
                                   "embed_tokens/embedding"]),
}


@pytest.mark.parametrize("overrides,fragments", CASES.values(), ids=CASES.keys())
def test_train_config_errors_are_one_line(capsys, tmp_path, overrides, fragments):
    code, out, err = run_train(capsys, tmp_path, *overrides)
    assert code == 2
    assert_one_error_line(err, PREFIX, *fragments)
    assert out == ""  # failed before printing the run directory
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides,fragments", CASES.values(), ids=CASES.keys())
def test_train_config_errors_raise_with_debug(capsys, tmp_path, overrides, fragments):
    with pytest.raises(ConfigError) as info:
        main(["--debug", "train", "--run-dir", str(tmp_path / "run"), *overrides])
    assert info.value.key == fragments[0] or info.value.key.startswith(fragments[0])
    assert capsys.readouterr().err == ""


def test_missing_config_file(capsys, tmp_path):
    missing = tmp_path / "nope.yaml"
    code, _, err = run_train(capsys, tmp_path, "--config", str(missing))
    assert code == 2
    assert_one_error_line(err, PREFIX, "--config", "file not found", str(missing))
    with pytest.raises(ConfigError) as info:
        main(["--debug", "train", "--run-dir", str(tmp_path / "run"), "--config", str(missing)])
    assert info.value.key == "--config"


def test_unknown_shipped_config_name(capsys, tmp_path):
    code, _, err = run_train(capsys, tmp_path, "--config", "paper_9b")
    assert code == 2
    assert_one_error_line(err, PREFIX, "--config", "no config named 'paper_9b'", "paper_1.6b")


def test_invalid_yaml_config(capsys, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    code, _, err = run_train(capsys, tmp_path, "--config", str(path))
    assert code == 2
    assert_one_error_line(err, PREFIX, "--config", "not valid YAML")


def test_error_in_a_config_file_names_the_dotted_key(capsys, tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  num_kv_heads: 3\n")
    code, _, err = run_train(capsys, tmp_path, "--config", str(path))
    assert code == 2
    assert_one_error_line(err, PREFIX, "model.num_kv_heads", "do not divide num_heads")


def test_shipped_config_with_a_bad_override(capsys, tmp_path):
    code, _, err = run_train(capsys, tmp_path, "--config", "paper_0.5b", "train.grad_accum=3")
    assert code == 2
    assert_one_error_line(err, PREFIX, "train.grad_accum", "do not divide train.batch_size")


def test_missing_corpus_path_is_a_data_error(capsys, tmp_path):
    missing = tmp_path / "nonexistent"
    code, _, err = run_train(capsys, tmp_path, "data.corpus=files", f"data.paths=[{missing}]")
    assert code == 2
    assert_one_error_line(err, PREFIX, "data.paths", "not found", str(missing))
    with pytest.raises(DataError, match="not found"):
        main(["--debug", "train", "--run-dir", str(tmp_path / "run"), "data.corpus=files",
              f"data.paths=[{missing}]"])


def test_eval_without_a_run_directory_config(capsys, tmp_path):
    code = main(["eval", "--run-dir", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 2
    assert_one_error_line(captured.err.splitlines(), "parscale-jax eval: error: ", "--run-dir", "config.yaml",
                          str(tmp_path))
    with pytest.raises(ConfigError) as info:
        main(["--debug", "eval", "--run-dir", str(tmp_path)])
    assert info.value.key == "--run-dir"


def test_eval_with_a_bad_override_on_a_saved_config(capsys, tmp_path):
    (tmp_path / "config.yaml").write_text("model:\n  parscale_n: 2\n")
    code = main(["eval", "--run-dir", str(tmp_path), "model.parscale_n_tokens=-1"])
    assert code == 2
    assert_one_error_line(capsys.readouterr().err.splitlines(), "parscale-jax eval: error: ",
                          "model.parscale_n_tokens")


def test_resuming_run_directory_config_is_validated_with_overrides(capsys, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("train:\n  steps: 10\n  warmup_steps: 5\n")
    code = main(["train", "--run-dir", str(run_dir), "train.steps=3"])
    assert code == 2
    assert_one_error_line(capsys.readouterr().err.splitlines(), PREFIX, "train.warmup_steps",
                          "train.steps=3")
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval", "--run-dir", "somewhere", "--batches", "soon"])
    assert info.value.code == 2
    assert "invalid int value" in capsys.readouterr().err


def test_command_line_error_in_a_subprocess_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "parscale_jax.cli", "train", "--run-dir", str(tmp_path / "run"),
         "model.parscale_n=0"],
        capture_output=True, text=True, cwd=tmp_path, timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert_one_error_line(lines, PREFIX, "model.parscale_n", "P must be >= 1, got 0")
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "run").exists()
    assert list(tmp_path.iterdir()) == []  # nothing written where it ran


@pytest.mark.parametrize("args,fragment", [
    (["--coordinator", "127.0.0.1:9999"], "--coordinator: a coordinator address also needs --num-processes"),
    (["--coordinator", "127.0.0.1:9999", "--num-processes", "2", "--process-id", "2"],
     "--process-id: must lie in [0, 2), got 2"),
    (["--num-processes", "2", "--process-id", "0"], "--num-processes/--process-id need a coordinator address"),
])
def test_multi_host_flags_are_checked_before_joining(capsys, tmp_path, args, fragment):
    code = main([*args, "train", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert_one_error_line(err, PREFIX, fragment)
    assert not (tmp_path / "run").exists()


def test_multi_host_environment_variables_are_checked(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PARSCALE_COORDINATOR", "127.0.0.1:9999")
    monkeypatch.setenv("PARSCALE_NUM_PROCESSES", "two")
    code = main(["train", "--run-dir", str(tmp_path / "run")])
    assert code == 2
    assert_one_error_line(capsys.readouterr().err.splitlines(), PREFIX,
                          "PARSCALE_NUM_PROCESSES: expected an integer, got 'two'")


def test_token_ids_outside_the_vocabulary(capsys, tmp_path):
    code, _, err = run_train(capsys, tmp_path, "model.vocab_size=128")
    assert code == 2
    assert_one_error_line(err, PREFIX, "the tokenizer has 257 tokens but model.vocab_size is 128")


def test_an_empty_corpus_file(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    code, _, err = run_train(capsys, tmp_path, "data.corpus=files", f"data.paths=[{empty}]")
    assert code == 2
    assert_one_error_line(err, PREFIX, "holds no non-empty documents")


def test_a_prompt_longer_than_the_models_positions(capsys, tmp_path):
    (tmp_path / "config.yaml").write_text("model:\n  max_position_embeddings: 16\ndata:\n  seq_len: 16\n")
    code = main(["generate", "--run-dir", str(tmp_path), "--prompt", "x" * 20])
    assert code == 2
    assert_one_error_line(capsys.readouterr().err.splitlines(), "parscale-jax generate: error: ", "--prompt",
                          "a prompt of 20 tokens leaves no room", "max_position_embeddings=16")
