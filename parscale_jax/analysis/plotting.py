"""Figures for the benchmarks and the scaling law: matplotlib without a display, written as PNG.

matplotlib is optional (the `bench` extra): importing it is left to the first figure.
"""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (raises ImportError when matplotlib is absent)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | Path) -> str | Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path
