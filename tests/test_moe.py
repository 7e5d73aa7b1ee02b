"""Mixture-of-Experts (model.ffn=moe): the routed layer against a per-token loop, its losses and
statistics, its configuration errors, counting, training, and expert parallelism on 8 CPU devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import SUBPROCESS_TIMEOUT, TINY, step0_logits
from parscale_jax.config import load_config
from parscale_jax.errors import ConfigError
from parscale_jax.model.config import ModelConfig
from parscale_jax.model.counting import active_non_embedding_params, non_embedding_params, train_flops_per_token
from parscale_jax.model.moe import MoE, balance_loss, capacity
from parscale_jax.training.loop import train

MOE = ["model.ffn=moe", "model.num_experts=4", "model.experts_per_token=2"]


def moe_layer(seed=0, **fields) -> tuple[nnx.GraphDef, nnx.State, ModelConfig]:
    cfg = ModelConfig(hidden_size=8, intermediate_size=12, ffn="moe", num_experts=4, init_std=0.5, **fields)
    graphdef, state = nnx.split(MoE(cfg, nnx.Rngs(seed)))
    return graphdef, state, cfg


def reference(params: dict, x_PBSD, cfg: ModelConfig):
    """The routed layer token by token: each row's assignments claim their experts' C slots in
    order, every first choice before any second choice; an assignment that finds no slot is dropped."""
    P, B, S, D = x_PBSD.shape
    E, k, C = cfg.num_experts, cfg.experts_per_token, capacity(cfg, S)
    logits = jnp.einsum("pbsd,de->pbse", x_PBSD, params["router"]["kernel"])
    probs = jax.nn.softmax(logits, axis=-1)
    choices = np.argsort(-np.asarray(jax.lax.stop_gradient(probs)), axis=-1, kind="stable")[..., :k]
    rows, dropped = [], 0
    for p in range(P):
        for b in range(B):
            taken = [0] * E
            outputs = [jnp.zeros(D) for _ in range(S)]
            for rank in range(k):
                for s in range(S):
                    e = int(choices[p, b, s, rank])
                    if taken[e] == C:
                        dropped += 1
                        continue
                    taken[e] += 1
                    weight = probs[p, b, s, e]
                    if cfg.moe_renormalize:
                        weight = weight / sum(probs[p, b, s, int(j)] for j in choices[p, b, s])
                    x = x_PBSD[p, b, s]
                    h = jax.nn.silu(x @ params["gate_proj"][e]) * (x @ params["up_proj"][e])
                    outputs[s] = outputs[s] + weight * (h @ params["down_proj"][e])
            rows.append(jnp.stack(outputs))
    y = jnp.stack(rows).reshape(P, B, S, D)
    if cfg.moe_shared_expert_size:
        shared = params["shared_expert"]
        x = x_PBSD
        h = jax.nn.silu(x @ shared["gate_proj"]["kernel"]) * (x @ shared["up_proj"]["kernel"])
        y = y + jax.nn.sigmoid(x @ params["shared_expert_gate"]["kernel"]) * (h @ shared["down_proj"]["kernel"])
    return y, dropped


# (k, capacity factor, renormalized, shared expert width, dispatch): each setting on the gather path,
# the grouped product dropless and with drops.
ROUTED_LAYERS = [(1, 0.0, True, 0, "gather"), (2, 0.0, True, 0, "gather"), (1, 1.0, True, 0, "gather"),
                 (2, 1.0, False, 0, "gather"), (2, 0.5, True, 6, "gather"), (2, 0.0, True, 0, "ragged"),
                 (2, 0.5, False, 6, "ragged")]


@pytest.mark.parametrize("k, factor, renormalize, shared, impl", ROUTED_LAYERS)
def test_the_routed_layer_equals_a_per_token_loop(k, factor, renormalize, shared, impl):
    graphdef, state, cfg = moe_layer(experts_per_token=k, moe_capacity_factor=factor, moe_renormalize=renormalize,
                                     moe_shared_expert_size=shared, moe_impl=impl)
    params = nnx.to_pure_dict(state)
    x_PBSD = jax.random.normal(jax.random.key(1), (2, 2, 6, 8))

    def ours(params, x):
        y, aux = nnx.merge(graphdef, nnx.State(params))(x)
        return jnp.sum(y * jnp.cos(y)), (y, aux)

    def loop(params, x):
        y, dropped = reference(params, x, cfg)
        return jnp.sum(y * jnp.cos(y)), (y, dropped)

    (grads, grad_x), (y, aux) = jax.grad(ours, argnums=(0, 1), has_aux=True)(params, x_PBSD)
    (want_grads, want_grad_x), (want_y, dropped) = jax.grad(loop, argnums=(0, 1), has_aux=True)(params, x_PBSD)
    # Equal to float32 rounding, relative to the largest entry: 1e-6 for the outputs; the gradients
    # sum 24 tokens' terms in another order (2e-6 of 55 seen), and with k = 1 renormalized the
    # router's is 0 but for rounding.
    np.testing.assert_allclose(y, want_y, rtol=0, atol=1e-6 * float(np.max(np.abs(want_y))))
    wanted = jax.tree.leaves((want_grad_x, want_grads))
    scale = max(float(np.max(np.abs(want))) for want in wanted)
    for got, want in zip(jax.tree.leaves((grad_x, grads)), wanted):
        np.testing.assert_allclose(got, want, rtol=0, atol=5e-6 * scale)
    assignments = 2 * 2 * 6 * k
    assert round(float(aux.stats["moe_dropped"]) * assignments) == dropped
    assert dropped == 0 if factor == 0.0 else factor == 1.0 or dropped > 0


def test_capacity_drops_what_a_count_of_slots_drops():
    """Drops counted with NumPy from the routing alone, for many rows of a capacity-limited layer."""
    graphdef, state, cfg = moe_layer(experts_per_token=2, moe_capacity_factor=1.0, num_layers=1)
    x_PBSD = jax.random.normal(jax.random.key(2), (1, 16, 24, 8))
    _, aux = nnx.merge(graphdef, state)(x_PBSD)
    probs = np.asarray(jax.nn.softmax(x_PBSD @ state["router"]["kernel"][...], axis=-1))
    choices = np.argsort(-probs, axis=-1, kind="stable")[..., :2]
    C = int(np.ceil(1.0 * 2 * 24 / 4))
    dropped = 0
    for row in choices[0]:
        counts = np.zeros(4, int)
        for e in np.concatenate([row[:, 0], row[:, 1]]):
            counts[e] += 1
        dropped += int(np.sum(np.maximum(counts - C, 0)))
    assert dropped > 0
    assert float(aux.stats["moe_dropped"]) == pytest.approx(dropped / (16 * 24 * 2))
    loads = [float(aux.stats[f"moe_load/e{e}"]) for e in range(4)]
    assert sum(loads) == pytest.approx(1.0)
    np.testing.assert_allclose(loads, np.bincount(choices.reshape(-1), minlength=4) / choices.size, rtol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_the_balance_loss_is_k_at_perfect_balance_and_larger_when_collapsed(k):
    E, R = 8, 64
    # Perfect balance: token r prefers experts r, r+1, ... (mod E) in that order, symmetric over experts.
    logits = -3.0 * ((np.arange(E)[None, :] - np.arange(R)[:, None]) % E)
    probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    _, experts = jax.lax.top_k(probs, k)
    assert float(balance_loss(probs, experts)) == pytest.approx(k, rel=1e-6)
    # Collapsed: every token prefers the same experts.
    collapsed = jax.nn.softmax(jnp.asarray(np.tile(logits[:1], (R, 1)), jnp.float32), axis=-1)
    _, experts = jax.lax.top_k(collapsed, k)
    assert float(balance_loss(collapsed, experts)) > 2.5 * k


def test_configuration_errors_are_one_line_each():
    def error(*overrides):
        with pytest.raises(ConfigError) as raised:
            load_config(overrides=[*TINY, *overrides])
        message = str(raised.value)
        assert "\n" not in message
        return message

    assert "model.experts_per_token: must lie in [1, model.num_experts=4], got 5" in error(*MOE, "model.experts_per_token=5")
    assert "mesh.expert: 3 devices do not divide dimension 'experts' (4)" in error(*MOE, "mesh.expert=3", "mesh.data=1", "train.batch_size=6")
    assert "model.moe_capacity_factor: must be >= 0 (0: dropless), got -1.0" in error(*MOE, "model.moe_capacity_factor=-1")
    assert "model.num_experts: is a Mixture-of-Experts option, but model.ffn=swiglu" in error("model.num_experts=4")
    assert "model.moe_impl: must be one of ('auto', 'gather', 'ragged'), got 'dense'" in error(*MOE, "model.moe_impl=dense")
    assert "model.moe_impl: ragged has no expert-parallel form" in error(*MOE, "model.moe_impl=ragged",
                                                                         "mesh.expert=2", "mesh.data=1")
    assert "train.growth: growing a Mixture-of-Experts model is not supported" in error(
        *MOE, "train.steps=4", "train.growth=[{step: 2, num_layers: 3}]")


def test_counting_knows_total_and_active_parameters_and_flops():
    moe = load_config(overrides=[*TINY, *MOE, "model.moe_intermediate_size=32", "model.moe_shared_expert_size=16"]).model
    dense = load_config(overrides=TINY).model
    L, D, F, E, Fs = moe.num_layers, moe.hidden_size, dense.intermediate_size, 4, 16
    experts, shared, router = E * 3 * D * 32, 3 * D * Fs + D, D * E
    assert non_embedding_params(moe) == non_embedding_params(dense) + L * (experts + shared + router - 3 * D * F)
    assert active_non_embedding_params(moe) == non_embedding_params(moe) - L * (E - 2) * 3 * D * 32
    assert active_non_embedding_params(dense) == non_embedding_params(dense)
    per_layer = 2 * (router + 2 * 3 * D * 32 + shared) - 2 * 3 * D * F
    assert train_flops_per_token(moe, 32) - train_flops_per_token(dense, 32) == pytest.approx(
        3 * moe.parscale_n * L * per_layer)


def test_a_moe_with_streams_trains_and_logs_its_router(tmp_path):
    config = load_config(overrides=[*TINY, *MOE, "model.moe_capacity_factor=1.25", "train.steps=3",
                                    "train.moe_aux_loss=0.1"])
    train(config, tmp_path, progress=False)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 3 and all(np.isfinite(m["loss"]) for m in logged)
    for m in logged:
        assert m["aux/moe_balance"] >= 2 - 1e-3 and m["aux/router_z"] > 0  # k = 2 at best
        assert sum(m[f"stat/moe_load/e{e}"] for e in range(4)) == pytest.approx(1.0)
        assert sum(m[f"stat/moe_load/s1/e{e}"] for e in range(4)) == pytest.approx(1.0)
        assert 0 <= m["stat/moe_dropped"] < 0.5 and 0 <= m["stat/moe_stream_tv"] <= 1
        assert 0 < m["stat/router_entropy"] <= np.log(4) + 1e-6
    assert logged[-1]["loss"] < logged[0]["loss"]


# ---------------------------------------------------------------------------------------------
# Expert parallelism: 8 CPU devices in a subprocess, against one device here.

EP_MESHES = {  # name: (model settings, mesh)
    "data2-expert2-stream2-fsdp": ([], ["mesh.data=2", "mesh.expert=2", "mesh.stream=2", "mesh.fsdp=true"]),
    "expert2-stream2-model2": ([], ["mesh.data=1", "mesh.expert=2", "mesh.stream=2", "mesh.model=2"]),
    "every2-expert4-stream2": (["model.moe_every=2"], ["mesh.data=1", "mesh.expert=4", "mesh.stream=2"]),
}
EP_MODEL = ["model.ffn=moe", "model.num_experts=8", "model.experts_per_token=2", "model.moe_capacity_factor=1.5"]

EP_WORKER = """
import sys, jax
jax.config.update("jax_num_cpu_devices", 8)
sys.path.insert(0, {tests!r})
import numpy as np, mesh_worker
from parscale_jax.layout import Layout
from test_moe import EP_MESHES, EP_MODEL
for name, (model, mesh) in EP_MESHES.items():
    config = mesh_worker.tiny_config(*EP_MODEL, *model, *mesh)
    np.savez({out!r} + f"/{{name}}.npz", **mesh_worker.first_gradients(config, with_loss=True))
    if name == "every2-expert4-stream2":  # the exchange is an all-to-all over the expert axis
        from parscale_jax.model import abstract_params, model_graphdef
        from parscale_jax.evaluate import model_logits
        layout = Layout.create(config)
        with jax.set_mesh(layout.mesh):
            batch = {{k: jax.ShapeDtypeStruct((8, 32), np.int32, sharding=layout.batch_sharding())
                      for k in ("tokens", "positions", "segment_ids")}}
            shardings = layout.param_shardings(abstract_params(config.model))
            params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract_params(config.model), shardings)
            hlo = jax.jit(model_logits, static_argnums=1).lower(params, model_graphdef(config.model), batch).as_text()
        open({out!r} + "/hlo.txt", "w").write(hlo)
