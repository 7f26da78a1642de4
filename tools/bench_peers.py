"""onnxprune against Torch-Pruning on the shipped Fashion-MNIST models, from the same weights, no fine-tuning.

    python tools/bench_peers.py [--speedups 1.5 2 3] [--models vgg_fmnist resnet_fmnist] [--plot docs/peers.png]

The shipped ONNX models are rebuilt in PyTorch from their initializers (the classes of
tools/train_fashion_mnist.py; the VGG's exporter folded BN into its convs, so it is rebuilt with
conv biases and no BN) and checked against ONNX Runtime on the calibration images. Torch-Pruning's
MetaPruner (global_pruning=False, the final classifier ignored) then prunes them with its magnitude
(L1), BN-scale and random importances, its pruning ratio bisected until the MACs speedup
(tp.utils.count_ops_and_params) is within --tol of each target; each pruned model is exported to
ONNX (legacy exporter, opset 13). onnxprune's lasso (what the default auto picks here), thinet and l1 without reconstruction
run at the same targets on the same calibration file. Every model is scored the same way: test
top-1 with ONNX Runtime, MACs by onnxprune's cost model (Conv/Gemm, BN folded), ORT CPU batch-1
latency interleaved with the original (10th percentiles, as onnxprune's report compares them). Prints one markdown table and writes a plot.

onnxsim 0.8.1's structured pruning (``apply_structured_pruning``, L2 filter norms, and
``apply_structured_wanda_pruning``, weight norm × activation norm on the calibration images) runs
too, its per-chain sparsity bisected to each MACs target, also without fine-tuning.

Needs the ``bench`` extra: ``pip install -e ".[cpu,bench]"`` (torch, torch-pruning, onnxsim, matplotlib).
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch_pruning as tp
from onnx import numpy_helper

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from bench_fmnist import ROOT, accuracy, test_set  # noqa: E402
from train_fashion_mnist import ResNetFMnist, VGGFMnist  # noqa: E402

import onnxprune  # noqa: E402
from onnxprune.calib import Calibration  # noqa: E402
from onnxprune.latency import measure, speedup  # noqa: E402
from onnxprune.summary import summarize  # noqa: E402

TP_METHODS = ("magnitude-l1", "bn-scale", "random")
ONNXPRUNE_METHODS = (("lasso", True), ("thinet", True), ("l1", False))


@dataclass
class Row:
    """One line of the table."""

    model: str
    tool: str
    method: str
    target: float | None
    macs_speedup: float
    latency_speedup: float | None
    top1: float
    drop: float | None
    seconds: float | None
    note: str = ""

    def markdown(self) -> str:
        def fmt(v: float | None, spec: str) -> str:
            return "" if v is None else format(v, spec)
        target = f"{self.target:g}x" if self.target else ""
        return (f"| {self.model} | {self.tool} | {self.method} | {target} | {self.macs_speedup:.2f} | "
                f"{fmt(self.latency_speedup, '.2f')} | {self.top1:.2f} | {fmt(self.drop, '+.2f')} | "
                f"{fmt(self.seconds, '.1f')} |")


# --------------------------------------------------------------------------- rebuilding in PyTorch
def load_images(path: Path) -> np.ndarray:
    """The calibration images of a .npy file or an .npz file (its ``input`` array, else its first)."""
    if path.suffix == ".npz":
        z = np.load(path, allow_pickle=False)
        return z["input"] if "input" in z.files else z[z.files[0]]
    return np.load(path, allow_pickle=False)


def initializers(model: onnx.ModelProto) -> dict[str, torch.Tensor]:
    return {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}


def vgg_from_onnx(model: onnx.ModelProto) -> nn.Module:
    """VGGFMnist with BN removed and conv biases added, weights taken from the BN-folded ONNX graph
    (Conv and Gemm nodes in graph order map onto the class's Conv2d and Linear modules in order)."""
    net = VGGFMnist().eval()
    for i, m in enumerate(net.features):
        if isinstance(m, nn.Conv2d):
            net.features[i] = nn.Conv2d(m.in_channels, m.out_channels, 3, padding=1, bias=True)
        elif isinstance(m, nn.BatchNorm2d):
            net.features[i] = nn.Identity()
    inits = initializers(model)
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    nodes = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(layers) == len(nodes), (len(layers), len(nodes))
    with torch.no_grad():
        for layer, node in zip(layers, nodes):
            layer.weight.copy_(inits[node.input[1]])
            layer.bias.copy_(inits[node.input[2]])
    return net.eval()


def resnet_from_onnx(model: onnx.ModelProto) -> nn.Module:
    """ResNetFMnist with the ONNX initializers, which keep the PyTorch state-dict names."""
    net = ResNetFMnist().eval()
    missing, unexpected = net.load_state_dict(initializers(model), strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("num_batches_tracked") for k in missing), missing
    return net


def torch_vs_ort(net: nn.Module, model_bytes: bytes, x: np.ndarray) -> float:
    """Max |PyTorch − ONNX Runtime| over the logits of ``x``."""
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    worst = 0.0
    with torch.no_grad():
        for i in range(0, len(x), 512):
            ref = sess.run(None, {name: x[i:i + 512]})[0]
            worst = max(worst, float(np.abs(net(torch.from_numpy(x[i:i + 512])).numpy() - ref).max()))
    return worst


# --------------------------------------------------------------------------- Torch-Pruning
def importance(method: str) -> tp.importance.Importance:
    return {"magnitude-l1": lambda: tp.importance.MagnitudeImportance(p=1),
            "bn-scale": tp.importance.BNScaleImportance,
            "random": tp.importance.RandomImportance}[method]()


def tp_macs(net: nn.Module) -> float:
    return float(tp.utils.count_ops_and_params(net, torch.zeros(1, 1, 28, 28))[0])


def tp_prune(net: nn.Module, method: str, ratio: float, seed: int = 0) -> nn.Module:
    """A copy of ``net`` pruned by MetaPruner at one uniform ``ratio`` (the final classifier kept)."""
    pruned = copy.deepcopy(net)
    torch.manual_seed(seed)
    classifier = [m for m in pruned.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(pruned, torch.zeros(1, 1, 28, 28), importance(method), global_pruning=False,
                                  pruning_ratio=ratio, ignored_layers=[classifier])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.step()
    return pruned.eval()


def tp_solve(net: nn.Module, method: str, target: float, tol: float, steps: int = 30
             ) -> tuple[nn.Module, float, float]:
    """Bisect the pruning ratio until Torch-Pruning's MACs speedup reaches ``target`` and stays within
    ``tol`` of it (as onnxprune's targets, a speedup at least the target; the closest one otherwise).

    Returns (pruned model, ratio, time of the final pruning run in seconds)."""
    base = tp_macs(net)
    lo, hi = 0.0, 0.95
    tried: list[tuple[float, float]] = []  # (relative error of the speedup, ratio)
    for _ in range(steps):
        ratio = (lo + hi) / 2
        err = base / tp_macs(tp_prune(net, method, ratio)) / target - 1
        tried.append((err, ratio))
        if 0 <= err <= tol or hi - lo < 1e-4:
            break
        lo, hi = (ratio, hi) if err < 0 else (lo, ratio)
    reached = [t for t in tried if 0 <= t[0] <= tol]
    ratio = min(reached)[1] if reached else min(tried, key=lambda t: abs(t[0]))[1]
    start = time.perf_counter()
    pruned = tp_prune(net, method, ratio)
    return pruned, ratio, time.perf_counter() - start


def has_batchnorm(net: nn.Module) -> bool:
    return any(isinstance(m, nn.BatchNorm2d) for m in net.modules())


def export_onnx(net: nn.Module) -> bytes:
    """The model as ONNX (legacy TorchScript exporter, opset 13, dynamic batch)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (torch.zeros(1, 1, 28, 28),), buf, dynamo=False, opset_version=13,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return buf.getvalue()


# --------------------------------------------------------------------------- scoring
def macs(model_bytes: bytes, sample: np.ndarray) -> int:
    """MACs of one sample by onnxprune's cost model (Conv/ConvTranspose/Gemm/MatMul, BN folded)."""
    return summarize(onnx.load_from_string(model_bytes), Calibration({"input": sample[:1]})).macs


def latency_speedup(original: bytes, pruned: bytes, sample: np.ndarray, repeats: int) -> float:
    """Original / pruned ORT CPU latency at batch 1 (10th percentiles), runs alternating in blocks."""
    before, after = measure([onnx.load_from_string(original), onnx.load_from_string(pruned)],
                            {"input": sample[:1]}, "cpu", repeats=repeats, warmup=10)
    return speedup(before, after)


@dataclass
class Context:
    """What every row of one model is scored against."""

    name: str
    original: bytes
    base_macs: int
    base_top1: float
    x: np.ndarray
    y: np.ndarray
    repeats: int

    def row(self, tool: str, method: str, target: float, pruned: bytes, seconds: float) -> Row:
        top1 = accuracy(pruned, self.x, self.y)
        return Row(self.name, tool, method, target, self.base_macs / macs(pruned, self.x),
                   latency_speedup(self.original, pruned, self.x, self.repeats), top1, top1 - self.base_top1,
                   seconds)


def tp_rows(ctx: Context, net: nn.Module, calib: np.ndarray, speedups: list[float], tol: float) -> list[Row]:
    rows = []
    for method in TP_METHODS:
        if method == "bn-scale" and not has_batchnorm(net):
            print(f"  {ctx.name}: Torch-Pruning bn-scale skipped: the exporter folded BN into the convs, "
                  "so the shipped weights carry no BN scales", file=sys.stderr)
            continue
        for target in speedups:
            pruned, ratio, seconds = tp_solve(net, method, target, tol)
            onnx_bytes = export_onnx(pruned)
            diff = torch_vs_ort(pruned, onnx_bytes, calib[:256])
            if diff > 1e-3:
                print(f"  WARNING {ctx.name} tp {method} {target}: exported ONNX differs by {diff:.1e}",
                      file=sys.stderr)
            rows.append(ctx.row("Torch-Pruning", method, target, onnx_bytes, seconds))
            print(f"  {rows[-1].markdown()}  ratio {ratio:.4f}", file=sys.stderr, flush=True)
    return rows


def onnxprune_rows(ctx: Context, path: Path, calib: Path, speedups: list[float], seed: int) -> list[Row]:
    rows = []
    for method, rec in ONNXPRUNE_METHODS:
        for target in speedups:
            start = time.perf_counter()
            result = onnxprune.prune(str(path), str(calib), speedup=target, method=method, reconstruct=rec,
                                     seed=seed, measure_latency=False, progress=False)
            seconds = time.perf_counter() - start
            label = method if rec else f"{method} (no reconstruct)"
            rows.append(ctx.row("onnxprune", label, target, result.model.SerializeToString(), seconds))
            print(f"  {rows[-1].markdown()}", file=sys.stderr, flush=True)
    return rows


ONNXSIM_METHODS = ("structured l2", "structured wanda")


def onnxsim_prune(model: onnx.ModelProto, method: str, sparsity: float, calib: np.ndarray) -> onnx.ModelProto:
    """onnxsim's structured pruning (whole output channels) at ``sparsity``, no fine-tuning."""
    from onnxsim import pruning

    if method == "structured l2":
        return pruning.apply_structured_pruning(copy.deepcopy(model), sparsity=sparsity)
    batches = [{"input": calib[i:i + 32]} for i in range(0, min(len(calib), 256), 32)]
    return pruning.apply_structured_wanda_pruning(copy.deepcopy(model), calibration_data=batches, sparsity=sparsity,
                                                  providers=["CPUExecutionProvider"])


def onnxsim_rows(ctx: Context, calib: np.ndarray, speedups: list[float], tol: float, steps: int = 12) -> list[Row]:
    """onnxsim 0.8.1's structured pruning, its per-chain sparsity bisected until the MACs
    speedup (onnxprune's count) is within ``tol`` of each target, or as close as it gets."""
    rows = []
    model = onnx.load_from_string(ctx.original)
    for method in ONNXSIM_METHODS:
        for target in speedups:
            start = time.perf_counter()
            lo, hi, best = 0.0, 0.99, None
            for _ in range(steps):
                mid = (lo + hi) / 2
                pruned = onnxsim_prune(model, method, mid, calib).SerializeToString()
                reached = ctx.base_macs / macs(pruned, ctx.x)
                if best is None or abs(reached - target) < abs(best[1] - target):
                    best = (pruned, reached, mid)
                if abs(reached - target) <= tol * target:
                    break
                lo, hi = (mid, hi) if reached < target else (lo, mid)
            rows.append(ctx.row("onnxsim", method, target, best[0], time.perf_counter() - start))
            print(f"  {rows[-1].markdown()}  sparsity {best[2]:.4f}", file=sys.stderr, flush=True)
    return rows


def bench_model(name: str, args: argparse.Namespace, x: np.ndarray, y: np.ndarray, calib: np.ndarray) -> list[Row]:
    path = ROOT / "models" / f"{name}.onnx"
    model = onnx.load(path)
    net = vgg_from_onnx(model) if name.startswith("vgg") else resnet_from_onnx(model)
    diff = torch_vs_ort(net, path.read_bytes(), calib)
    print(f"{name}: rebuilt PyTorch model vs ONNX Runtime on {len(calib)} calibration images: "
          f"max |diff| {diff:.2e}", file=sys.stderr)
    if diff > 1e-4:
        raise SystemExit(f"{name}: the rebuilt PyTorch model does not match the ONNX model ({diff:.2e} > 1e-4)")
    base = accuracy(path.read_bytes(), x, y)
    ctx = Context(name, path.read_bytes(), macs(path.read_bytes(), x), base, x, y, args.repeats)
    rows = [Row(name, "original", "", None, 1.0, 1.0, base, None, None)]
    if "torch-pruning" in args.peers:
        rows += tp_rows(ctx, net, calib, args.speedups, args.tol)
    if "onnxsim" in args.peers:
        rows += onnxsim_rows(ctx, calib, args.speedups, args.tol)
    if "onnxprune" in args.peers:
        rows += onnxprune_rows(ctx, path, Path(args.calib), args.speedups, args.seed)
    return rows


# --------------------------------------------------------------------------- output
def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "(not installed, from the source tree)"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return (f"{platform.machine()} {cpu}, {os.cpu_count()} cores, {platform.system()}; Python "
            f"{platform.python_version()}, onnxruntime {ort.__version__}, torch {torch.__version__}, "
            f"torch-pruning {package_version('torch-pruning')}, onnxsim {package_version('onnxsim')}, "
            f"onnxprune {package_version('onnxprune')}")


def criterion(rows: list[Row], target: float = 2.0) -> list[str]:
    """onnxprune's lasso (the default auto on these models) drop vs a third of Torch-Pruning's magnitude drop, per model."""
    lines = []
    for name in dict.fromkeys(r.model for r in rows):
        def drop(tool: str, method: str) -> float | None:
            return next((r.drop for r in rows if (r.model, r.tool, r.method, r.target) == (name, tool, method, target)),
                        None)
        ours, theirs = drop("onnxprune", "lasso"), drop("Torch-Pruning", "magnitude-l1")
        if ours is None or theirs is None:
            continue
        holds = -ours <= -theirs / 3
        lines.append(f"- {name} at {target:g}x: onnxprune lasso loses {-ours:.2f} points, Torch-Pruning "
                     f"magnitude-l1 loses {-theirs:.2f} (a third: {-theirs / 3:.2f}) -> "
                     f"{'holds' if holds else 'FAILS'}")
    return lines


def rows_from_markdown(text: str) -> list[Row]:
    """The rows of a table this script printed (to re-plot a saved run with --from-table)."""
    def num(cell: str) -> float | None:
        return float(cell.rstrip("x")) if cell else None
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and cells[0] not in ("model", "---"):
            m, tool, method, target, mac, lat, top1, drop, secs = cells
            rows.append(Row(m, tool, method, num(target), float(mac), num(lat), float(top1), num(drop), num(secs)))
    return rows


def plot(rows: list[Row], path: Path) -> None:
    """Accuracy vs MACs speedup, one line per tool/method (same colour in every panel), one panel per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in rows))
    series = list(dict.fromkeys((r.tool, r.method) for r in rows if r.tool != "original"))
    colours = dict(zip(series, plt.get_cmap("tab10").colors))
    markers = dict(zip(series, "sDPovx^<>"))  # overlapping lines stay apart by marker
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.8), squeeze=False)
    for ax, name in zip(axes[0], models):
        mine = [r for r in rows if r.model == name]
        base = next(r for r in mine if r.tool == "original")
        ax.axhline(base.top1, color="grey", ls="--", lw=1, label="original")
        for tool, method in series:
            pts = sorted((r.macs_speedup, r.top1) for r in mine if (r.tool, r.method) == (tool, method))
            if pts:
                ax.plot(*zip(*pts), color=colours[tool, method], marker=markers[tool, method], alpha=0.85,
                        ms=7 if tool == "onnxprune" else 6, ls="-" if tool == "onnxprune" else ":",
                        label=f"{tool} {method}")
        ax.set(title=f"{name} (original {base.top1:.2f} %)", xlabel="MACs speedup (×)",
               ylabel="Fashion-MNIST test top-1 (%)", ylim=(0, 100))
        ax.grid(alpha=0.3)
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_legend_handles_labels()[0]}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("No fine-tuning, same weights: onnxprune vs Torch-Pruning")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vgg_fmnist", "resnet_fmnist"])
    ap.add_argument("--speedups", nargs="+", type=float, default=[1.5, 2.0, 3.0])
    ap.add_argument("--calib", default=str(ROOT / "models" / "fmnist_calib_2k.npz"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "peers.png"))
    ap.add_argument("--tol", type=float, default=0.02,
                    help="relative MACs-speedup tolerance of Torch-Pruning's ratio search")
    ap.add_argument("--repeats", type=int, default=200, help="interleaved latency runs per model")
    ap.add_argument("--test-limit", type=int, default=None, help="score on the first N test images only (smoke runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peers", nargs="+", default=["torch-pruning", "onnxsim", "onnxprune"],
                    choices=["torch-pruning", "onnxsim", "onnxprune"], help="which tools to run (default: all)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--from-table", help="only re-plot the table of a saved run's output (a markdown file)")
    args = ap.parse_args()
    if args.from_table:
        plot(rows_from_markdown(Path(args.from_table).read_text()), Path(args.plot))
        return
    torch.set_num_threads(args.threads)
    x, y, source = test_set()
    if args.test_limit:
        x, y, source = x[:args.test_limit], y[:args.test_limit], f"{source}, first {args.test_limit}"
    calib = load_images(Path(args.calib)).astype(np.float32)
    rows = [r for name in args.models for r in bench_model(name, args, x, y, calib)]
    print(f"machine: {machine()}\n\nevaluated on {source}; onnxprune calibration "
          f"{os.path.relpath(args.calib, ROOT)} ({len(calib)} images, a fifth held out for verification); "
          f"Torch-Pruning MetaPruner, global_pruning=False, final Linear ignored, ratio bisected to within "
          f"{args.tol:.0%} of the MACs target; no fine-tuning anywhere\n")
    print("| model | tool | method | target | MACs speedup | latency speedup | top-1 % | drop | time s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(r.markdown())
    print("\ncriterion (onnxprune's default loses at most a third of Torch-Pruning's magnitude drop at 2x):")
    print("\n".join(criterion(rows)) or "- not evaluated (needs the 2x target)")
    plot(rows, Path(args.plot))
    print(f"\nplot: {os.path.relpath(args.plot, ROOT)}")


if __name__ == "__main__":
    main()
