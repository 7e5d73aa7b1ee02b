"""Branch-Train-Merge: `branch` (one expert run per data domain, each starting as the seed run and
reading only its own data; `--train` trains them, resumably) and `merge` (an average of runs, or
their MLPs as the experts of a Mixture-of-Experts)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax.nnx.traversals import flatten_mapping

from conftest import TINY, step0_logits
from parscale_jax.config import load_config
from parscale_jax.training.loop import train

# Two domains that share no letter: a row's text says which one it came from.
ALPHABETS = {"abc": "abcde", "xyz": "vwxyz"}
LAYOUT = " \n"  # what separates the words of either


def documents(letters: str, count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["\n".join(" ".join("".join(rng.choice(list(letters), rng.integers(2, 7))) for _ in range(8))
                      for _ in range(6)) for _ in range(count)]


@pytest.fixture(scope="module")
def domains(tmp_path_factory) -> dict[str, Path]:
    """abc: a folder of text files; xyz: a prepared dataset (`prepare`)."""
    from parscale_jax.data.prepare import prepare

    root = tmp_path_factory.mktemp("domains")
    for name, letters in ALPHABETS.items():
        (root / name).mkdir()
        for i, doc in enumerate(documents(letters, 30, seed=len(name) + ord(letters[0]))):
            (root / name / f"doc{i:02d}.txt").write_text(doc)
    prepare(str(root / "xyz_prepared"), [str(root / "xyz")], eval_fraction=0.1, progress=False)
    return {"abc": root / "abc", "xyz": root / "xyz_prepared"}


def all_params(run_dir: Path, step: int | None = None) -> dict[str, np.ndarray]:
    from parscale_jax.layout import Layout
    from parscale_jax.runs import Run

    run = Run.open(run_dir)
    layout = Layout.create(run.config)
    with jax.set_mesh(layout.mesh):
        params, _ = run.params(layout, step)
    return {"/".join(path): np.asarray(x) for path, x in flatten_mapping(params).items()}


def assert_same_params(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def domain_text(config, split: str) -> str:
    """The text of the first batch the run's pipeline yields (training rows, or held-out ones)."""
    from parscale_jax.data import pipeline
    from parscale_jax.data.tokenizer import ByteTokenizer

    batch = next(iter(pipeline.train_dataset(config))) if split == "train" else next(pipeline.eval_batches(config))
    return ByteTokenizer().decode(np.asarray(batch["tokens"])[np.asarray(batch["loss_mask"]) > 0])


# ---------------------------------------------------------------------------------------------
# Branch


