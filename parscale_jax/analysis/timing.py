"""Timing on a shared machine: medians over repeats, and a decode step's latency from the times its
tokens reached the host. Used by the benchmarks and their PyTorch peer alike."""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import numpy as np


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def step_latency_s(stamps: list[list[float]]) -> float:
    """Per-token latency from the times each run's tokens reached the host: the median interval
    between consecutive tokens, one decode step each, over all runs (a direct measure, unlike a
    difference of two run times, which noise can drive to zero)."""
    return float(np.median(np.concatenate([np.diff(run) for run in stamps])))
