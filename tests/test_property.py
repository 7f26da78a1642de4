"""Property: random graphs from the supported blocks, pruned with random channel choices,
stay valid, runnable, and keep their output shapes."""

import os

import numpy as np
from conftest import run
from graphs import BLOCKS, calib_for, random_cnn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onnx
import onnxprune


@settings(max_examples=int(os.environ.get("ONNXPRUNE_FUZZ_EXAMPLES", "6")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=5),
       widths=st.lists(st.integers(2, 12), min_size=5, max_size=5),
       head=st.sampled_from(["gap", "flatten", "dense"]),
       speedup=st.floats(1.0, 2.5), seed=st.integers(0, 10), coupled=st.booleans(),
       method=st.sampled_from(["random", "lasso", "auto"]))
def test_random_graphs_prune_to_valid_models(blocks, widths, head, speedup, seed, coupled, method):
    model = random_cnn(blocks, widths, head, seed=seed)
    x = calib_for(model, 24, seed=seed)
    try:
        result = onnxprune.prune(model, x, speedup=speedup, method=method, reconstruct=method != "random",
                                 seed=seed, prune_coupled=coupled, measure_latency=False)
    except onnxprune.PruneError as exc:  # only an unreachable target is acceptable
        assert "cannot be reached" in str(exc)
        return
    onnx.checker.check_model(result.model, full_check=True)
    ref, out = run(model, x), run(result.model, x)
    assert [r.shape for r in ref] == [o.shape for o in out]
    assert all(np.isfinite(o).all() for o in out)
    # a Split's (or chunk's Slices') parts are costed as if each kept the unit's share of channels;
    # the choice of channels can shift a little work between them, so there the target is met within 10 %
    slack = 0.9 if {"split", "chunk"} & set(blocks) else 1.0
    assert result.report.totals.macs_speedup >= slack * speedup - 1e-9
