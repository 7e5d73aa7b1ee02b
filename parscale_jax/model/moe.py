"""Mixture-of-Experts feed-forward (`model.ffn=moe`): E SwiGLU experts, a router choosing k per token.

Routing (float32): softmax over the E router logits, then the k largest; their weights are the
chosen probabilities, renormalized to sum to 1 (`model.moe_renormalize`, Mixtral; Qwen's
`norm_topk_prob`) or not (Qwen's default). A token's output is the weighted sum of its k experts'
outputs, plus, with `model.moe_shared_expert_size`, a shared expert gated by a sigmoid (Qwen2-MoE).

The streams' tokens are routed like any others: the P streams are folded into the token rows.

Capacity (`model.moe_capacity_factor` c > 0, as Switch): each group of tokens (one stream's row of
the batch: its S tokens) gives every expert Z = min(S, ceil(c · k · S / E)) slots. Assignments
claim slots first by choice (every token's first choice before any second choice), then by position
in the row; an assignment that finds its expert full is dropped, and the token keeps only its other
experts' outputs (a token with all k dropped passes through the residual alone). c = 0 is dropless.

Dispatch (`model.moe_impl`):
  gather  each group's tokens gathered into a buffer `[E, Z, D]` (dropless: Z = S), the experts
          applied as one batched product, and the outputs gathered back per assignment; memory
          linear in tokens. The CPU choice, and the only one with expert parallelism.
  ragged  the assignments sorted by expert and the experts applied with `jax.lax.ragged_dot` (a
          grouped product: on GPU and TPU it runs only the rows each expert holds; XLA:CPU computes
          it as a masked dense product). Dropped assignments are computed and weighted 0.
  auto    gather on CPU and with expert parallelism, ragged elsewhere.

Expert parallelism: with a mesh axis `expert` of n > 1 devices, the experts' weights are split over
it and every device routes its own rows (the batch is split over `data` and `expert`); inside
`jax.shard_map`, an `all_to_all` sends each expert's slots to the device holding it and another
brings the outputs back.

Auxiliary losses (means over the tokens, unweighted here; the train step applies
`train.moe_aux_loss` and `train.router_z_loss`):
  moe_balance  E · Σ_e f_e · p_e, f_e the fraction of tokens that chose expert e among their k and
               p_e the mean router probability of e (Switch's loss, counted as transformers and
               MaxText count it): k at perfect balance, up to E when every token chooses the same
               experts.
  router_z     the mean of logsumexp(router logits)², ST-MoE's z-loss.
Statistics: each expert's share of the assignments (`moe_load/eJ`), the fraction of assignments
dropped, the router's entropy; with streams, each stream's shares (`moe_load/sP/eJ`) and how far
they are from the mean (`moe_stream_tv`, total variation: 0 when the streams route alike).

Shape suffixes: the package's (lm.py), among them E experts, k the experts of a token, A a group's
assignments (k·S, choice-major), J groups (P·B), Z slots per expert and group; R tokens (P·B·S).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from parscale_jax import sharding
from parscale_jax.model.config import ModelConfig
from parscale_jax.model.ffn import FFN_TYPES, SwiGLU
from parscale_jax.model.layers import Aux, Linear, normal
from parscale_jax.model.params import declare

MOE_IMPLS = ("auto", "gather", "ragged")


def expert_width(cfg: ModelConfig) -> int:
    """F of one expert: `model.moe_intermediate_size`, or the dense width when that is 0."""
    return cfg.moe_intermediate_size or cfg.intermediate_size


def capacity(cfg: ModelConfig, group: int) -> int:
    """Slots per expert in a group of `group` tokens (all of them when dropless)."""
    if cfg.moe_capacity_factor == 0:
        return group
    return max(1, min(group, math.ceil(cfg.moe_capacity_factor * cfg.experts_per_token * group / cfg.num_experts)))


def route(logits_RE: jax.Array, k: int, renormalize: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(chosen experts `[R, k]`, their weights `[R, k]`, router probabilities `[R, E]`), float32."""
    probs_RE = jax.nn.softmax(logits_RE.astype(jnp.float32), axis=-1)
    weight_Rk, expert_Rk = jax.lax.top_k(probs_RE, k)
    if renormalize:
        weight_Rk = weight_Rk / jnp.sum(weight_Rk, axis=-1, keepdims=True)
    return expert_Rk, weight_Rk, probs_RE


