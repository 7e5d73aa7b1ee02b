"""Trains one tiny config on several meshes of 8 CPU devices; `test_sharding.py` runs it in a subprocess.

    python tests/mesh_worker.py OUT_DIR

writes OUT_DIR/results.json (losses, grad norms and shardings per mesh; a resumed run's and a
growing run's losses), OUT_DIR/<mesh>.npz
(the first step's gradients; splash-2x2x2.npz with the splash attention kernels), OUT_DIR/generation.npz
(greedy generation on the (1, 2, 4) mesh) and, in results.json's "tasks", shakespeare_mc scored through the
lm-evaluation-harness adapter on the (2, 2, 2) mesh.
The helpers are imported by the test too, to compute the single-device reference the same way.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
from conftest import TINY as BASE

# name: ((data, stream, model), FSDP). Each axis split alone and together, each with FSDP and without
# (on a data axis of 1, FSDP changes nothing).
MESHES = {
    "8x1x1-fsdp": ((8, 1, 1), True),
    "2x2x2-fsdp": ((2, 2, 2), True),
    "1x2x4": ((1, 2, 4), False),
    "2x1x4": ((2, 1, 4), False),
}
# Parameters whose shardings the test checks, by path.
CHECKED_PARAMS = {
    "embedding": ("embed_tokens", "embedding"),
    "q_proj": ("layers", "self_attn", "q_proj", "kernel"),
    "k_proj": ("layers", "self_attn", "k_proj", "kernel"),
    "o_proj": ("layers", "self_attn", "o_proj", "kernel"),
    "down_proj": ("layers", "mlp", "down_proj", "kernel"),
    "prefix_k": ("layers", "self_attn", "prefix_k"),
    "norm": ("norm", "weight"),
    "aggregate_in_kernel": ("aggregate_in_kernel",),
}


TINY = [*BASE, "model.hidden_size=64", "model.intermediate_size=128", "model.num_kv_heads=4", "model.parscale_n=4",
        "train.steps=4", "train.warmup_steps=1", "train.lr=1e-2", "checkpoint.every=2", "checkpoint.async_save=false"]


# The tiny config growing everything at once at step 2 (each size divisible by the meshes' axes).
GROWTH = ["train.steps=6", "train.growth=[{step: 2, hidden_size: 96, intermediate_size: 192, num_heads: 8, "
          "num_kv_heads: 8, num_layers: 3, parscale_n: 6, ramp_steps: 2}]"]


def tiny_config(*overrides: str):
    from parscale_jax.config import load_config

    return load_config(overrides=[*TINY, *overrides])


def mesh_overrides(shape: tuple[int, int, int], fsdp: bool) -> list[str]:
    data, stream, model = shape
    return [f"mesh.data={data}", f"mesh.stream={stream}", f"mesh.model={model}", f"mesh.fsdp={str(fsdp).lower()}"]


def logged(run_dir: Path, key: str) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line[key] for line in sorted(lines, key=lambda line: line["step"])]


def first_gradients(config, with_loss: bool = False) -> dict[str, np.ndarray]:
    """Gradients of the mean loss at the initial state on the first batch, computed on config's mesh
    (and, `with_loss`, the mean loss itself as "loss")."""
    from parscale_jax.data import pipeline
    from parscale_jax.layout import Layout
    from parscale_jax.model import abstract_params, init_params, model_graphdef
    from parscale_jax.training.step import loss_sums

    layout = Layout.create(config)
    graphdef = model_graphdef(config.model)
    with jax.set_mesh(layout.mesh):
        shardings = layout.param_shardings(abstract_params(config.model))
        params = jax.jit(lambda: init_params(config.model, config.train.seed), out_shardings=shardings)()
        rows = layout.process_rows(config.train.batch_size)
        batch = layout.put_batch(next(iter(pipeline.train_dataset(config, rows))), config.train.batch_size)

        def mean_loss_grads(params, batch):
            grads, (ce_sum, n_tokens, _) = jax.grad(loss_sums, has_aux=True)(params, graphdef, batch, 0.0)
            return jax.tree.map(lambda g: g / n_tokens, grads), ce_sum / n_tokens

        grads, loss = jax.jit(mean_loss_grads, in_shardings=(shardings, layout.batch_sharding()),
                              out_shardings=(shardings, None))(params, batch)
    named = {"/".join(str(k.key) for k in path): np.asarray(g) for path, g in jax.tree_util.tree_leaves_with_path(grads)}
    return {**named, "loss": np.asarray(loss)} if with_loss else named


def checked_specs(state: dict) -> dict[str, list]:
    """PartitionSpecs (as lists) of the checked parameters and of their Adam moments."""
    specs = {}
    adam = state["opt_state"][1][0]  # chain(clip, adamw): adamw = (scale_by_adam, ...)
    for name, path in CHECKED_PARAMS.items():
        for kind, tree in (("param", state["params"]), ("mu", adam.mu), ("nu", adam.nu)):
            leaf = tree
            for key in path:
                leaf = leaf[key]
            specs[f"{kind}:{name}"] = [list(a) if isinstance(a, tuple) else a for a in leaf.sharding.spec]
    return specs


GENERATION_PROMPTS = [[5, 17, 42, 9, 100, 3], [7, 7, 250]]


def generation(config) -> dict[str, np.ndarray]:
    """Greedy tokens and per-step logits of two left-padded prompts, generated on config's mesh."""
    from parscale_jax.config import SamplingConfig
    from parscale_jax.inference.generate import Generator
    from parscale_jax.layout import Layout
    from parscale_jax.model import abstract_params, init_params, model_graphdef

    layout = Layout.create(config)
    with jax.set_mesh(layout.mesh):
        shardings = layout.param_shardings(abstract_params(config.model))
        params = jax.jit(lambda: init_params(config.model, 7), out_shardings=shardings)()
        generator = Generator(model_graphdef(config.model), config.model, layout, 2, 16, SamplingConfig(8))
        tokens, logits = generator.run(params, GENERATION_PROMPTS, keep_logits=True)
    return {"tokens": np.asarray(tokens), "logits": logits}


