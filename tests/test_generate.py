"""Generation: the KV cache reproduces full recomputation and the official greedy tokens; sampling;
left-padded batches; stop tokens; the `generate` command."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from parscale_jax.cli import main
from parscale_jax.config import SamplingConfig, load_config, validate_sampling
from parscale_jax.errors import ConfigError
from parscale_jax.inference.generate import Generator, sample
from parscale_jax.interop.hf import read_hf_checkpoint
from parscale_jax.layout import Layout
from parscale_jax.model import model_graphdef

REFERENCE = Path(__file__).parent / "data" / "official_reference"
LAYOUT = Layout.create(load_config())


def official(P):
    cfg, params = read_hf_checkpoint(REFERENCE / f"tiny_p{P}")
    return cfg, jax.tree.map(np.asarray, params), np.load(REFERENCE / f"tiny_p{P}" / "input_ids.npy")


def generate(cfg, params, prompts, max_len=32, **sampling):
    with jax.set_mesh(LAYOUT.mesh):
        generator = Generator(model_graphdef(cfg), cfg, LAYOUT, len(prompts), max_len, SamplingConfig(**sampling))
        return generator.run(params, prompts, keep_logits=True)


@pytest.mark.parametrize("P", [1, 2, 4])
def test_cached_greedy_decoding_reproduces_the_official_tokens_and_full_recomputation(P):
    cfg, params, ids = official(P)
    prompt = ids[0, :6].tolist()
    (tokens,), logits = generate(cfg, params, [prompt], max_new_tokens=10)
    assert [*prompt, *tokens] == np.load(REFERENCE / f"tiny_p{P}" / "greedy_tokens.npy")[0].tolist()
    model = nnx.merge(model_graphdef(cfg), nnx.State(params))
    recomputed = np.asarray(model(np.asarray([prompt + tokens]))[0])[0, 5:15]
    np.testing.assert_allclose(logits[:, 0], recomputed, atol=1e-4, rtol=0)


@pytest.mark.parametrize("P", [1, 4])
def test_a_left_padded_row_generates_what_its_prompt_does_alone(P):
    cfg, params, ids = official(P)
    short, long = ids[0, :4].tolist(), ids[1, :13].tolist()
    together, logits_together = generate(cfg, params, [short, long], max_new_tokens=8)
    for row, prompt in enumerate((short, long)):
        (alone,), logits_alone = generate(cfg, params, [prompt], max_new_tokens=8)
        assert together[row] == alone
        np.testing.assert_allclose(logits_together[:, row], logits_alone[:, 0], atol=1e-4, rtol=0)


def test_generation_stops_at_a_stop_token():
    cfg, params, ids = official(2)
    prompt = ids[0, :6].tolist()
    (free,), _ = generate(cfg, params, [prompt], max_new_tokens=10)
    stop = free[2]
    with jax.set_mesh(LAYOUT.mesh):
        generator = Generator(model_graphdef(cfg), cfg, LAYOUT, 1, 32, SamplingConfig(10))
        (stopped,), logits = generator.run(params, [prompt], stop_ids=[stop], keep_logits=True)
    assert stopped == free[: free.index(stop) + 1] and len(logits) == len(stopped)


def test_sampling_filters():
    logits = jax.numpy.asarray([[0.0, 1.0, 2.0, 3.0, -1.0]])
    keys = jax.random.split(jax.random.key(0), 200)
    assert int(sample(logits, keys[0], SamplingConfig())[0]) == 3  # greedy
    top2 = set(np.asarray(jax.vmap(lambda k: sample(logits, k, SamplingConfig(temperature=1.0, top_k=2))[0])(keys)))
    assert top2 == {2, 3}
    # softmax([3, 2, 1, 0, -1]) = 0.636, 0.234, ...: p = 0.6 keeps the first token only, p = 0.8 two.
    nucleus = lambda p: set(np.asarray(jax.vmap(  # noqa: E731
        lambda k: sample(logits, k, SamplingConfig(temperature=1.0, top_p=p))[0])(keys)))
    assert nucleus(0.6) == {3} and nucleus(0.8) == {2, 3}
    everything = set(np.asarray(jax.vmap(lambda k: sample(logits, k, SamplingConfig(temperature=1.0))[0])(keys)))
    assert everything == {0, 1, 2, 3, 4}


def test_sampled_generation_is_reproducible_by_seed():
    cfg, params, ids = official(4)
    prompt = ids[0, :6].tolist()
    first = generate(cfg, params, [prompt], max_new_tokens=12, temperature=1.5, seed=3)[0]
    again = generate(cfg, params, [prompt], max_new_tokens=12, temperature=1.5, seed=3)[0]
    other = generate(cfg, params, [prompt], max_new_tokens=12, temperature=1.5, seed=4)[0]
    assert first == again and first != other


@pytest.mark.parametrize("kwargs,key", [({"max_new_tokens": 0}, "max_new_tokens"), ({"top_p": 0.0}, "top_p"),
                                        ({"temperature": -1.0}, "temperature"), ({"top_k": -2}, "top_k")])
def test_bad_sampling_settings(kwargs, key):
    with pytest.raises(ConfigError, match=key) as info:
        validate_sampling(SamplingConfig(**kwargs))
    assert info.value.key == key


# --- The command --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("gen") / "run"
    assert main(["train", "--run-dir", str(run_dir), "--no-progress", "model.hidden_size=32",
                 "model.intermediate_size=64", "model.num_layers=2", "model.parscale_n=2",
                 "model.parscale_n_tokens=4", "data.seq_len=32", "train.batch_size=4", "train.steps=2",
                 "train.warmup_steps=1", "train.eval_every=0"]) == 0
    return run_dir


def test_generate_command_streams_one_prompt_and_batches_a_file(tiny_run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["generate", "--run-dir", str(tiny_run), "--prompt", "To be", "--max-new-tokens", "12"]) == 0
    streamed = capsys.readouterr().out
    assert streamed.startswith("To be") and len(streamed.rstrip("\n")) > len("To be")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("To be\n\nROMEO:\n")
    assert main(["generate", "--run-dir", str(tiny_run), "--prompts", str(prompts), "--max-new-tokens", "6",
                 "--temperature", "0.7", "--top-k", "10"]) == 0
    out = capsys.readouterr().out
    assert out.count("-" * 40) == 2 and "ROMEO:" in out
    # Greedy output streamed for one prompt equals the same prompt in a batch.
    assert main(["generate", "--run-dir", str(tiny_run), "--prompts", str(prompts), "--max-new-tokens", "12"]) == 0
    assert streamed.rstrip("\n") == capsys.readouterr().out.split("\n" + "-" * 40)[0]


@pytest.mark.parametrize("args,fragment", [
    ([], "give one --prompt TEXT or a --prompts FILE"),
    (["--prompts", "/nonexistent/prompts.txt"], "--prompts: file not found"),
    (["--prompt", "x", "--top-p", "0"], "--top-p: must lie in (0, 1]"),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens: must be >= 1, got 0"),
])
def test_generate_errors_are_one_line(tiny_run, capsys, args, fragment):
    assert main(["generate", "--run-dir", str(tiny_run), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