def balance_loss(probs_RE: jax.Array, expert_Rk: jax.Array) -> jax.Array:
    """E · Σ_e f_e · p_e: f_e the fraction of tokens with e among their k choices, p_e the mean
    probability of e. k at perfect balance (the transformers and MaxText convention)."""
    E = probs_RE.shape[-1]
    f_E = jnp.mean(jnp.sum(jax.nn.one_hot(expert_Rk, E, dtype=jnp.float32), axis=1), axis=0)
    return E * jnp.sum(f_E * jnp.mean(probs_RE, axis=0))


def slots(expert_JA: jax.Array, num_experts: int, slots_per_expert: int) -> tuple[jax.Array, jax.Array]:
    """(slot of each assignment in its group's `[E·Z]` buffer, whether it found one). Assignments
    take slots in order along A; one that finds its expert full gets the spare slot E·Z."""
    onehot_JAE = jax.nn.one_hot(expert_JA, num_experts, dtype=jnp.int32)
    position_JA = jnp.sum((jnp.cumsum(onehot_JAE, axis=1) - 1) * onehot_JAE, axis=-1)
    kept_JA = position_JA < slots_per_expert
    slot_JA = jnp.where(kept_JA, expert_JA * slots_per_expert + position_JA, num_experts * slots_per_expert)
    return slot_JA, kept_JA


def swiglu_experts(x_ERD: jax.Array, gate_EDF, up_EDF, down_EFD) -> jax.Array:
    """Each expert's SwiGLU on its own rows: `[E, R, D]` → `[E, R, D]`."""
    h_ERF = nnx.silu(jnp.einsum("erd,edf->erf", x_ERD, gate_EDF)) * jnp.einsum("erd,edf->erf", x_ERD, up_EDF)
    return jnp.einsum("erf,efd->erd", h_ERF, down_EFD)


