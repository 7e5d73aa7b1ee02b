"""The model computes ParScale: official outputs, stream equivalences, masks, parameter counts."""

import csv
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from parscale_jax.config import ModelConfig, load_config, packaged_config_path, validate_model
from parscale_jax.model.counting import non_embedding_params
from parscale_jax.interop.hf import read_hf_checkpoint
from parscale_jax.model import (
    ParScaleLM,
    ParScaleParam,
    apply_rope,
    attention_mask,
    model_graphdef,
    param_info,
    prefix_slots,
    rope_tables,
    scan_layers,
)

# Outputs of the official implementation and the paper's loss table, copied from shared/data.
SHARED = Path(__file__).resolve().parent / "data"
REFERENCE = SHARED / "official_reference"


def extra_params(cfg) -> int:
    """The ParScale parameters, from the declarations: the prefixes and the aggregator."""
    return sum(info.size for info in jax.tree.leaves(param_info(cfg)) if info.parscale)


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                num_kv_heads=2, parscale_n=2, parscale_n_tokens=3, max_position_embeddings=64)
    return validate_model(ModelConfig(**{**base, **overrides}))


def make_model(cfg: ModelConfig, seed: int = 0) -> ParScaleLM:
    model = ParScaleLM(cfg, rngs=nnx.Rngs(seed))
    # Larger-than-init prefixes and aggregator so that mistakes in them show in the logits.
    for path, var in nnx.iter_graph(model):
        if isinstance(var, ParScaleParam):
            var[...] = var[...] * 20.0
    return model


@nnx.jit
def forward(model, *args):
    """Jitted logits: eager NNX runs op by op, which is slow."""
    return model(*args)[0]


def tokens(shape, seed=1, vocab=64):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def load_reference(P: int) -> ParScaleLM:
    cfg, pure = read_hf_checkpoint(REFERENCE / f"tiny_p{P}")
    return nnx.merge(model_graphdef(cfg), nnx.State(jax.tree.map(jnp.asarray, pure)))


