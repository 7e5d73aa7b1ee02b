"""The parallel scaling law: the paper's fitting procedure gives back its published fits."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from parscale_jax.cli import main
from parscale_jax.analysis.scaling_law import Law, fit_law

LOSSES = Path(__file__).parent / "data" / "paper_losses.csv"
# SPEC §4: the published fits.
PUBLISHED = {"stack-v2-python": dict(E=0.6912, A=1.131e7, k=0.3935, alpha=0.1894, r2=0.9978),
             "pile": dict(E=1.2888, A=1.974e8, k=0.3345, alpha=0.1963, r2=0.9987)}


def corpus_points(corpus):
    rows = [r for r in csv.DictReader(LOSSES.open()) if r["corpus"] == corpus]
    return ([float(r["non_embedding_params"]) for r in rows], [int(r["P"]) for r in rows],
            [float(r["final_loss"]) for r in rows])


@pytest.mark.parametrize("corpus", PUBLISHED)
def test_fit_reproduces_the_published_law(corpus):
    fit = fit_law(*corpus_points(corpus))
    expected = PUBLISHED[corpus]
    for name in ("E", "A", "k", "alpha"):
        assert getattr(fit.law, name) == pytest.approx(expected[name], rel=1e-3), name
    assert round(fit.r2, 4) == expected["r2"]
    assert np.max(np.abs(fit.residuals)) < 0.01  # every run within 1% of the law


def test_law_predictions():
    law = Law(**{k: v for k, v in PUBLISHED["stack-v2-python"].items() if k != "r2"})
    assert law.dense_equivalent(1e9, 1) == 1e9
    assert law.dense_equivalent(1e9, 8) == pytest.approx(1e9 * (0.3935 * np.log(8) + 1))
    # P streams predict exactly the loss of their dense equivalent at P = 1.
    assert law.loss(1e9, 8) == pytest.approx(law.loss(law.dense_equivalent(1e9, 8), 1))
    assert law.loss(1e9, 8) < law.loss(1e9, 4) < law.loss(1e9, 1)


def test_fit_law_command(tmp_path, capsys):
    plot = tmp_path / "law.png"
    assert main(["fit-law", str(LOSSES), "--group", "corpus", "--predict", "1.6e9", "8", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    for corpus, expected in PUBLISHED.items():
        (header,) = [line for line in out.splitlines() if line.startswith(f"== {corpus}: ")]
        printed = dict(item.split(" = ") for item in header.split(": ", 1)[1].split(" (")[0].split(", "))
        for name, key in (("E", "E"), ("A", "A"), ("k", "k"), ("alpha", "alpha"), ("R^2", "r2")):
            assert float(printed[name]) == pytest.approx(expected[key], rel=1e-3), (corpus, name)
    assert "P = 8 is worth N x 1.818" in out  # 0.3935 ln 8 + 1
    assert out.count("predicted loss at N = 1.6e+09, P = 8") == 2
    assert plot.stat().st_size > 1000


@pytest.mark.parametrize("content,fragment", [
    ("size,P,final_loss\n1,1,2\n", "needs a column named non_embedding_params or N"),
    ("N,P,loss\n1e6,1,3\n2e6,1,2.9\n", "at least 4 points"),
    ("N,P,loss\n1e6,1,3\n2e6,1,x\n", "not a number"),
])
def test_bad_results_files_are_one_line_errors(tmp_path, capsys, content, fragment):
    path = tmp_path / "results.csv"
    path.write_text(content)
    assert main(["fit-law", str(path)]) == 2
    assert fragment in capsys.readouterr().err