@pytest.mark.parametrize("P", [1, 2])
def test_branching_is_exact_and_each_expert_reads_only_its_domain(dense_runs, domains, tmp_path, P, capsys):
    from parscale_jax.cli import main
    from parscale_jax.model import abstract_params, split_params
    from parscale_jax.runs import Run

    seed, out = dense_runs[P], tmp_path / "btm"
    args = ["branch", "--from", str(seed), "--out", str(out), "--domain", f"abc={domains['abc']}",
            "--domain", f"xyz={domains['xyz']}", "--domain", "play=shakespeare", "train.lr=1e-3"]
    assert main(args) == 0
    assert capsys.readouterr().out.count("(made)") == 3
    want, seed_config = all_params(seed), Run.open(seed).config
    for name, data in (("abc", {"corpus": "files", "paths": (str(domains["abc"]),), "sources": ()}),
                       ("xyz", {"paths": (), "sources": (str(domains["xyz"]),)}),
                       ("play", {"corpus": "shakespeare", "paths": (), "sources": ()})):
        run = Run.open(out / name)
        assert_same_params(all_params(out / name, 0), want)  # every weight, the streams' included
        assert run.config.model == seed_config.model and run.config.train.lr == 1e-3
        got = {key: getattr(run.config.data, key) for key in data}
        got["sources"] = tuple(s.path for s in got.get("sources", ()))
        assert got == data, name
        lineage = run.lineage()
        assert lineage["made_from"] == "branch" and lineage["domain"] == name and not lineage["streams_only"]
        assert lineage["parents"][0]["path"] == str(seed.absolute()) and lineage["parents"][0]["step"] == 2
    manifest = json.loads((out / "branch.json").read_text())
    assert manifest["seed"] == str(seed.absolute()) and manifest["seed_step"] == 2 and len(manifest["domains"]) == 3
    # The same command again changes nothing.
    assert main(args) == 0
    assert capsys.readouterr().out.count("(made already)") == 3
    if P == 1:
        return
    # Each expert's pipeline yields rows of its own domain's text, for training and evaluation alike.
    for name, letters in ALPHABETS.items():
        config = Run.open(out / name).config
        for split in ("train", "eval"):
            text = domain_text(config, split)
            assert len(text) > 100 and set(text) <= set(letters + LAYOUT), (name, split)
    assert set(domain_text(Run.open(out / "play").config, "train")) - set("abcdevwxyz" + LAYOUT)
    # Stream-level experts: the same weights, only the streams train, on the seed's frozen backbone.
    streams = tmp_path / "streams"
    assert main(["branch", "--from", str(seed), "--out", str(streams), "--streams-only",
                 "--domain", f"abc={domains['abc']}", "train.steps=1", "train.warmup_steps=0"]) == 0
    run = Run.open(streams / "abc")
    assert run.config.train.trainable == "parscale" and run.lineage()["streams_only"]
    assert_same_params(all_params(streams / "abc", 0), want)
    assert main(["train", "--run-dir", str(streams / "abc"), "--no-progress"]) == 0
    trained = all_params(streams / "abc")
    moved = {name for name in want if not np.array_equal(trained[name], want[name])}
    streams_params, _ = split_params(abstract_params(run.config.model), run.config.model)
    assert moved and moved <= {"/".join(path) for path in flatten_mapping(streams_params)}, moved