TASK_LIMIT = 10  # shakespeare_mc's first questions, 4 choices each


def task_scores(run_dir: Path, *overrides: str) -> dict:
    """shakespeare_mc's first TASK_LIMIT questions through the lm-evaluation-harness adapter: every
    request's (log-likelihood, greedy) in the harness's order, and the accuracies, of the run's newest
    checkpoint on the mesh of its config (under `overrides`)."""
    from parscale_jax.inference.harness import HarnessModel, RunScorer, evaluate_tasks
    from parscale_jax.runs import Run

    answers = []

    class Recording(HarnessModel):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            answers.extend(super()._loglikelihood_tokens(requests, disable_tqdm, **kwargs))
            return answers[-len(requests):]

    model = Recording(scorer=RunScorer(Run.open(run_dir, list(overrides))), batch_size=16)
    scores = evaluate_tasks(model, ["shakespeare_mc"], limit=TASK_LIMIT)["results"]["shakespeare_mc"]
    return {"log_likelihoods": [a[0] for a in answers], "greedy": [a[1] for a in answers],
            "acc": scores["acc,none"], "acc_norm": scores["acc_norm,none"]}


def main(out_dir: Path) -> None:
    from parscale_jax.checkpoint import Checkpointer
    from parscale_jax.layout import Layout
    from parscale_jax.runs import Run
    from parscale_jax.training.loop import train
    from parscale_jax.training.step import Trainer

    results = {}
    for name, (shape, fsdp) in MESHES.items():
        config = tiny_config(*mesh_overrides(shape, fsdp))
        run_dir = out_dir / name
        train(config, run_dir, progress=False)
        abstract = Trainer.of(config).abstract_state(Layout.create(config))
        state = Checkpointer(Run(run_dir, config).checkpoint_dir).restore(4, abstract)
        results[name] = {"losses": logged(run_dir, "loss"), "grad_norms": logged(run_dir, "grad_norm"),
                         "specs": checked_specs(state)}
        np.savez(out_dir / f"{name}.npz", **first_gradients(config))

    # A checkpoint written on one mesh, resumed on another.
    run_dir = out_dir / "resume"
    train(tiny_config(*mesh_overrides((2, 2, 2), True)), run_dir, progress=False, stop_at=2)
    train(tiny_config(*mesh_overrides((1, 2, 4), False)), run_dir, progress=False)
    results["resume"] = {"losses": logged(run_dir, "loss")}
    # A run that grows on a mesh: every stage laid out by its own shape.
    run_dir = out_dir / "growth"
    train(tiny_config(*mesh_overrides((2, 2, 2), True), *GROWTH), run_dir, progress=False)
    results["growth"] = {"losses": logged(run_dir, "loss")}
    # The Pallas splash kernels (interpreted here) under shard_map, streams split by the vmap.
    np.savez(out_dir / "splash-2x2x2.npz",
             **first_gradients(tiny_config(*mesh_overrides((2, 2, 2), True), "model.attention=splash")))
    # The lm-evaluation-harness adapter on the (2, 2, 2) FSDP run's checkpoint, on its mesh.
    results["tasks"] = task_scores(out_dir / "2x2x2-fsdp")
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    np.savez(out_dir / "generation.npz", **generation(tiny_config(*mesh_overrides((1, 2, 4), False))))


if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", 8)
    main(Path(sys.argv[1]))
