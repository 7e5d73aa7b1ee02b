"""Every attention kernel computes the same attention: logits and gradients equal the einsum kernel's
(1e-5, float32) for P = 1, 2, 4 with packed segments and padding; the blockwise kernel's memory
grows linearly in the sequence length."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from parscale_jax.config import load_config
from parscale_jax.errors import ConfigError
from parscale_jax.layout import Layout
from parscale_jax.model import ATTENTION_KERNELS, init_params, model_graphdef
from parscale_jax.model.attention import blockwise_attention
from parscale_jax.training.step import Trainer
from conftest import TINY as BASE

TINY = [*BASE, "model.vocab_size=64", "model.intermediate_size=48", "model.parscale_n_tokens=3", "model.init_std=0.2"]


def inputs(S: int = 40):
    """Two rows: three packed documents, and a row left-padded by 6 (segment 0)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, (2, S)).astype(np.int32)
    segments = np.ones((2, S), np.int32)
    segments[0, 13:] = 2
    segments[0, 29:] = 3
    segments[1, :6] = 0
    packed = np.concatenate([np.arange(13), np.arange(16), np.arange(S - 29)])
    positions = np.stack([packed, np.maximum(np.arange(S) - 6, 0)]).astype(np.int32)
    return tokens, positions, segments


def logits_and_grads(kernel: str, P: int, **blockwise):
    cfg = load_config(overrides=[*TINY, f"model.parscale_n={P}", f"model.attention={kernel}"]).model
    params = init_params(cfg, 0)
    graphdef = model_graphdef(cfg)
    tokens, positions, segments = inputs()

    def loss(params):
        logits, _ = nnx.merge(graphdef, nnx.State(params))(tokens, positions, segments)
        return jnp.sum(jnp.sin(logits) * (segments[..., None] > 0)), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


@pytest.mark.parametrize("kernel", sorted(set(ATTENTION_KERNELS) - {"einsum"}))
@pytest.mark.parametrize("P", [1, 2, 4])
def test_kernels_give_the_einsum_kernels_logits_and_gradients(kernel, P, monkeypatch):
    # Blocks of 16 queries, so that the 40 tokens make three blocks, the last one padded.
    monkeypatch.setitem(ATTENTION_KERNELS, "blockwise", lambda *a: blockwise_attention(*a, block=16))
    reference_logits, reference_grads = logits_and_grads("einsum", P)
    logits, grads = logits_and_grads(kernel, P)
    real = inputs()[2] > 0
    np.testing.assert_allclose(logits[real], reference_logits[real], atol=1e-5, rtol=0)
    for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads)):
        assert float(jnp.abs(expected).max()) > 0
        np.testing.assert_allclose(got, expected, atol=1e-5 * float(jnp.abs(expected).max()), rtol=0)


def step_temporary_bytes(attention: str, seq_len: int) -> int:
    config = load_config(overrides=[*TINY, "model.parscale_n=2", f"model.attention={attention}",
                                    "model.max_position_embeddings=8192", f"data.seq_len={seq_len}",
                                    "train.batch_size=1"])
    layout = Layout.create(config, jax.devices()[:1])
    trainer = Trainer.of(config)
    state = trainer.abstract_state(layout)
    batch = {key: jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
             for key in ("tokens", "targets", "segment_ids", "positions", "loss_mask")}
    with jax.set_mesh(layout.mesh):
        step = trainer.train_step(layout, layout.state_shardings(state), {})
        compiled = step.lower(state, {}, batch, jax.ShapeDtypeStruct((), jnp.bool_)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_attention_memory_grows_linearly():
    """The train step's temporary memory from 1k to 4k tokens: the einsum kernel's scores grow
    16-fold, everything the blockwise kernel keeps 4-fold (activations, one block's scores)."""
    einsum = {S: step_temporary_bytes("einsum", S) for S in (1024, 4096)}
    blockwise = {S: step_temporary_bytes("blockwise", S) for S in (1024, 4096)}
    assert einsum[4096] / einsum[1024] > 12
    assert 3.5 < blockwise[4096] / blockwise[1024] < 4.5
    assert blockwise[4096] < einsum[4096] / 10


@pytest.mark.parametrize("kernel", sorted(set(ATTENTION_KERNELS) - {"einsum"}))
def test_cached_generation_is_the_same_with_every_kernel(kernel, monkeypatch):
    from parscale_jax.config import SamplingConfig
    from parscale_jax.inference.generate import Generator

    monkeypatch.setitem(ATTENTION_KERNELS, "blockwise", lambda *a: blockwise_attention(*a, block=4))
    prompts = [[5, 17, 42, 9, 33, 3, 8, 1, 2, 60], [7, 7, 25]]  # a 10-token prefill: three blocks of 4
    outputs = {}
    for name in ("einsum", kernel):
        config = load_config(overrides=[*TINY, "model.parscale_n=2", f"model.attention={name}"])
        layout = Layout.create(config, jax.devices()[:1])
        with jax.set_mesh(layout.mesh):
            generator = Generator(model_graphdef(config.model), config.model, layout, 2, 24, SamplingConfig(8))
            outputs[name] = generator.run(init_params(config.model, 3), prompts, keep_logits=True)
    assert outputs[kernel][0] == outputs["einsum"][0]
    np.testing.assert_allclose(outputs[kernel][1], outputs["einsum"][1], atol=1e-5, rtol=0)


def test_splash_refuses_another_jax_in_one_line(monkeypatch):
    """The splash kernels call private functions of the pinned jax: another release is refused at
    config time, with what to choose instead."""
    from parscale_jax.model import splash

    assert load_config(overrides=["model.attention=splash"]).model.attention == "splash"
    monkeypatch.setattr(splash.jax, "__version__", "0.11.0")
    with pytest.raises(ConfigError, match=r"model.attention: 'splash' calls private functions of jax 0\.10\.2's "
                                          r"splash attention, and this is jax 0\.11\.0: choose blockwise"):
        load_config(overrides=["model.attention=splash"])