"""


def test_expert_parallel_meshes_equal_one_device(tmp_path):
    import mesh_worker

    code = EP_WORKER.format(tests=str(Path(__file__).parent), out=str(tmp_path))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "all_to_all" in (tmp_path / "hlo.txt").read_text()
    alone = {}
    for name, (model, _) in EP_MESHES.items():
        if tuple(model) not in alone:
            alone[tuple(model)] = mesh_worker.first_gradients(mesh_worker.tiny_config(*EP_MODEL, *model), with_loss=True)
        want = alone[tuple(model)]
        sharded = np.load(tmp_path / f"{name}.npz")
        assert set(sharded) == set(want)
        for key, expected in want.items():
            np.testing.assert_allclose(sharded[key], expected, rtol=1e-5, atol=1e-5, err_msg=f"{name}: {key}")


# ---------------------------------------------------------------------------------------------
# Sparse upcycling


@pytest.mark.parametrize("P", [1, 2])
def test_an_upcycled_run_computes_what_the_dense_one_did(dense_runs, tmp_path, P, capsys):
    from parscale_jax.cli import main
    from parscale_jax.runs import Run

    out = tmp_path / "moe"
    assert main(["upcycle", "--from", str(dense_runs[P]), "--out", str(out), "model.num_experts=4",
                 "model.experts_per_token=2"]) == 0
    assert "computes what the dense model did" in capsys.readouterr().out
    tokens = np.random.default_rng(0).integers(0, 320, (2, 24)).astype(np.int32)
    dense, moe = step0_logits(dense_runs[P], tokens), step0_logits(out, tokens)
    np.testing.assert_allclose(moe, dense, rtol=0, atol=1e-5 * np.max(np.abs(dense)))
    run = Run.open(out)
    assert run.config.model.ffn == "moe" and run.config.model.parscale_n == P
    lineage = run.lineage()
    assert lineage["made_from"] == "upcycle" and lineage["parents"][0]["path"] == str(dense_runs[P].absolute())
    assert lineage["num_experts"] == 4 and lineage["noise"] == 0.0
    if P == 1:
        return
    # With noise the experts differ, the function moves a little, and the run trains.
    noisy = tmp_path / "noisy"
    assert main(["upcycle", "--from", str(dense_runs[P]), "--out", str(noisy), "--noise", "0.01",
                 "model.num_experts=4", "model.experts_per_token=2"]) == 0
    moved = np.max(np.abs(step0_logits(noisy, tokens) - dense))
    assert 1e-5 * np.max(np.abs(dense)) < moved < 0.1 * np.max(np.abs(dense))
    assert main(["train", "--run-dir", str(noisy), "--no-progress"]) == 0


def test_upcycling_refuses_what_it_cannot_do(dense_runs, tmp_path, capsys):
    from parscale_jax.cli import main

    moe = tmp_path / "moe"
    assert main(["upcycle", "--from", str(dense_runs[1]), "--out", str(moe), "model.num_experts=2"]) == 0
    cases = [(["--from", str(moe)], "is already a Mixture-of-Experts model (model.ffn=moe)"),
             (["--from", str(dense_runs[1]), "model.hidden_size=64"], "upcycle keeps the model's shape"),
             (["--from", str(dense_runs[1]), "model.moe_intermediate_size=32"], "the experts are copies of the 64-wide"),
             (["--from", str(dense_runs[1]), "model.experts_per_token=3", "model.num_experts=2"],
              "model.experts_per_token: must lie in [1, model.num_experts=2], got 3")]
    for args, message in cases:
        capsys.readouterr()
        assert main(["upcycle", "--out", str(tmp_path / "again"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "again").exists()


def test_cached_generation_with_experts_and_streams_equals_recomputation():
    """Decoding routes one token at a time (never dropped); dropless, that is what the full forward
    pass computes for the same tokens."""
    from parscale_jax.config import SamplingConfig
    from parscale_jax.inference.generate import Generator
    from parscale_jax.layout import Layout
    from parscale_jax.model import init_params, model_graphdef

    config = load_config(overrides=[*TINY, *MOE, "model.init_std=0.2"])
    cfg = config.model
    params = jax.tree.map(np.asarray, jax.jit(lambda: init_params(cfg, 1))())
    layout = Layout.create(config)
    prompt = [5, 17, 42, 9, 100, 3]
    with jax.set_mesh(layout.mesh):
        generator = Generator(model_graphdef(cfg), cfg, layout, 1, 24, SamplingConfig(max_new_tokens=8))
        (tokens,), logits = generator.run(params, [prompt], keep_logits=True)
    model = nnx.merge(model_graphdef(cfg), nnx.State(params))
    recomputed = np.asarray(model(np.asarray([prompt + tokens]))[0])[0, 5:13]
    np.testing.assert_allclose(logits[:, 0], recomputed, atol=1e-4, rtol=0)


def test_identity_blocks_inserted_into_a_moe_run_keep_its_logits(dense_runs, tmp_path):
    """`upscale --insert --identity` zeroes the experts' output projections (the entry's
    OUTPUT_PROJECTIONS): the deeper MoE model computes what the MoE model did."""
    from parscale_jax.transforms.upscale import upscale

    moe, deeper = tmp_path / "moe", tmp_path / "deeper"
    from parscale_jax.transforms.upcycle import upcycle

    upcycle(dense_runs[2], moe, ["model.num_experts=4"], noise=0.05)
    upscale(moe, deeper, insert=1)
    tokens = np.random.default_rng(1).integers(0, 320, (2, 16)).astype(np.int32)
    want = step0_logits(moe, tokens)
    np.testing.assert_allclose(step0_logits(deeper, tokens), want, rtol=0, atol=1e-5 * np.max(np.abs(want)))
