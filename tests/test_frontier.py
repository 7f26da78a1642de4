"""Carried activations: segment runs give what full runs give, in memory or on disk, and the
temporary folder never outlives the run."""

import tempfile

import numpy as np
import onnxruntime as ort
import pytest
from conftest import check_pruned
from graphs import calib_for, tiny_resnet, tiny_vgg
from onnx import numpy_helper

import onnxprune
from onnxprune import frontier as frontier_module
from onnxprune.activations import run_batches
from onnxprune.calib import Calibration
from onnxprune.frontier import Frontier, cut_tensors


def _weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("budget", [1 << 40, 0])
def test_segment_runs_match_runs_from_the_inputs(budget, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = tiny_resnet()
    cal = Calibration({model.graph.input[0].name: calib_for(model, 10)})
    names = [o for n in model.graph.node for o in n.output]
    full = {}
    for idx, values in run_batches(model, names, cal, np.arange(10), 4):
        for k, v in values.items():
            full.setdefault(k, []).append(v)
    with Frontier(model, cal, np.arange(10), 4, budget=budget) as front:
        for position in range(0, len(model.graph.node), 3):
            wanted = names[position:position + 4]
            got = {}
            for idx, values in front.run(wanted, advance_to=position):
                for k, v in values.items():
                    got.setdefault(k, []).append(v)
            assert front.position == position
            assert set(front.kinds) == cut_tensors(model, position) - {model.graph.input[0].name}
            for k in wanted:
                np.testing.assert_allclose(np.concatenate(got[k]), np.concatenate(full[k]), rtol=1e-5, atol=1e-5)
            if budget == 0 and front.kinds:
                assert front.on_disk and any(tmp_path.iterdir())
    assert not any(tmp_path.iterdir())


def test_a_tensor_behind_the_cut_is_computed_from_the_inputs():
    model = tiny_vgg()
    cal = Calibration({model.graph.input[0].name: calib_for(model, 6)})
    first = model.graph.node[0].output[0]
    with Frontier(model, cal, np.arange(6), 4) as front:
        list(front.run([model.graph.output[0].name], advance_to=len(model.graph.node)))
        (got,) = [v[first] for _, v in front.run([first])][:1]
    (want,) = [v[first] for _, v in run_batches(model, [first], cal, np.arange(6), 4)][:1]
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("build", [tiny_vgg, tiny_resnet])
def test_pruning_from_disk_gives_the_same_model(build, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = build()
    x = calib_for(model, 80)
    in_memory = onnxprune.prune(model, x, speedup=2.0, allocation="uniform", measure_latency=False)
    monkeypatch.setattr(frontier_module, "FRONTIER_BUDGET", 0)
    saved = []
    save = Frontier.spill
    monkeypatch.setattr(Frontier, "spill", lambda self, v: saved.append(1) or save(self, v))
    on_disk = onnxprune.prune(model, x, speedup=2.0, allocation="uniform", measure_latency=False)
    a, b = _weights(in_memory.model), _weights(on_disk.model)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    check_pruned(on_disk.model, model, x, max_rel_err=0.6)
    assert saved
    assert not any(tmp_path.iterdir())


def test_an_interrupted_run_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = tiny_resnet()
    cal = Calibration({model.graph.input[0].name: calib_for(model, 12)})
    with pytest.raises(KeyboardInterrupt):
        with Frontier(model, cal, np.arange(12), 4, budget=0) as front:
            list(front.run([model.graph.node[3].output[0]], advance_to=3))
            assert any(tmp_path.iterdir())
            for _ in front.run([model.graph.node[6].output[0]], advance_to=6):
                raise KeyboardInterrupt
    assert not any(tmp_path.iterdir())


def test_a_trial_edit_is_undone():
    from onnxprune.graph import find_groups
    from onnxprune.graphview import GraphView
    from onnxprune.rewrite import prune_group, trial_edit

    model = tiny_resnet()
    before = model.SerializeToString()
    from onnxprune.activations import tensor_shapes

    g = GraphView(model, tensor_shapes(model, Calibration({model.graph.input[0].name: calib_for(model, 2)})))
    group = next(grp for grp in find_groups(g) if grp.prunable and grp.channels > 2)
    with trial_edit(g):
        prune_group(g, group, np.arange(2), group.channels)
        assert model.SerializeToString() != before
    assert model.SerializeToString() == before


def test_calibration_passes_on_cuda_need_cuda():
    """--provider cuda runs the calibration passes on CUDA; without it, a one-line error."""
    import onnxruntime as ort

    from onnxprune.errors import OptionError

    model = tiny_vgg()
    x = calib_for(model, 30)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        result = onnxprune.prune(model, x, speedup=1.5, provider="cuda", measure_latency=False)
        check_pruned(result.model, model, x, max_rel_err=0.6)
        return
    with pytest.raises(OptionError, match="CUDA") as err:
        onnxprune.prune(model, x, speedup=1.5, provider="cuda", measure_latency=False)
    assert "\n" not in str(err.value)


def test_weights_handed_to_sessions_as_arrays_give_the_same_runs_and_model(monkeypatch):
    """Large initializers go to ONNX Runtime as arrays, not serialised: with every initializer
    handed over, segment runs, full runs and the pruned model are what they were."""
    from onnxprune import io as io_module

    model = tiny_resnet()
    x = calib_for(model, 40)
    cal = Calibration({model.graph.input[0].name: x[:10]})
    names = [o for n in model.graph.node for o in n.output]

    def runs():
        full = np.concatenate([v[names[-1]] for _, v in run_batches(model, names[-1:], cal, np.arange(10), 4)])
        with Frontier(model, cal, np.arange(10), 4) as front:
            list(front.run([], advance_to=len(model.graph.node) // 2))
            seg = np.concatenate([v[names[-1]] for _, v in front.run(names[-1:])])
        return full, seg, onnxprune.prune(model, x, speedup=2.0, measure_latency=False).model

    full, seg, pruned = runs()
    monkeypatch.setattr(io_module, "HANDED_BYTES", 1)
    handed_full, handed_seg, handed_pruned = runs()
    np.testing.assert_array_equal(handed_full, full)
    np.testing.assert_allclose(handed_seg, seg, rtol=1e-6, atol=1e-6)
    assert _weights(handed_pruned).keys() == _weights(pruned).keys()
    for name, w in _weights(pruned).items():
        np.testing.assert_allclose(_weights(handed_pruned)[name], w, rtol=1e-5, atol=1e-6)
    check_pruned(handed_pruned, model, x[:8], max_rel_err=1.0)
    # over protobuf's limit, the stubs' model goes through a temporary file with external data
    monkeypatch.setattr(io_module, "PROTOBUF_LIMIT", 200)
    big_full, big_seg, _ = runs()
    np.testing.assert_array_equal(big_full, full)
    np.testing.assert_allclose(big_seg, seg, rtol=1e-6, atol=1e-6)


def test_stubs_without_their_source_give_a_clear_error_and_latency_sessions_hand_nothing(monkeypatch):
    """A segment's stubs need the model they came from; a latency session loads the whole model
    as a runtime would (nothing handed), and the model given is left as it was."""
    from onnxprune import io as io_module
    from onnxprune.frontier import segment_model
    from onnxprune.latency import provider_session

    model = tiny_resnet()
    monkeypatch.setattr(io_module, "HANDED_BYTES", 1)
    before = model.SerializeToString()
    names = [o for n in model.graph.node for o in n.output]
    seg = segment_model(model, 0, {model.graph.input[0].name: (np.dtype(np.float32), (None,) * 4)}, names[-1:])
    opts = ort.SessionOptions()
    with pytest.raises(ValueError, match="stubs"):
        io_module.inference_session(seg, opts, ["CPUExecutionProvider"])
    sess = provider_session(model)
    assert sess.handed_arrays == []
    x = calib_for(model, 2)
    assert sess.run(None, {model.graph.input[0].name: x})[0].shape[0] == 2
    assert model.SerializeToString() == before


def test_segments_declare_the_shapes_of_what_they_carry():
    """A segment that starts after the input's size was read (``x.shape[-2:]`` as two scalars,
    torchvision's segmenters) and resizes to it: ONNX Runtime refuses the segment where the
    scalars are declared of unknown rank ("Number of elements of input 'sizes' (0)"; DeepLabV3's
    probes stopped there in an internal error). Declared at rank 0, it runs as the whole model."""
    from onnx import TensorProto
    from onnxprune.frontier import segment_model
    from graphs import Builder

    b = Builder(in_shape=("N", 3, 16, 16), opset=17)
    shape = b.node("Shape", ["input"])
    h, w = (b.node("Gather", [shape, b.const(np.array(axis, np.int64))], axis=0) for axis in (2, 3))
    x = b.node("Relu", [b.conv("input", 3, 8, stride=2)])
    y = b.conv(x, 8, 4, k=1, pad=0)
    zero = b.const(np.array([0], np.int64))
    hw = b.node("Cast", [b.node("Concat", [b.node("Unsqueeze", [h, zero]), b.node("Unsqueeze", [w, zero])], axis=0)],
                to=TensorProto.INT64)
    kept = b.node("Slice", [b.node("Shape", [y]), zero, b.const(np.array([2], np.int64)), zero])
    model = b.build(b.node("Resize", [y, "", "", b.node("Concat", [kept, hw], axis=0)], mode="linear"),
                    out_shape=["N", 4, 16, 16])
    xs = calib_for(model, 2)
    (whole,) = ort.InferenceSession(model.SerializeToString()).run(None, {"input": xs})
    start = next(i for i, n in enumerate(model.graph.node) if n.op_type == "Conv")
    carried = {h: np.array(16), w: np.array(16), "input": xs}
    seg = segment_model(model, start, {k: (v.dtype, v.shape) for k, v in carried.items()}, [model.graph.output[0].name])
    assert {i.name for i in seg.graph.input} == {h, w, "input"}
    (part,) = ort.InferenceSession(seg.SerializeToString()).run(None, {i.name: carried[i.name] for i in seg.graph.input})
    np.testing.assert_allclose(part, whole, rtol=1e-6)


def test_a_carried_slice_of_a_shape_keeps_its_length():
    """tf2onnx's resize to a fixed size: ``sizes = Concat(Shape(x)[0:2], [H, W])``. A cut between
    the ``Slice`` and the ``Resize`` carries a 1-D tensor of two; declared of unknown length, ONNX
    Runtime refuses the segment ("Number of elements of input 'sizes' (0)", OpenVINO's road
    segmenter stopped there in an internal error). Declared as seen, it runs as the whole model."""
    from graphs import Builder

    b = Builder(in_shape=("N", 3, 8, 8), opset=11)
    x = b.node("Relu", [b.conv("input", 3, 4)])
    kept = b.node("Slice", [b.node("Shape", [x]), b.const(np.array([0], np.int64)), b.const(np.array([2], np.int64))])
    sizes = b.node("Concat", [kept, b.const(np.array([16, 16], np.int64))], axis=0)
    empty = b.const(np.zeros(0, np.float32))
    model = b.build(b.conv(b.node("Resize", [x, empty, empty, sizes], mode="nearest"), 4, 2),
                    out_shape=["N", 2, 16, 16])
    cal = Calibration({"input": calib_for(model, 5)})
    out = model.graph.output[0].name
    (want,) = [v[out] for _, v in run_batches(model, [out], cal, np.arange(5), 5)]
    joined = next(i for i, n in enumerate(model.graph.node) if n.op_type == "Concat")
    with Frontier(model, cal, np.arange(5), 3) as front:
        list(front.run([], advance_to=joined))
        assert front.kinds[kept] == (np.dtype(np.int64), (2,))
        got = np.concatenate([v[out] for _, v in front.run([out])])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
