"""Fuzzing the CLI: valid models mutated at random (initializers dropped, dims corrupted, inputs
swapped, random attributes …) and random calibration arrays. Whatever comes in, the CLI exits
with 0, 1 or 2 (never 3, an internal error) without a traceback, and whatever it writes is a
valid model (full checker, ONNX Runtime runs it).

CI runs a few examples; a longer run (documented in docs/robustness.md):
    ONNXPRUNE_FUZZ_EXAMPLES=500 python -m pytest -q tests/test_fuzz.py
"""

from __future__ import annotations

import contextlib
import io as stdio
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from graphs import calib_for, tiny_resnet, tiny_vgg
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from onnxprune import cli

BASES = {"vgg": tiny_vgg(), "resnet": tiny_resnet()}
ATTRIBUTES = ["kernel_shape", "strides", "pads", "group", "axis", "transB", "epsilon", "dilations", "keepdims"]


def _drop_initializer(m: onnx.ModelProto, i: int, _v: int) -> None:
    del m.graph.initializer[i % len(m.graph.initializer)]


def _corrupt_dims(m: onnx.ModelProto, i: int, v: int) -> None:
    t = m.graph.initializer[i % len(m.graph.initializer)]
    if t.dims:
        t.dims[v % len(t.dims)] = v


def _swap_inputs(m: onnx.ModelProto, i: int, _v: int) -> None:
    node = m.graph.node[i % len(m.graph.node)]
    if len(node.input) > 1:
        node.input[0], node.input[1] = node.input[1], node.input[0]


def _random_attribute(m: onnx.ModelProto, i: int, v: int) -> None:
    node = m.graph.node[i % len(m.graph.node)]
    name = ATTRIBUTES[v % len(ATTRIBUTES)]
    value = [v % 5] * 2 if name in ("kernel_shape", "strides", "dilations") else [v % 3] * 4 if name == "pads" else v % 4
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend([*kept, onnx.helper.make_attribute(name, float(value) if name == "epsilon" else value)])


def _drop_node(m: onnx.ModelProto, i: int, _v: int) -> None:
    del m.graph.node[i % len(m.graph.node)]


def _input_dim(m: onnx.ModelProto, i: int, v: int) -> None:
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[i % len(dims)].dim_value = v


def _input_type(m: onnx.ModelProto, _i: int, v: int) -> None:
    m.graph.input[0].type.tensor_type.elem_type = [onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64,
                                                   onnx.TensorProto.FLOAT16][v % 3]


def _opset(m: onnx.ModelProto, _i: int, v: int) -> None:
    m.opset_import[0].version = v % 25


MUTATIONS = [_drop_initializer, _corrupt_dims, _swap_inputs, _random_attribute, _drop_node, _input_dim,
             _input_type, _opset]

mutation = st.tuples(st.sampled_from(MUTATIONS), st.integers(0, 50), st.integers(0, 40))
calibration = st.fixed_dictionaries({
    "count": st.integers(0, 12),
    "shape": st.sampled_from(["model", "model", "model", "rank3", "channels", "spatial"]),
    "dtype": st.sampled_from(["float32", "float32", "float64", "float16", "uint8", "int64"]),
    "poison": st.sampled_from([None, None, None, np.nan, np.inf, 1e30]),
})


def _calibration(model: onnx.ModelProto, spec: dict) -> np.ndarray:
    x = calib_for(model, spec["count"])
    x = {"model": x, "rank3": x[:, 0], "channels": x[:, :2], "spatial": x[:, :, :5]}[spec["shape"]]
    if spec["poison"] is not None and x.size:
        x.flat[x.size // 2] = spec["poison"]
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(spec["dtype"])


def _check_written(path: Path, calib: Path) -> None:
    onnx.checker.check_model(str(path), full_check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = sess.get_inputs()[0].shape[0]
    x = np.load(calib)[:1].repeat(batch if isinstance(batch, int) else 1, axis=0)
    outs = sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})
    assert all(o.size for o in outs)


@settings(max_examples=int(os.environ.get("ONNXPRUNE_FUZZ_EXAMPLES", "8")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(base=st.sampled_from(sorted(BASES)), mutations=st.lists(mutation, max_size=3), calib=calibration,
       method=st.sampled_from(["lasso", "l1"]), speedup=st.sampled_from(["1.3", "2"]))
# three images leave one held out: the safety net may judge the result broken (exit 1, written, one line)
@example(base="resnet", mutations=[], calib={"count": 3, "shape": "model", "dtype": "float32", "poison": None},
         method="lasso", speedup="1.3")
def test_mutated_inputs_never_crash(base, mutations, calib, method, speedup):
    model = onnx.ModelProto()
    model.CopyFrom(BASES[base])
    for mutate, i, v in mutations:
        mutate(model, i, v)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        onnx.save_model(model, folder / "m.onnx")
        np.save(folder / "c.npy", _calibration(BASES[base], calib))
        err = stdio.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdio.StringIO()):
            code = cli.main([str(folder / "m.onnx"), "--calib", str(folder / "c.npy"), "-o", str(folder / "out.onnx"),
                             "--method", method, "--speedup", speedup, "-q", "--no-latency"])
        message = err.getvalue()
        event(f"exit {code}")
        assert code in (0, 1, 2), message
        assert "Traceback" not in message and "internal error" not in message, message
        if code == 2 or (code == 1 and not (folder / "out.onnx").exists()):
            assert message.startswith("onnxprune: error: ") and len(message.splitlines()) == 1, message
        elif code == 1:  # written, but the default safety net judged it broken: one line saying so
            assert message.startswith("onnxprune: the pruned model looks broken") and len(message.splitlines()) == 1, message
        if (folder / "out.onnx").exists():
            _check_written(folder / "out.onnx", folder / "c.npy")
