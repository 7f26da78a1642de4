"""Channels nothing reads: found through the readers' channel rules, and left out of selection."""

import numpy as np
from conftest import check_pruned
from graphs import Builder

import onnxprune
from onnxprune.liveness import read_outputs
from onnxprune.options import PruneOptions
from onnxprune.pipeline import Pruner


def head_with_unread_outputs() -> tuple:
    """A trunk of 8 channels read by a 1×1 head of 4 outputs, of which a ``Slice`` after a
    ``Resize`` keeps outputs 0–1 (the graph output); outputs 2–3, a hundred times larger, are read
    by nothing, as in a multi-task head exported for one task. Trunk channels 0–3 feed the read
    outputs, 4–7 the unread ones."""
    b = Builder(in_shape=("N", 8, 8, 8))
    trunk = b.node("Relu", [b.node("Conv", ["input", b.const(np.eye(8, dtype=np.float32).reshape(8, 8, 1, 1)),
                                             b.const(np.zeros(8, np.float32))])])
    w = np.zeros((4, 8, 1, 1), np.float32)
    w[:2, :4, 0, 0] = b.rng.normal(0, 1, (2, 4))
    w[2:, 4:, 0, 0] = 100 * b.rng.normal(0, 1, (2, 4))
    head = b.node("Conv", [trunk, b.const(w), b.const(np.zeros(4, np.float32))])
    up = b.node("Resize", [head, "", b.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    read = b.node("Slice", [up, b.const(np.array([0])), b.const(np.array([2])), b.const(np.array([1]))])
    return b.build(read), head


def test_channels_a_slice_leaves_are_unread():
    model, head = head_with_unread_outputs()
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 8)).astype(np.float32)
    g = Pruner(model, x, PruneOptions(speedup=1.5, progress=False, measure_latency=False)).analysis.g
    assert read_outputs(g, head).tolist() == [True, True, False, False]
    trunk = g.producer[head].input[0]
    assert read_outputs(g, trunk) is None  # the head, a layer, reads every trunk channel


def test_selection_keeps_what_feeds_the_read_outputs():
    """Halving the trunk: the selection weighs the head's error on its read outputs only, so it
    keeps trunk channels 0–3 and the output is exact; weighed on every output it would keep the
    channels of the large unread ones."""
    model, _ = head_with_unread_outputs()
    x = np.random.default_rng(0).normal(size=(200, 8, 8, 8)).astype(np.float32)
    for method in ("obs", "lasso"):
        result = onnxprune.prune(model, x, speedup=1.8, method=method, allocation="uniform", measure_latency=False,
                                 round_to=1)
        assert [grp.channels_after for grp in result.report.groups] == [4]
        check_pruned(result.model, model, x[:20], max_rel_err=1e-3)