def test_branch_train_skips_finished_experts_and_resumes_a_cut_off_one(dense_runs, domains, tmp_path, capsys):
    from parscale_jax.cli import main
    from parscale_jax.transforms.branch import branch, train_experts

    seed, cut, whole = dense_runs[2], tmp_path / "cut", tmp_path / "whole"
    settings = ["train.steps=2", "train.warmup_steps=1"]
    abc, xyz = f"abc={domains['abc']}", f"xyz={domains['xyz']}"
    # Killed while training its second expert, after step 1 of 2.
    branch(seed, cut, [abc, xyz], settings)
    results = train_experts(cut, lambda config, run_dir: train(config, run_dir, progress=False,
                                                                stop_at=1 if run_dir.name == "xyz" else None))
    assert [r["expert"] for r in results] == ["abc"]
    assert sorted(p.name for p in (cut / "xyz" / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
    capsys.readouterr()
    command = ["branch", "--from", str(seed), "--domain", abc, "--domain", xyz, *settings, "--train", "--no-progress"]
    assert main([*command, "--out", str(cut)]) == 0
    out = capsys.readouterr().out
    assert "abc: finished already" in out and "resuming at step 1" in out and "2 of 2 experts trained" in out
    # The resumed expert ends where one trained without a break does.
    assert main(["branch", "--from", str(seed), "--out", str(whole), "--domain", xyz, *settings, "--train",
                 "--no-progress"]) == 0
    resumed, straight = (json.loads((path / "xyz" / "result.json").read_text()) for path in (cut, whole))
    assert resumed["eval_loss"] == straight["eval_loss"] and resumed["train_loss"] == straight["train_loss"]
    assert_same_params(all_params(cut / "xyz"), all_params(whole / "xyz"))
    # Finished: nothing trains again.
    metrics = (cut / "xyz" / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main([*command, "--out", str(cut)]) == 0
    assert capsys.readouterr().out.count("finished already") == 2
    assert (cut / "xyz" / "metrics.jsonl").read_text() == metrics


def test_branch_refuses_bad_inputs_in_one_line_writing_nothing(dense_runs, domains, tmp_path, capsys):
    from parscale_jax.cli import main

    seed, bad = str(dense_runs[2]), tmp_path / "bad"
    abc = f"abc={domains['abc']}"
    cases = [(["--domain", f"abc={tmp_path / 'nowhere'}"], "nowhere: not found"),
             (["--domain", abc, "--domain", "abc=shakespeare"], "two domains are named 'abc'"),
             (["--domain", "shakespeare"], "'shakespeare' is not NAME=PATH"),
             (["--domain", "a/b=shakespeare"], "'a/b' names a folder"),
             (["--domain", abc, "--from", str(dense_runs[1]), "--streams-only"], "(model.parscale_n=1)"),
             (["--domain", abc, "data.corpus=shakespeare"], "data.corpus: each expert reads its own --domain"),
             (["--domain", abc, "model.hidden_size=64"], "parameter"),
             (["--domain", f"abc={Path(__file__)}"], "not one of .txt")]
    for args, fragment in cases:
        capsys.readouterr()
        assert main(["branch", "--from", seed, "--out", str(bad), *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], (args, err)
        assert not bad.exists()
    # An --out that holds something else, or a branch of other settings, is left as it was.
    occupied, made = tmp_path / "occupied", tmp_path / "made"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    assert main(["branch", "--from", seed, "--out", str(made), "--domain", "play=shakespeare"]) == 0
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for out, args, fragment in ((occupied, [], "exists and is not a branch folder"),
                                (made, ["train.lr=1e-4"], "holds a branch of other settings (overrides differ)"),
                                (made, ["--domain", abc], "(domains differ)")):
        capsys.readouterr()
        assert main(["branch", "--from", seed, "--out", str(out), "--domain", "play=shakespeare", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], (args, err)
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before



# ---------------------------------------------------------------------------------------------
# Merging runs (Branch-Train-Merge): an average, or their MLPs as experts (BTX)


def logits_of(params: dict, model_cfg, tokens: np.ndarray) -> np.ndarray:
    from parscale_jax.evaluate import model_logits
    from parscale_jax.model import model_graphdef

    batch = {"tokens": tokens, "positions": np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape),
             "segment_ids": np.ones_like(tokens)}
    return np.asarray(model_logits(params, model_graphdef(model_cfg), batch)[0])


def test_merging_averages_runs_or_makes_their_mlps_experts(dense_runs, tmp_path, capsys):
    from parscale_jax.cli import main
    from parscale_jax.layout import Layout
    from parscale_jax.runs import Run

    tokens = np.random.default_rng(2).integers(0, 320, (2, 16)).astype(np.int32)
    want = step0_logits(dense_runs[2], tokens)
    # Two copies of one run average to the run.
    assert main(["merge", "--average", "--out", str(tmp_path / "avg"), str(dense_runs[2]), str(dense_runs[2])]) == 0
    np.testing.assert_allclose(step0_logits(tmp_path / "avg", tokens), want, rtol=0, atol=1e-6 * np.max(np.abs(want)))
    lineage = Run.open(tmp_path / "avg").lineage()
    assert lineage["made_from"] == "merge" and len(lineage["parents"]) == 2 and lineage["weights"] == [0.5, 0.5]
    assert "warning" not in capsys.readouterr().err
    # BTX of the run and another: expert j is run j's MLP, every other weight the average; with the
    # router forced to expert 0 (every expert made a copy of it) it computes run 0's MLP on the
    # averaged rest. The two runs share no ancestor: a warning says the average is not meaningful.
    other = tmp_path / "other"
    train(load_config(overrides=[*TINY, "model.parscale_n=2", "train.steps=2", "train.seed=5"]), other, progress=False)
    assert main(["merge", "--moe", "--out", str(tmp_path / "btx"), str(dense_runs[2]), str(other),
                 "model.experts_per_token=1"]) == 0
    assert "share no ancestor" in capsys.readouterr().err
    runs = [Run.open(path) for path in (dense_runs[2], other, tmp_path / "btx")]
    layout = Layout.create(runs[2].config)
    with jax.set_mesh(layout.mesh):
        first, second, btx = (jax.tree.map(np.asarray, run.params(layout)[0]) for run in runs)
    experts = btx["layers"]["mlp"]
    for j, run in enumerate((first, second)):
        for name in ("gate_proj", "up_proj", "down_proj"):
            np.testing.assert_array_equal(experts[name][:, j], run["layers"]["mlp"][name]["kernel"])
    np.testing.assert_allclose(btx["embed_tokens"]["embedding"],
                               (first["embed_tokens"]["embedding"] + second["embed_tokens"]["embedding"]) / 2,
                               rtol=1e-6)
    forced = {**btx, "layers": {**btx["layers"], "mlp": {**experts, **{
        name: np.repeat(experts[name][:, :1], 2, axis=1) for name in ("gate_proj", "up_proj", "down_proj")}}}}
    assembled = {**btx, "layers": {**btx["layers"], "mlp": first["layers"]["mlp"]}}
    with jax.set_mesh(layout.mesh):
        got, expected = logits_of(forced, runs[2].config.model, tokens), logits_of(assembled, runs[0].config.model, tokens)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.max(np.abs(expected)))
    # One line each: runs of different shapes, a weight per run.
    wide = tmp_path / "wide"
    train(load_config(overrides=[*TINY, "model.parscale_n=2", "model.intermediate_size=96", "train.steps=1",
                              "train.warmup_steps=0"]), wide,
          progress=False)
    capsys.readouterr()
    for args, fragment in ((["--average", str(dense_runs[2]), str(wide)], "parameter layers/mlp/down_proj/kernel is"),
                           (["--average", "--weights", "1,2,3", str(dense_runs[2]), str(other)], "3 weights for 2 runs")):
        assert main(["merge", "--out", str(tmp_path / "bad"), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err
        assert not (tmp_path / "bad").exists()


def test_stream_level_experts_share_one_backbone_pass(dense_runs, domains, tmp_path, capsys):
    """Stream-level BTM: stream sets trained on one frozen backbone are evaluated together in one pass
    of it (J·P streams side by side), equal to each expert run alone (1e-5), holding one backbone."""
    from parscale_jax.cli import main
    from parscale_jax.data.packing import batches_of
    from parscale_jax.evaluate import text_rows
    from parscale_jax.inference.ensemble import evaluate_ensemble, load_experts, open_runs
    from parscale_jax.model import split_params

    out = tmp_path / "streams"
    assert main(["branch", "--from", str(dense_runs[2]), "--out", str(out), "--streams-only", "--domain",
                 f"abc={domains['abc']}", "--domain", f"xyz={domains['xyz']}", "train.steps=1",
                 "train.warmup_steps=0", "train.lr=1e-2"]) == 0
    paths = [str(out / name) for name in ALPHABETS]
    for path in paths:
        assert main(["train", "--run-dir", path, "--no-progress"]) == 0
    text = tmp_path / "mixed.txt"
    text.write_text(documents(ALPHABETS["abc"], 2, seed=7)[0] + "\n\n" + documents(ALPHABETS["xyz"], 2, seed=8)[0])
    runs = open_runs(paths)
    experts = load_experts(paths, runs)
    shared = experts[0].shared
    assert shared is not None and all(e.shared is shared for e in experts)
    batch = next(batches_of(text_rows(runs[0], str(text)), runs[0].config.train.batch_size))
    together = np.asarray(shared.log_probs(batch))
    alone = np.stack([np.asarray(e.log_probs(batch)) for e in experts])
    assert not np.allclose(alone[0], alone[1])  # the sets differ
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-5)
    result = evaluate_ensemble(paths, "posterior", str(text))
    streams, backbone = split_params(experts[0].params, runs[0].config.model)
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    assert result["one_backbone"] and result["held_bytes"] == nbytes(backbone) + 2 * nbytes(streams)