def gather_dispatch(x_JSD, expert_JA, weight_JA, num_experts: int, slots_per_expert: int, weights,
                    exchange=None) -> jax.Array:
    """The routed outputs `[J, S, D]` through per-group `[E, Z, D]` buffers. `exchange` is a pair of
    functions that move the buffers `[E, J, Z, D]` to the devices holding their experts and back
    (expert parallelism); `weights` are then the local experts' ones."""
    J, S, D = x_JSD.shape
    E, Z, A = num_experts, slots_per_expert, expert_JA.shape[1]
    slot_JA, kept_JA = slots(expert_JA, E, Z)
    token_JA = jnp.broadcast_to(jnp.arange(A) % S, (J, A))
    # Which token fills each slot (S: none, a zero row). Dropped assignments all write the spare slot.
    source_JZ = jnp.full((J, E * Z + 1), S, jnp.int32).at[jnp.arange(J)[:, None], slot_JA].set(token_JA)
    x_pad_JSD = jnp.concatenate([x_JSD, jnp.zeros((J, 1, D), x_JSD.dtype)], axis=1)
    buffer_JZD = jnp.take_along_axis(x_pad_JSD, source_JZ[:, :E * Z, None], axis=1)
    buffer_EJZD = buffer_JZD.reshape(J, E, Z, D).transpose(1, 0, 2, 3)
    if exchange is not None:
        buffer_EJZD = exchange[0](buffer_EJZD)
    e, j = buffer_EJZD.shape[:2]  # the experts this device holds, the groups it holds them for
    out_EJZD = swiglu_experts(buffer_EJZD.reshape(e, j * Z, D), *weights).reshape(e, j, Z, D)
    if exchange is not None:
        out_EJZD = exchange[1](out_EJZD)
    out_JZD = jnp.concatenate([out_EJZD.transpose(1, 0, 2, 3).reshape(J, E * Z, D),
                               jnp.zeros((J, 1, D), out_EJZD.dtype)], axis=1)
    y_JAD = jnp.take_along_axis(out_JZD, slot_JA[..., None], axis=1) * weight_JA[..., None].astype(out_JZD.dtype)
    return jnp.sum(y_JAD.reshape(J, A // S, S, D), axis=1)


def ragged_dispatch(x_JSD, expert_JA, weight_JA, num_experts: int, slots_per_expert: int, weights) -> jax.Array:
    """The routed outputs `[J, S, D]` through `jax.lax.ragged_dot` over the assignments sorted by
    expert; dropped assignments (the same as `gather_dispatch` drops) weigh 0."""
    J, S, D = x_JSD.shape
    E, A = num_experts, expert_JA.shape[1]
    _, kept_JA = slots(expert_JA, E, slots_per_expert)
    row_JA = jnp.arange(J)[:, None] * S + jnp.arange(A)[None, :] % S
    order = jnp.argsort(expert_JA.reshape(-1), stable=True)
    x_sorted = x_JSD.reshape(J * S, D)[row_JA.reshape(-1)[order]]
    sizes_E = jnp.bincount(expert_JA.reshape(-1), length=E).astype(jnp.int32)
    gate_EDF, up_EDF, down_EFD = weights
    h = nnx.silu(jax.lax.ragged_dot(x_sorted, gate_EDF, sizes_E)) * jax.lax.ragged_dot(x_sorted, up_EDF, sizes_E)
    out_sorted = jax.lax.ragged_dot(h, down_EFD, sizes_E)
    out_AD = jnp.zeros_like(out_sorted).at[order].set(out_sorted)
    scale_JA = jnp.where(kept_JA, weight_JA, 0.0).astype(out_AD.dtype)
    y_JAD = out_AD.reshape(J, A, D) * scale_JA[..., None]
    return jnp.sum(y_JAD.reshape(J, A // S, S, D), axis=1)


def expert_parallel_size() -> int:
    """Devices on the `expert` mesh axis of the mesh in force (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty or "expert" not in mesh.axis_names else mesh.shape["expert"]


def _expert_parallel(x_PBSD, expert_PBA, weight_PBA, num_experts: int, slots_per_expert: int, weights) -> jax.Array:
    """`gather_dispatch` inside `jax.shard_map`: each device routes its own rows, and two
    `all_to_all`s over `expert` carry the buffers to the experts' devices and back."""
    rows = sharding.spec(("stream", "batch"))
    expert_weights = jax.sharding.PartitionSpec("expert")

    def local(x_PBSD, expert_PBA, weight_PBA, *weights):
        P, B, S, D = x_PBSD.shape
        # [E, J, Z, D] → [E / n, n · J, Z, D]: each device's slots for the experts it holds, and back.
        exchange = (lambda b: jax.lax.all_to_all(b, "expert", 0, 1, tiled=True),
                    lambda b: jax.lax.all_to_all(b, "expert", 1, 0, tiled=True))
        y_JSD = gather_dispatch(x_PBSD.reshape(P * B, S, D), expert_PBA.reshape(P * B, -1),
                                weight_PBA.reshape(P * B, -1), num_experts, slots_per_expert, weights, exchange)
        return y_JSD.reshape(P, B, S, D)

    return jax.shard_map(local, in_specs=(rows, rows, rows, *(expert_weights,) * 3), out_specs=rows)(
        x_PBSD, expert_PBA, weight_PBA, *weights)


class MoE(nnx.Module):
    """E routed SwiGLU experts (and optionally a gated shared expert)."""

    HF_NAMES = {  # Qwen2-MoE / Qwen3-MoE names; interop/hf.py renames them for Mixtral
        "router/kernel": ("gate.weight", "transpose"),
        "gate_proj": ("experts.{e}.gate_proj.weight", "transpose"),
        "up_proj": ("experts.{e}.up_proj.weight", "transpose"),
        "down_proj": ("experts.{e}.down_proj.weight", "transpose"),
        "shared_expert/gate_proj/kernel": ("shared_expert.gate_proj.weight", "transpose"),
        "shared_expert/up_proj/kernel": ("shared_expert.up_proj.weight", "transpose"),
        "shared_expert/down_proj/kernel": ("shared_expert.down_proj.weight", "transpose"),
        "shared_expert_gate/kernel": ("shared_expert_gate.weight", "transpose"),
    }
    OUTPUT_PROJECTIONS = ("down_proj", "shared_expert/down_proj")

    @staticmethod
    def flops_per_token(cfg: ModelConfig) -> int:
        """The router, the k chosen experts and the shared expert (its gate included); capacity
        padding and dropped tokens are not counted."""
        D, E = cfg.hidden_size, cfg.num_experts
        shared = 2 * (3 * D * cfg.moe_shared_expert_size + D) if cfg.moe_shared_expert_size else 0
        return 2 * D * E + cfg.experts_per_token * 2 * 3 * D * expert_width(cfg) + shared

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, E, F = cfg.hidden_size, cfg.num_experts, expert_width(cfg)
        param_dtype, init = jnp.dtype(cfg.param_dtype), normal(cfg.init_std)
        self.router = Linear(cfg, rngs, D, E, ("embed", "routes"))
        self.gate_proj = nnx.Param(init(rngs.params(), (E, D, F), param_dtype), **declare(("experts", "embed", "mlp"), "matrix"))
        self.up_proj = nnx.Param(init(rngs.params(), (E, D, F), param_dtype), **declare(("experts", "embed", "mlp"), "matrix"))
        self.down_proj = nnx.Param(init(rngs.params(), (E, F, D), param_dtype), **declare(("experts", "mlp", "embed"), "matrix"))
        if cfg.moe_shared_expert_size:
            self.shared_expert = SwiGLU(dataclasses.replace(cfg, intermediate_size=cfg.moe_shared_expert_size), rngs)
            self.shared_expert_gate = Linear(cfg, rngs, D, 1, ("embed", "routes"))
        self.cfg = cfg

    def __call__(self, x_PBSD: jax.Array) -> tuple[jax.Array, Aux]:
        cfg = self.cfg
        P, B, S, D = x_PBSD.shape
        E, k = cfg.num_experts, cfg.experts_per_token
        dtype = jnp.dtype(cfg.dtype)
        logits_RE = x_PBSD.reshape(-1, D).astype(jnp.float32) @ self.router.kernel[...].astype(jnp.float32)
        expert_Rk, weight_Rk, probs_RE = route(logits_RE, k, cfg.moe_renormalize)
        # Assignments per group (a stream's row), choice-major: every first choice, then every second.
        expert_PBA = jnp.swapaxes(expert_Rk.reshape(P, B, S, k), -1, -2).reshape(P, B, k * S)
        weight_PBA = jnp.swapaxes(weight_Rk.reshape(P, B, S, k), -1, -2).reshape(P, B, k * S)
        Z = capacity(cfg, S)
        weights = tuple(w[...].astype(dtype) for w in (self.gate_proj, self.up_proj, self.down_proj))
        x_PBSD = x_PBSD.astype(dtype)
        impl = cfg.moe_impl
        if impl == "auto":
            impl = "gather" if jax.default_backend() == "cpu" else "ragged"
        if expert_parallel_size() > 1:
            y_PBSD = _expert_parallel(x_PBSD, expert_PBA, weight_PBA, E, Z, weights)
        else:
            dispatch = gather_dispatch if impl == "gather" else ragged_dispatch
            y_PBSD = dispatch(x_PBSD.reshape(P * B, S, D), expert_PBA.reshape(P * B, k * S),
                              weight_PBA.reshape(P * B, k * S), E, Z, weights).reshape(P, B, S, D)
        if cfg.moe_shared_expert_size:
            shared_PBSD, _ = self.shared_expert(x_PBSD)
            y_PBSD = y_PBSD + jax.nn.sigmoid(self.shared_expert_gate(x_PBSD)) * shared_PBSD
        return y_PBSD, self.aux(logits_RE, probs_RE, expert_Rk, expert_PBA, P)

    def aux(self, logits_RE, probs_RE, expert_Rk, expert_PBA, P: int) -> Aux:
        """The router's losses and statistics (see the module's docstring)."""
        cfg = self.cfg
        E, k = cfg.num_experts, cfg.experts_per_token
        S = expert_PBA.shape[-1] // k
        load_PE = jnp.mean(jax.nn.one_hot(expert_PBA, E, dtype=jnp.float32), axis=(1, 2))  # shares: sum to 1
        load_E = jnp.mean(load_PE, axis=0)
        z = jnp.mean(jnp.square(jax.nn.logsumexp(logits_RE, axis=-1)))
        _, kept_JA = slots(expert_PBA.reshape(-1, k * S), E, capacity(cfg, S))
        entropy = jnp.mean(jnp.sum(jax.scipy.special.entr(probs_RE), axis=-1))
        stats = {"moe_dropped": 1.0 - jnp.mean(kept_JA.astype(jnp.float32)), "router_entropy": entropy,
                 **{f"moe_load/e{e}": load_E[e] for e in range(E)}}
        if P > 1:
            stats["moe_stream_tv"] = jnp.mean(0.5 * jnp.sum(jnp.abs(load_PE - load_E), axis=-1))
            stats.update({f"moe_load/s{p}/e{e}": load_PE[p, e] for p in range(P) for e in range(E)})
        return Aux({"moe_balance": balance_loss(probs_RE, expert_Rk), "router_z": z}, stats)


FFN_TYPES["moe"] = MoE
