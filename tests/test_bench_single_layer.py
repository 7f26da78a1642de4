"""tools/bench_single_layer.py --quick: the single-layer benchmark runs, and reconstruction pays off."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import bench_single_layer  # noqa: E402


@pytest.mark.slow  # benchmark-like; runs by default (`-m "not slow"` leaves it out)
def test_quick_run_prints_every_criterion_and_refit_beats_first_k(tmp_path, capsys):
    plotting = importlib.util.find_spec("matplotlib") is not None  # the bench extra, not the test one
    plot = tmp_path / "single_layer.png"
    results = bench_single_layer.main(["--quick", "--plot", str(plot) if plotting else ""])
    out = capsys.readouterr().out
    labels = [c.label for c in bench_single_layer.CRITERIA]
    assert {"first-k", "max-response", "random", "l1", "thinet", "lasso", "thinet+rec", "lasso+rec"} == set(labels)
    assert len(results) == 1
    (title, cells), = results.items()
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")]
    assert rows == (["criterion", *labels]) * 2  # test-error table, then layer-error table
    assert "| criterion | 2x | 4x |" in out and "He et al. 2017" in out and "wall time" in out
    assert {s for _, s in cells} == {2.0, 4.0}
    assert cells["lasso+rec", 4.0][0] <= cells["first-k", 4.0][0]  # increase of test error, points
    assert cells["lasso+rec", 4.0][1] < cells["lasso", 4.0][1]  # the refit lowers the layer's output error
    assert plot.stat().st_size > 0 if plotting else not plot.exists()
