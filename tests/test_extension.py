"""New model pieces plug in without edits elsewhere: a feed-forward type and an attention kernel are
registry entries chosen by config; their parameters declare axes and kinds that shardings, weight
decay and counts follow; their auxiliary losses reach the objective and their statistics the logs."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from parscale_jax import sharding
from parscale_jax.config import load_config
from parscale_jax.errors import ConfigError
from parscale_jax.model.counting import non_embedding_params
from parscale_jax.layout import Layout
from parscale_jax.model import ATTENTION_KERNELS, FFN_TYPES, Aux, init_params, model_graphdef, param_info
from parscale_jax.model.ffn import SwiGLU
from parscale_jax.model.params import ParamInfo, declare
from parscale_jax.training.loop import loss_sums, train, weight_decay_mask

TINY = ["model.vocab_size=320", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=3",
        "model.num_heads=4", "model.num_kv_heads=2", "model.parscale_n=2", "model.parscale_n_tokens=4",
        "data.seq_len=32", "train.batch_size=4", "train.warmup_steps=1", "train.log_every=1",
        "train.eval_every=0", "checkpoint.every=10"]
PENALTY = 0.01


class PenalizedSwiGLU(SwiGLU):
    """SwiGLU plus a gain of its own (a new kind of parameter) and an auxiliary loss on its weights."""

    def __init__(self, cfg, rngs):
        super().__init__(cfg, rngs)
        self.gain = nnx.Param(jnp.ones((2, cfg.hidden_size)), **declare(("experts", "embed"), "norm"))

    def __call__(self, x_BSD):
        y_BSD, _ = super().__call__(x_BSD)
        penalty = PENALTY * jnp.sum(self.down_proj.kernel[...] ** 2)
        return y_BSD * self.gain[...][0], Aux({"weight_penalty": penalty}, {"output_rms": jnp.sqrt(jnp.mean(y_BSD**2))})


def reference_attention(q_BSNH, k_BCKH, v_BCKH, mask):
    """Attention head by head with explicit softmax, for checking that the kernel is swappable."""
    used.append(q_BSNH.shape)
    mask_BSC = mask.full()
    N, K = q_BSNH.shape[2], k_BCKH.shape[2]
    outputs = []
    for n in range(N):
        k, v = k_BCKH[:, :, n // (N // K)], v_BCKH[:, :, n // (N // K)]
        scores = jnp.einsum("bsh,bch->bsc", q_BSNH[:, :, n], k) / np.sqrt(q_BSNH.shape[-1])
        scores = jnp.where(mask_BSC, scores, -1e30)
        weights = jnp.exp(scores - scores.max(-1, keepdims=True))
        outputs.append(jnp.einsum("bsc,bch->bsh", weights / weights.sum(-1, keepdims=True), v))
    return jnp.stack(outputs, axis=2)


used: list = []


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(FFN_TYPES, "penalized", PenalizedSwiGLU)
    monkeypatch.setitem(ATTENTION_KERNELS, "reference", reference_attention)
    param_info.cache_clear()
    yield
    param_info.cache_clear()


def test_choices_are_the_registries_keys(registered):
    assert load_config(overrides=["model.ffn=penalized", "model.attention=reference"]).model.ffn == "penalized"
    with pytest.raises(ConfigError, match=r"model.ffn: must be one of \('swiglu', 'penalized'\), got 'moe'"):
        load_config(overrides=["model.ffn=moe"])
    with pytest.raises(ConfigError, match="model.attention: .* got 'flash'"):
        load_config(overrides=["model.attention=flash"])
    with pytest.raises(ConfigError, match="model.remat: .*did you mean 'dots'"):
        load_config(overrides=["model.remat=dot"])


def test_a_new_attention_kernel_is_chosen_by_config(registered):
    ids = np.random.default_rng(0).integers(0, 320, (2, 9))
    logits = {}
    for kernel in ("einsum", "reference"):
        cfg = load_config(overrides=[*TINY, f"model.attention={kernel}", "model.init_std=0.2"]).model
        model = nnx.merge(model_graphdef(cfg), nnx.State(init_params(cfg, 0)))
        used.clear()
        logits[kernel] = np.asarray(model(jnp.asarray(ids))[0])
        assert bool(used) == (kernel == "reference")
    np.testing.assert_allclose(logits["reference"], logits["einsum"], atol=1e-5, rtol=1e-5)


def test_a_new_feed_forward_declares_its_parameters(registered):
    cfg = load_config(overrides=[*TINY, "model.ffn=penalized", "mesh.model=1"]).model
    info = param_info(cfg)
    gain = info["layers"]["mlp"]["gain"]
    assert gain == ParamInfo((3, 2, 32), ("layers", "experts", "embed"), "norm", False)
    assert weight_decay_mask(info)["layers"]["mlp"] == {"gain": False, "gate_proj": {"kernel": True},
                                                       "up_proj": {"kernel": True}, "down_proj": {"kernel": True}}
    plain = load_config(overrides=TINY).model
    assert non_embedding_params(cfg) == non_embedding_params(plain) + 3 * 2 * 32
    # Shardings read the declaration; an axis with no rule is an error, not a silent replication.
    with pytest.raises(KeyError, match="no sharding rule for logical axis 'experts'"):
        Layout.create(load_config(overrides=[*TINY, "model.ffn=penalized"])).param_shardings(
            {"layers": {"mlp": {"gain": jnp.zeros((3, 2, 32))}}})


def test_auxiliary_losses_join_the_objective_and_are_logged(registered, tmp_path, monkeypatch):
    monkeypatch.setitem(sharding.RULES, "experts", None)  # a new logical axis is one rule
    config = load_config(overrides=[*TINY, "model.ffn=penalized", "train.steps=2"])
    params = init_params(config.model, 0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 320, (4, 33)).astype(np.int32)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((4, 32), np.int32),
             "positions": np.broadcast_to(np.arange(32, dtype=np.int32), (4, 32)),
             "loss_mask": np.ones((4, 32), np.int32)}
    objective, (ce_sum, n_tokens, aux) = loss_sums(params, model_graphdef(config.model), batch, 0.0)
    # The penalty, averaged over the 3 layers (and the 2 streams, which share the weights), per target token.
    down_LFD = np.asarray(params["layers"]["mlp"]["down_proj"]["kernel"], np.float64)
    penalty = PENALTY * np.mean(np.sum(down_LFD**2, axis=(1, 2)))
    assert float(n_tokens) == 128
    np.testing.assert_allclose(float(aux.losses["weight_penalty"]), penalty, rtol=1e-5)
    # The difference of two float32 sums near 740 carries about 5e-5 of rounding.
    np.testing.assert_allclose(float(objective) - float(ce_sum), 128 * penalty, atol=2e-4)
    assert set(aux.stats) == {"output_rms", "stream_weight_entropy"}

    train(config, tmp_path, progress=False)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(m["aux/weight_penalty"] > 0 and m["stat/output_rms"] > 0 for m in logged)
    assert all(0 < m["stat/stream_weight_entropy"] <= np.log(2) + 1e-6 for m in logged)