@pytest.mark.parametrize("P", [1, 2, 4])
def test_matches_official_implementation(P):
    """Logits of the official PyTorch code on its own checkpoints, with and without padding."""
    model = load_reference(P)
    folder = REFERENCE / f"tiny_p{P}"
    input_ids = jnp.asarray(np.load(folder / "input_ids.npy"), jnp.int32)
    mask = jnp.asarray(np.load(folder / "attention_mask.npy"), jnp.int32)
    np.testing.assert_allclose(forward(model, input_ids), np.load(folder / "logits.npy"), atol=1e-4, rtol=0)
    # The official code keeps positions 0..S-1 for left-padded rows; padding is segment 0 here.
    np.testing.assert_allclose(forward(model, input_ids, None, mask), np.load(folder / "logits_masked.npy"),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("P", [1, 2, 4])
def test_greedy_tokens_match_official(P):
    """Greedy decoding by full recomputation reproduces the official cached generate()."""
    model = load_reference(P)
    expected = np.load(REFERENCE / f"tiny_p{P}" / "greedy_tokens.npy")
    # One fixed-length buffer: by causality, the not-yet-generated tail cannot change position t.
    ids = np.zeros_like(expected)
    ids[:, :6] = expected[:, :6]
    for t in range(6, expected.shape[1]):
        ids[:, t] = np.argmax(np.asarray(forward(model, jnp.asarray(ids, jnp.int32)))[:, t - 1], axis=-1)
    np.testing.assert_array_equal(ids, expected)


def test_streams_together_equal_each_stream_alone():
    """The P streams run as one leading axis; each equals that stream run by itself."""
    cfg = tiny(parscale_n=3)
    model = make_model(cfg)
    ids = tokens((2, 7))
    positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
    segments = jnp.ones((2, 7), jnp.int32)
    x = model.embed_tokens(ids)
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    mask = attention_mask(segments, prefix_slots(cfg))
    h_together, _, _ = model.streams(x, cos, sin, mask)

    layers_def, prefix_state, shared_state = nnx.split(model.layers, ParScaleParam, ...)
    h_alone = jnp.concatenate([
        model.norm(scan_layers(layers_def, shared_state, jax.tree.map(lambda a: a[:, p : p + 1], prefix_state),
                               x[None], cos, sin, mask)[0])
        for p in range(cfg.parscale_n)])
    np.testing.assert_allclose(h_together, h_alone, atol=1e-5, rtol=1e-5)
    # The streams really differ (their prefixes do), so the check above is not vacuous.
    assert float(jnp.abs(h_alone[0] - h_alone[1]).max()) > 1e-2


def permute_streams(model: ParScaleLM, perm: np.ndarray, prefixes=True, aggregator=True) -> None:
    P, D = len(perm), model.config.hidden_size
    attn = model.layers.self_attn
    if prefixes:
        attn.prefix_k[...] = attn.prefix_k[...][:, perm]
        attn.prefix_v[...] = attn.prefix_v[...][:, perm]
    if aggregator:
        model.aggregate_in_kernel[...] = model.aggregate_in_kernel[...].reshape(P, D, D)[perm].reshape(P * D, D)
        model.aggregate_out_kernel[...] = model.aggregate_out_kernel[...][:, perm]
        model.aggregate_out_bias[...] = model.aggregate_out_bias[...][perm]


def test_permuting_streams_leaves_logits_unchanged():
    cfg = tiny(parscale_n=4)
    ids = tokens((2, 9))
    perm = np.array([2, 0, 3, 1])
    model = make_model(cfg)
    model.aggregate_out_bias[...] = jnp.arange(4.0)  # non-zero, so its order matters too
    before = forward(model, ids)
    permute_streams(model, perm)
    np.testing.assert_allclose(forward(model, ids), before, atol=1e-5, rtol=1e-5)
    # Permuting the prefixes alone does change the logits: the check above is not vacuous.
    permute_streams(model, perm, aggregator=False)
    assert float(jnp.abs(forward(model, ids) - before).max()) > 1e-3


def test_aggregation_weights_are_a_smoothed_distribution():
    cfg = tiny(parscale_n=4, parscale_attn_smooth=0.1)
    model = make_model(cfg)
    x = model.embed_tokens(tokens((2, 6)))
    cos, sin = rope_tables(jnp.broadcast_to(jnp.arange(6), (2, 6)), cfg.head_dim, cfg.rope_theta)
    h, _, _ = model.streams(x, cos, sin, attention_mask(jnp.ones((2, 6), jnp.int32), prefix_slots(cfg)))
    _, weights = model.aggregate(h)
    assert weights.shape == (2, 6, 4) and weights.dtype == jnp.float32
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
    assert float(weights.min()) >= 0.1 / 4 - 1e-7
    assert float(weights.max() - weights.min()) > 1e-3  # input-dependent, not uniform


def test_p1_is_the_plain_backbone():
    cfg = tiny(parscale_n=1)
    model = nnx.eval_shape(lambda: ParScaleLM(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    assert len(nnx.state(model, ParScaleParam)) == 0
    names = {".".join(map(str, path)) for path, _ in nnx.to_flat_state(state)}
    assert not any("prefix" in n or "aggregate" in n for n in names)


def count_leaves(model) -> int:
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("P", [2, 4, 8])
def test_extra_parameter_count_follows_the_formula(P):
    cfg1, cfgP = tiny(parscale_n=1), tiny(parscale_n=P)
    def abstract(cfg):
        return nnx.eval_shape(lambda: ParScaleLM(cfg, rngs=nnx.Rngs(0)))

    extra = count_leaves(abstract(cfgP)) - count_leaves(abstract(cfg1))
    L, K, T, H, D = cfgP.num_layers, cfgP.num_kv_heads, cfgP.parscale_n_tokens, cfgP.head_dim, cfgP.hidden_size
    assert extra == L * 2 * P * K * T * H + P * D * D + D + D * P + P == extra_params(cfgP)


def test_parameter_counts_match_the_paper():
    def shape(size: str, P: int) -> ModelConfig:
        cfg = load_config(packaged_config_path(f"paper_{size.lower()}"), [f"model.parscale_n={P}"]).model
        return cfg

    assert extra_params(shape("0.5B", 2)) == 2_382_466
    assert [extra_params(shape("1.6B", P)) for P in (2, 4, 8)] == [6_050_306, 12_099_076, 24_196_616]
    with open(SHARED / "paper_losses.csv") as f:
        for row in csv.DictReader(f):
            assert non_embedding_params(shape(row["size"], int(row["P"]))) == int(row["non_embedding_params"])


def test_causal_later_tokens_never_change_earlier_logits():
    model = make_model(tiny(parscale_n=2))
    ids = tokens((2, 10))
    changed = ids.at[:, 6:].set((ids[:, 6:] + 5) % 64)
    a, b = forward(model, ids), forward(model, changed)
    np.testing.assert_array_equal(a[:, :6], b[:, :6])
    assert float(jnp.abs(a[:, 6:] - b[:, 6:]).max()) > 1e-4


def test_packed_segments_do_not_leak():
    """A document packed after another gives the logits it has alone."""
    model = make_model(tiny(parscale_n=2))
    first, second = tokens((1, 5), seed=2), tokens((1, 7), seed=3)
    packed = jnp.concatenate([first, second], axis=1)
    positions = jnp.concatenate([jnp.arange(5), jnp.arange(7)])[None]
    segments = jnp.concatenate([jnp.ones(5, jnp.int32), 2 * jnp.ones(7, jnp.int32)])[None]
    packed_logits = forward(model, packed, positions, segments)
    np.testing.assert_allclose(packed_logits[:, 5:], forward(model, second), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(packed_logits[:, :5], forward(model, first), atol=1e-5, rtol=1e-5)


def test_rope_rotates_pairs_by_position():
    """Dimension i and i + H/2 turn by the angle position · theta^(-2i/H), written out in numpy."""
    H, theta = 8, 500.0
    x = np.asarray(jax.random.normal(jax.random.key(0), (1, 5, 2, H)))
    positions = np.array([[0, 1, 2, 7, 30]])
    cos, sin = rope_tables(jnp.asarray(positions), H, theta)
    y = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    expected = np.empty_like(x)
    for s, position in enumerate(positions[0]):
        for i in range(H // 2):
            angle = position * theta ** (-2 * i / H)
            a, b = x[0, s, :, i], x[0, s, :, i + H // 2]
            expected[0, s, :, i] = a * np.cos(angle) - b * np.sin(angle)
            expected[0, s, :, i + H // 2] = b * np.cos(angle) + a * np.sin(angle)
    np.testing.assert_allclose(y, expected, atol=1e-5, rtol=1e-5)


def _grads_and_residuals(cfg, ids):
    """Gradients of a scalar of the logits, and how many numbers the backward pass keeps."""
    model = make_model(cfg)
    graphdef, state = nnx.split(model)

    def loss(state):
        return jnp.mean(nnx.merge(graphdef, state)(ids)[0] ** 2)

    _, backward = jax.vjp(loss, state)  # its leaves are the residuals the forward pass saved
    return jax.jit(jax.grad(loss))(state), sum(x.size for x in jax.tree.leaves(backward))


def test_remat_policies_give_the_same_gradients_and_keep_less():
    ids = tokens((2, 8))
    reference, kept_without = _grads_and_residuals(tiny(), ids)
    kept = {}
    for policy in ("full", "dots", "dots_no_batch", "qkv_proj"):
        grads, kept[policy] = _grads_and_residuals(tiny(remat=policy), ids)
        for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(grads)):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
    # Each policy is applied: saving nothing keeps least, the q/k/v projections a little more, all
    # matrix products more again, and no rematerialization the most.
    assert kept["full"] < kept["qkv_proj"] < kept["dots"] < kept_without, kept
    assert kept["dots_no_batch"] < kept_without, kept


def test_bfloat16_compute_with_float32_parameters():
    cfg32 = tiny(parscale_n=2)
    cfg16 = dataclasses.replace(cfg32, dtype="bfloat16")
    ids = tokens((2, 8))
    model16 = make_model(cfg16)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model16, nnx.Param)))
    logits16 = forward(model16, ids)
    assert logits16.dtype == jnp.bfloat16
    logits32 = forward(make_model(cfg32), ids)
    assert bool(jnp.all(jnp.isfinite(logits16.astype(jnp.float32))))
    np.testing.assert_allclose(logits16.astype(jnp.float32), logits32, atol=0.1, rtol=0.1)


def test_paper_shape_traces_its_36_layers_as_one_scan():
    """The layers are stacked and scanned, not unrolled, so a 36-layer model compiles like one layer."""
    cfg = load_config(packaged_config_path("paper_1.6b"), ["model.parscale_n=8"]).model
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ParScaleLM(cfg, rngs=nnx.Rngs(0))))
    ids = jax.ShapeDtypeStruct((1, 16), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda state, ids: nnx.merge(graphdef, state)(ids)[0])(state, ids)
    scans = [eqn for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "scan"]
    assert [eqn.params["length"] for eqn in scans] == [36]
    assert len(jaxpr.jaxpr.eqns) < 100
