"""New model pieces plug in without edits elsewhere: a feed-forward type and an attention kernel are
registry entries chosen by config; their parameters declare axes and kinds that shardings, weight
decay and counts follow; their auxiliary losses reach the objective and their statistics the logs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from parscale_jax import sharding
from parscale_jax.sharding import mesh_axes
from parscale_jax.config import load_config
from parscale_jax.errors import ConfigError
from parscale_jax.interop import hf
from parscale_jax.model.counting import non_embedding_params, train_flops_per_token
from parscale_jax.layout import Layout
from parscale_jax.model import ATTENTION_KERNELS, FFN_TYPES, Aux, init_params, model_graphdef, param_info
from parscale_jax.model.ffn import SwiGLU
from parscale_jax.model.params import ParamInfo, declare
from parscale_jax.training.loop import train
from parscale_jax.training.step import loss_sums, weight_decay_mask
from conftest import SUBPROCESS_TIMEOUT
from conftest import TINY as BASE

TINY = [*BASE, "model.vocab_size=320", "model.num_layers=3", "train.batch_size=4", "train.warmup_steps=1",
        "checkpoint.every=10"]
PENALTY = 0.01


class PenalizedSwiGLU(SwiGLU):
    """SwiGLU plus a gain of its own (a new kind of parameter) and an auxiliary loss on its weights."""

    def __init__(self, cfg, rngs):
        super().__init__(cfg, rngs)
        self.gain = nnx.Param(jnp.ones((2, cfg.hidden_size)), **declare(("gains", "embed"), "norm"))

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
    with pytest.raises(ConfigError, match=r"model.ffn: must be one of \('swiglu', 'moe', 'penalized'\), got 'mlp'"):
        load_config(overrides=["model.ffn=mlp"])
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
    assert gain == ParamInfo((3, 2, 32), ("layers", "gains", "embed"), "norm", False)
    assert weight_decay_mask(info)["layers"]["mlp"] == {"gain": False, "gate_proj": {"kernel": True},
                                                       "up_proj": {"kernel": True}, "down_proj": {"kernel": True}}
    plain = load_config(overrides=TINY).model
    assert non_embedding_params(cfg) == non_embedding_params(plain) + 3 * 2 * 32
    # Shardings read the declaration; an axis with no rule is an error, not a silent replication.
    with pytest.raises(KeyError, match="no sharding rule for logical axis 'gains'"):
        Layout.create(load_config(overrides=[*TINY, "model.ffn=penalized"])).param_shardings(
            {"layers": {"mlp": {"gain": jnp.zeros((3, 2, 32))}}})


def test_auxiliary_losses_join_the_objective_and_are_logged(registered, tmp_path, monkeypatch):
    monkeypatch.setitem(sharding.RULES, "gains", ())  # a new logical axis is one rule
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


# ---------------------------------------------------------------------------------------------
# A new model family as a plug-in: everything specific to it is declared in this file.


class ToyExperts(nnx.Module):
    """A feed-forward type of E = 2 experts that every token uses (their outputs averaged): its own
    FLOPs, its own Hugging Face names with a per-expert index, and parameters stacked over the
    `experts` logical axis, which the rules split over the `expert` mesh axis."""

    EXPERTS = 2
    HF_NAMES = {"up": ("experts.{e}.up_proj.weight", "transpose"),
                "down": ("experts.{e}.down_proj.weight", "transpose")}
    OUTPUT_PROJECTIONS = ("down",)

    @staticmethod
    def flops_per_token(cfg) -> int:
        return 2 * 2 * cfg.hidden_size * cfg.intermediate_size * ToyExperts.EXPERTS

    def __init__(self, cfg, rngs):
        E, D, F = self.EXPERTS, cfg.hidden_size, cfg.intermediate_size
        init = nnx.initializers.normal(cfg.init_std)
        self.up = nnx.Param(init(rngs.params(), (E, D, F)), **declare(("experts", "embed", "mlp"), "matrix"))
        self.down = nnx.Param(init(rngs.params(), (E, F, D)), **declare(("experts", "mlp", "embed"), "matrix"))

    def __call__(self, x_PBSD, live_F=None):
        h_PBSEF = nnx.silu(jnp.einsum("pbsd,edf->pbsef", x_PBSD, self.up[...]))
        return jnp.einsum("pbsef,efd->pbsd", h_PBSEF, self.down[...]) / self.EXPERTS, Aux.none()


def register_toy_experts() -> None:
    """What a plug-in module does when imported: one registry entry."""
    FFN_TYPES["toy_experts"] = ToyExperts


@pytest.fixture
def toy_experts(monkeypatch):
    monkeypatch.setitem(FFN_TYPES, "toy_experts", ToyExperts)
    param_info.cache_clear()
    yield
    param_info.cache_clear()


def test_a_plugged_in_family_is_counted_sharded_and_named_from_its_declarations(toy_experts, tmp_path):
    config = load_config(overrides=[*TINY, "model.ffn=toy_experts", "mesh.expert=1"])
    cfg, plain = config.model, load_config(overrides=TINY).model
    L, D, F, E = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, ToyExperts.EXPERTS
    # Counting: its parameters and its FLOPs, in place of SwiGLU's.
    assert non_embedding_params(cfg) == non_embedding_params(plain) - L * 3 * D * F + L * 2 * E * D * F
    per_token = 3 * cfg.parscale_n * L * (ToyExperts.flops_per_token(cfg) - 2 * 3 * D * F)
    assert train_flops_per_token(cfg, 32) - train_flops_per_token(plain, 32) == pytest.approx(per_token)
    # Sharding: the experts' axis is split over the mesh's `expert` axis, sized and checked like the others.
    assert mesh_axes() == ("data", "expert", "stream", "model")
    layout = Layout.create(config)
    assert layout.mesh.shape["expert"] == 1
    up = layout.param_sharding(("layers", "mlp", "up"), 4).spec
    assert tuple(up) == (None, "expert", None, "model")
    with pytest.raises(ConfigError, match=r"mesh.expert: 3 devices do not divide dimension 'experts' \(2\) of "
                                          r"parameter layers/mlp/"):
        load_config(overrides=[*TINY, "model.ffn=toy_experts", "mesh.expert=3", "mesh.data=1", "train.batch_size=6"])
    # Hugging Face names: one tensor per layer and expert, back into the same parameters.
    params = jax.jit(lambda: init_params(cfg, 0))()
    names = [t.name for t in hf.hf_tensors(cfg)]
    assert [n for n in names if n.startswith("model.layers.1.mlp.")] == [
        "model.layers.1.mlp.experts.0.up_proj.weight", "model.layers.1.mlp.experts.1.up_proj.weight",
        "model.layers.1.mlp.experts.0.down_proj.weight", "model.layers.1.mlp.experts.1.down_proj.weight"]
    out = hf.write_hf_checkpoint(tmp_path / "hf", params, cfg, "byte")
    tensors = load_file(out / "model.safetensors")
    np.testing.assert_array_equal(tensors["model.layers.2.mlp.experts.1.up_proj.weight"],
                                  np.asarray(params["layers"]["mlp"]["up"][2, 1]).T)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), hf.params_from_hf(tensors, cfg))


PLAN_WITH_TOY = """
import sys
sys.path.insert(0, {tests!r})
import test_extension
test_extension.register_toy_experts()
from parscale_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_plan_compiles_a_plugged_in_family_on_its_own_mesh_axis(tmp_path):
    """`plan` for 8 GPUs with the experts split two ways: the plug-in's module, imported first, is
    all it takes (here a subprocess, since a plan chooses how many devices JAX starts with)."""
    reports = {}
    for experts in (1, 2):
        out = tmp_path / f"plan{experts}.json"
        code = PLAN_WITH_TOY.format(tests=str(Path(__file__).parent))
        result = subprocess.run([sys.executable, "-c", code, "plan", "--gpus", "8", "--out", str(out), *TINY,
                                 "model.num_layers=1", "data.seq_len=16", "model.ffn=toy_experts", "mesh.data=-1",
                                 "mesh.model=2", f"mesh.expert={experts}"],
                                capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
        assert result.returncode == 0, result.stdout + result.stderr
        reports[experts] = json.loads(out.read_text())
    assert reports[2]["mesh"] == {"data": 2, "stream": 1, "model": 2, "expert": 2}
    assert reports[1]["parameters"] == reports[2]["parameters"]
    # Split over the expert axis, each device holds half of the experts' weights (and their moments).
    L, D, F = 1, 32, 64
    expert_bytes = 4 * L * 2 * 2 * D * F // 2  # float32, both projections, over mesh.model
    assert reports[1]["params_bytes"] - reports[2]["params_bytes"] == expert_bytes // 2
    assert reports[1]["opt_state_bytes"] - reports[2]["opt_state_bytes"] == expert_bytes
