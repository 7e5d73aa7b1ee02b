"""The parallel scaling law (SPEC §4): L(N, P) = (A / (N · (k ln P + 1)))^α + E.

N counts non-embedding parameters, ParScale extras included (`counting.non_embedding_params`).
The fit follows the paper: a Huber loss (δ = 1e-3) between log L and log L̂, minimized with L-BFGS-B
from every point of a grid of starting values, keeping the best.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
from scipy.optimize import minimize

from parscale_jax.analysis import plotting
from parscale_jax.errors import ConfigError

HUBER_DELTA = 1e-3
A_SCALE = 1e9  # the fit works with A / 1e9, as the paper's script does
START_E = (math.exp(-1), math.exp(-0.5), 1.0)
START_A = tuple(math.exp(i) for i in range(-4, 5))
START_ALPHA = (0.0, 0.5, 1.0, 1.5, 2.0)
START_K = (0.2, 0.4, 0.6, 0.8)


@dataclasses.dataclass(frozen=True)
class Law:
    E: float
    A: float
    k: float
    alpha: float

    def loss(self, N, P):
        """Predicted loss of an N-parameter model with P streams."""
        return (self.A / self.dense_equivalent(N, P)) ** self.alpha + self.E

    def dense_equivalent(self, N, P):
        """Parameters a P = 1 model needs to reach the loss of N parameters with P streams."""
        return np.asarray(N, float) * (self.k * np.log(np.asarray(P, float)) + 1)


@dataclasses.dataclass(frozen=True)
class Fit:
    law: Law
    r2: float  # of the losses themselves
    residuals: np.ndarray  # log L - log L̂, per point
    objective: float


def _huber(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    small = np.abs(r) <= delta
    return np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))


def fit_law(N, P, loss) -> Fit:
    """The paper's fit of the law to measured (N, P, loss) points."""
    N, P, loss = (np.asarray(x, float) for x in (N, P, loss))
    if not (len(N) == len(P) == len(loss)) or len(N) < 4:
        raise ValueError(f"fitting 4 parameters needs at least 4 points, got {len(N)}")
    if np.any(N <= 0) or np.any(P < 1) or np.any(loss <= 0):
        raise ValueError("N must be > 0, P >= 1 and every loss > 0")
    log_loss, log_P = np.log(loss), np.log(P)

    def objective(theta: np.ndarray) -> float:
        E, a, alpha, k = theta
        scaled = a * A_SCALE / (N * (k * log_P + 1))
        if E <= 0 or np.any(scaled <= 0):
            return 1e10  # outside the law's domain
        with np.errstate(over="ignore", invalid="ignore"):
            predicted = scaled**alpha + E
        if not np.all(np.isfinite(predicted)):
            return 1e10
        return float(np.sum(_huber(log_loss - np.log(predicted))))

    best = None
    for start in itertools.product(START_E, START_A, START_ALPHA, START_K):
        result = minimize(objective, np.asarray(start), method="L-BFGS-B")
        if best is None or result.fun < best.fun:
            best = result
    E, a, alpha, k = best.x
    law = Law(E=float(E), A=float(a * A_SCALE), k=float(k), alpha=float(alpha))
    predicted = law.loss(N, P)
    r2 = 1 - np.sum((loss - predicted) ** 2) / np.sum((loss - loss.mean()) ** 2)
    return Fit(law, float(r2), log_loss - np.log(predicted), float(best.fun))


def read_results(path: str, group: str | None) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(N, P, loss) per group of a results CSV with columns non_embedding_params (or N), P, and
    final_loss, eval_loss or loss."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise ConfigError("RESULTS", f"file not found: {path}") from None
    columns = set(rows[0]) if rows else set()

    def pick(options: tuple[str, ...]) -> str:
        found = [c for c in options if c in columns]
        if not found:
            raise ConfigError("RESULTS", f"{path} needs a column named {' or '.join(options)}; it has "
                              f"{', '.join(sorted(columns)) or 'none'}")
        return found[0]

    n_col, p_col, loss_col = pick(("non_embedding_params", "N")), pick(("P",)), \
        pick(("final_loss", "eval_loss", "loss"))
    if group is not None and group not in columns:
        raise ConfigError("--group", f"{path} has no column '{group}'")
    groups: dict[str, list[tuple[float, float, float]]] = {}
    for row in rows:
        try:
            point = (float(row[n_col]), float(row[p_col]), float(row[loss_col]))
        except ValueError:
            raise ConfigError("RESULTS", f"{path}: not a number in row {row}") from None
        groups.setdefault(row[group] if group else "all", []).append(point)
    return {name: tuple(np.asarray(column) for column in zip(*points)) for name, points in groups.items()}


def format_fit(name: str, fit: Fit, N: np.ndarray, P: np.ndarray, loss: np.ndarray) -> str:
    law = fit.law
    lines = [f"== {name}: E = {law.E:.4f}, A = {law.A:.4g}, k = {law.k:.4f}, alpha = {law.alpha:.4f}, "
             f"R^2 = {fit.r2:.4f} ({len(N)} points)",
             "           N     P    loss  predicted  log residual"]
    predicted = law.loss(N, P)
    for n, p, l, q, r in zip(N, P, loss, predicted, fit.residuals):
        lines.append(f"{n:12.4g}  {int(p):4d}  {l:6.4f}  {q:9.4f}  {r:+12.5f}")
    worth = ", ".join(f"P = {p} is worth N x {law.k * math.log(p) + 1:.3f}" for p in (2, 4, 8))
    lines.append(worth)
    return "\n".join(lines)


def fit_groups(groups: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
               predict: tuple[float, float] | None = None) -> tuple[dict[str, tuple[Fit, tuple]], str]:
    """The law fitted to each group of (N, P, loss) points: ({group: (fit, points)}, a report of every
    fit and, with `predict` (N, P), the loss it predicts there)."""
    fits, lines = {}, []
    for name, (N, P, loss) in groups.items():
        try:
            fit = fit_law(N, P, loss)
        except ValueError as err:
            raise ConfigError("RESULTS", f"group '{name}': {err}") from None
        fits[name] = (fit, (N, P, loss))
        lines.append(format_fit(name, fit, N, P, loss))
        if predict:
            n, p = predict
            lines.append(f"predicted loss at N = {n:.4g}, P = {int(p)}: {float(fit.law.loss(n, p)):.4f}; a P = 1 "
                         f"model needs N = {float(fit.law.dense_equivalent(n, p)):.4g} for it")
    return fits, "\n".join(lines)


def plot_fits(fits: dict[str, tuple[Fit, tuple[np.ndarray, np.ndarray, np.ndarray]]], path: str) -> str:
    plt = plotting.pyplot()

    fig, axes = plt.subplots(1, len(fits), figsize=(5.5 * len(fits), 4), squeeze=False)
    for ax, (name, (fit, (N, P, loss))) in zip(axes[0], fits.items()):
        grid = np.geomspace(N.min() * 0.8, N.max() * 1.25, 100)
        for index, p in enumerate(sorted(set(P.tolist()))):
            color = f"C{index}"
            mine = P == p
            ax.scatter(N[mine], loss[mine], color=color)
            ax.plot(grid, fit.law.loss(grid, p), color=color, label=f"P = {int(p)}")
        ax.set(xscale="log", xlabel="non-embedding parameters N", ylabel="loss",
               title=f"{name}: k = {fit.law.k:.3f}, alpha = {fit.law.alpha:.3f}")
        ax.legend()
        ax.grid(alpha=0.3)
    return plotting.save(fig, path)
