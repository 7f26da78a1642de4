"""Build a model over 2 GB with external data, prune it through the CLI, and check that every
byte was read and written correctly. Slow and disk-hungry (about 3× the model size on disk):
never run in CI.

    python tools/big_external_data.py --out /tmp/big            # ~2.25 GiB of weights
    python tools/big_external_data.py --out /tmp/big --channels 2048 --blocks 2   # a small variant

The model: ``blocks`` residual blocks of two 1×1 convs (C → C → C) on a static [1, C, 4, 4]
input, random weights. Only the inner channels can be pruned (block outputs are residual), so
``--method l1 --no-reconstruct`` gives an exact reference: the original network with the same
filters removed, computed here in NumPy. Also round-trips the >2 GB model through
``io.save_model_atomic`` (the writer for outputs over 2 GB) and compares every tensor.
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxprune import io  # noqa: E402


def weights(channels: int, blocks: int, seed: int) -> list[np.ndarray]:
    """W1, W2 of every block, (C, C, 1, 1) float32, scaled to keep activations bounded."""
    rng = np.random.default_rng(seed)
    scale = np.float32(1.0 / np.sqrt(channels))
    return [(rng.standard_normal((channels, channels), dtype=np.float32) * scale)[:, :, None, None]
            for _ in range(2 * blocks)]


def build(channels: int, blocks: int, seed: int, folder: Path) -> Path:
    """Write big.onnx + big.onnx.data (one tensor in memory at a time beyond the proto)."""
    nodes, inits, x = [], [], "input"
    for b, w in enumerate(weights(channels, blocks, seed)):
        inits.append(numpy_helper.from_array(w, f"w{b}"))
        del w
        out = f"t{b}"
        nodes.append(helper.make_node("Conv", [x, f"w{b}"], [out], kernel_shape=[1, 1]))
        if b % 2 == 0:
            nodes.append(helper.make_node("Relu", [out], [f"{out}_relu"]))
            x, skip = f"{out}_relu", (x if b == 0 else skip)  # noqa: F821
        else:
            nodes.append(helper.make_node("Add", [out, skip], [f"{out}_add"]))
            nodes.append(helper.make_node("Relu", [f"{out}_add"], [f"{out}_res"]))
            x = skip = f"{out}_res"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, channels, 4, 4])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, channels, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path = folder / "big.onnx"
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="big.onnx.data", size_threshold=1024)
    return path


def reference(ws: list[np.ndarray], keep: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    """The original network with block b's inner channels cut to ``keep[b]`` (NumPy, 1×1 convs)."""
    h = x.reshape(x.shape[1], -1).astype(np.float64)
    for b in range(len(keep)):
        w1, w2 = ws[2 * b][keep[b], :, 0, 0], ws[2 * b + 1][:, keep[b], 0, 0]
        h = np.maximum(w2 @ np.maximum(w1 @ h, 0) + h, 0)
    return h.reshape(x.shape)


def kept_rows(original: np.ndarray, pruned: np.ndarray) -> np.ndarray:
    """Which rows of ``original`` ``pruned`` kept (exact byte matches), in order."""
    index = {hashlib.sha1(r.tobytes()).digest(): i for i, r in enumerate(original)}
    return np.array([index[hashlib.sha1(r.tobytes()).digest()] for r in pruned])


def check_pruned(ws: list[np.ndarray], out: Path) -> float:
    """Full checker on the written file; every kept filter byte-identical; ORT = NumPy reference."""
    import onnxruntime as ort

    onnx.checker.check_model(str(out), full_check=True)
    pruned = onnx.load(str(out))
    arrays = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    convs = [n for n in pruned.graph.node if n.op_type == "Conv"]
    keep = []
    for b in range(len(ws) // 2):
        w1, w2 = arrays[convs[2 * b].input[1]], arrays[convs[2 * b + 1].input[1]]
        k = kept_rows(ws[2 * b][:, :, 0, 0], w1[:, :, 0, 0])
        assert np.array_equal(w2, ws[2 * b + 1][:, k]), f"block {b}: second conv's kept columns differ"
        keep.append(k)
    x = np.random.default_rng(1).standard_normal((1, ws[0].shape[1], 4, 4), dtype=np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    ref = reference(ws, keep, x)
    print(f"kept inner channels per block: {[len(k) for k in keep]} of {ws[0].shape[0]}")
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def check_round_trip(path: Path, folder: Path) -> float:
    """io.load_model → io.save_model_atomic (external data over 2 GB) → every tensor identical."""
    start = time.perf_counter()
    model = io.load_model(path)
    saved = io.save_model_atomic(model, folder / "copy.onnx", force=True, protected=(path,))
    again = io.load_model(saved)
    assert [t.name for t in again.graph.initializer] == [t.name for t in model.graph.initializer]
    for a, b in zip(model.graph.initializer, again.graph.initializer):
        assert a.raw_data == b.raw_data and list(a.dims) == list(b.dims), a.name
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="working folder (needs ~3x the model size free)")
    p.add_argument("--channels", type=int, default=6144)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--speedup", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    path = build(args.channels, args.blocks, args.seed, args.out)
    size = (path.stat().st_size + (args.out / "big.onnx.data").stat().st_size) / 2**30
    print(f"built {path} ({size:.2f} GiB with its data) in {time.perf_counter() - start:.0f}s")
    out = args.out / "pruned.onnx"
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "onnxprune", str(path), "--method", "l1", "--no-reconstruct",
           "--speedup", str(args.speedup), "-o", str(out), "--force", "-q"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    if proc.returncode:
        sys.exit(f"the CLI failed (exit {proc.returncode}): {proc.stderr.strip()}")
    written = sum(f.stat().st_size for f in args.out.glob("pruned.onnx*")) / 2**30
    print(f"CLI prune: {seconds:.0f}s, peak RSS {peak:.1f} GiB, wrote {written:.2f} GiB")
    ws = weights(args.channels, args.blocks, args.seed)
    err = check_pruned(ws, out)
    print(f"pruned model: full checker ok, kept filters byte-identical, ORT vs NumPy relative error {err:.2e}")
    assert err < 1e-4
    del ws
    print(f"round trip through io.load_model + io.save_model_atomic: ok in {check_round_trip(path, args.out):.0f}s")


if __name__ == "__main__":
    main()
