"""One conv layer pruned at a time, per selection criterion and layer speedup (He et al. 2017, Fig. 3; no fine-tuning).

    python tools/bench_single_layer.py [--model vgg_fmnist] [--layers 0 2 5] [--speedups 1.5 2 3 4]
                                       [--plot docs/single_layer.png] [--quick]

A "paper anchor": the shape of He, Zhang & Sun's single-layer analysis on a shipped Fashion-MNIST
model. For each chosen conv layer with C input channels and each layer speedup s, the layer keeps
round(C/s) input channels and the layer before it loses the matching output channels (one
onnxprune channel group); nothing else changes: no other group is pruned, no downstream layer is
refit, nothing is fine-tuned. Criteria: first-k, max-response (largest mean |activation| of the
input channel on calibration data), random, l1 (filter norms of the layer before, Li et al.),
thinet and lasso (selection only), thinet+rec and lasso+rec (selection, then the least-squares
refit of the layer). The kept channels of first-k and max-response reach onnxprune through the
``keep`` argument of ``Pruner.prune``; everything else is onnxprune's own code path.

Prints, per layer, the increase of top-1 test error (points) over the unpruned model and the
layer's relative output error ‖ΔY‖²/‖Y‖² on held-out calibration images, then what the paper
reported; writes a plot like the paper's Fig. 3. --quick: one layer, two speedups, 2000 test images.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.utils
import onnxruntime as ort
from threadpoolctl import threadpool_limits

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from bench_all import machine  # noqa: E402
from bench_fmnist import ROOT, accuracy, test_set  # noqa: E402

from onnxprune import PruneOptions, Pruner  # noqa: E402
from onnxprune.activations import run_batches  # noqa: E402
from onnxprune.allocation import Plan  # noqa: E402
from onnxprune.calib import Calibration  # noqa: E402
from onnxprune.graph import ChannelGroup  # noqa: E402
from onnxprune.select import Method  # noqa: E402


@dataclass(frozen=True)
class Criterion:
    """One row of the table: an onnxprune method, or channels chosen here (``own``), with or without refit."""

    label: str
    method: Method
    reconstruct: bool
    own: str | None = None  # "first-k" | "max-response": kept channels chosen by this script


CRITERIA = (
    Criterion("first-k", Method.L1, False, own="first-k"),
    Criterion("max-response", Method.L1, False, own="max-response"),
    Criterion("random", Method.RANDOM, False),
    Criterion("l1", Method.L1, False),
    Criterion("thinet", Method.THINET, False),
    Criterion("lasso", Method.LASSO, False),
    Criterion("thinet+rec", Method.THINET, True),
    Criterion("lasso+rec", Method.LASSO, True),
)

PAPER = """\
What He et al. 2017 report in their single-layer analysis (Fig. 3: VGG-16 on ImageNet, one layer pruned at a
time, speed-up ratios 2x-5x of that layer, no fine-tuning, increase of error), qualitatively:
- their method (LASSO selection + least-squares reconstruction) is consistently better than the other criteria,
  in every layer and at every speed-up ratio; they stress that channel selection affects the reconstruction
  error a lot ("ours without reconstruction" is also plotted);
- max response is sometimes even worse than first k (they argue that filters with large weights can be strongly
  correlated, so selecting by filter weights is less meaningful than exploiting feature-map correlations);
- the error grows with the speed-up ratio, and pruning becomes harder from shallower to deeper layers.
Their "max response", as the paper describes it, ranks channels by the absolute weight sum of the corresponding
filters (after Li et al.), closer to this table's l1 row; max-response here ranks input channels by their mean
|activation| on calibration data. ThiNet (Luo et al. 2017) selects greedily by contribution to the next layer's
output, then rescales by least squares: rows thinet and thinet+rec."""


def ordering(cells: dict[tuple[str, float], tuple[float, float]], speedup: float) -> str:
    """The criteria from least to most test-error increase at ``speedup``."""
    ranked = sorted(CRITERIA, key=lambda c: cells[c.label, speedup][0])
    return f"ordering at {speedup:g}x: " + " < ".join(f"{c.label} ({cells[c.label, speedup][0]:+.2f})"
                                                         for c in ranked)


class FrozenStats:
    """``run.sampler`` with its statistics memoised per consumer: with one group pruned, its
    consumers are always sampled on the unpruned model, so every criterion and speedup of a layer
    shares one pass over the calibration data."""

    def __init__(self, sampler):
        self.sampler, self.memo = sampler, {}

    def stats(self, pruned, consumers, target_columns=None, runs=None):
        assert not target_columns, "only the first pruned group's statistics can be shared"
        key = tuple(c.node.output[0] for c in consumers)
        if key not in self.memo:
            self.memo[key] = self.sampler.stats(pruned, consumers)
        return self.memo[key]

    def __getattr__(self, name: str):
        return getattr(self.sampler, name)


def make_run(model_path: Path, calib: str, seed: int) -> Pruner:
    """onnxprune's pruning run as :func:`onnxprune.prune` sets it up (BN folded, calibration split),
    with the reconstruction's sampler, uniform allocation and no downstream refit."""
    opts = PruneOptions(method=Method.LASSO, reconstruct=True, allocation="uniform", refit_downstream=False,
                        measure_latency=False, progress=False, seed=seed).validate()
    run = Pruner(model_path, calib, opts)
    run.sampler = FrozenStats(run.sampler)
    return run


def conv_layers(run: Pruner) -> list[ChannelGroup]:
    """Groups whose channels feed exactly one Conv and come from one Conv: a conv layer's input channels."""
    return [grp for grp in run.candidates if len(grp.producers) == 1 and grp.producers[0].op_type == "Conv"
            and len(grp.all_consumers) == 1 and grp.all_consumers[0].node.op_type == "Conv"]


def layer_name(run: Pruner, grp: ChannelGroup) -> str:
    """``convN`` (N counting the model's Conv nodes from 1), its node name and its input channels."""
    node = grp.all_consumers[0].node
    convs = [n.output[0] for n in run.work.graph.node if n.op_type == "Conv"]
    n = convs.index(node.output[0]) + 1
    return f"conv{n} ({node.name or node.output[0]}, {grp.channels} input channels)"


def response(run: Pruner, grp: ChannelGroup) -> np.ndarray:
    """Mean |activation| of each input channel of the layer on the calibration images it is fit on."""
    tensor = grp.all_consumers[0].tensor
    total = np.zeros(grp.channels)
    for _, out in run_batches(run.work, [tensor], run.cal, run.fit_idx, run.opts.batch_size):
        v = np.abs(out[tensor].astype(np.float64))
        total += v.reshape(v.shape[0], v.shape[1], -1).mean(axis=2).sum(axis=0)
    return total / len(run.fit_idx)


def own_keep(crit: Criterion, keep_n: int, scores: np.ndarray) -> np.ndarray | None:
    """The channels first-k and max-response keep (None: the method chooses)."""
    if crit.own == "first-k":
        return np.arange(keep_n)
    if crit.own == "max-response":
        return np.sort(np.argsort(-scores, kind="stable")[:keep_n])
    return None


class Suffix:
    """Scores models that differ from the original only after one tensor (the pruned layer's
    producer's input): the part before it runs once, on the test set and on the held-out
    calibration images; models with identical bytes are scored once."""

    def __init__(self, run: Pruner, grp: ChannelGroup, x: np.ndarray, y: np.ndarray):
        self.tensor = grp.producers[0].input[0]
        self.logits, self.layer = run.work.graph.output[0].name, grp.all_consumers[0].node.output[0]
        self.y, self.cache = y, {}
        hold = run.hold_idx if len(run.hold_idx) else run.fit_idx
        self.x = self._at_tensor(run, Calibration({run.work.graph.input[0].name: x}), np.arange(len(x)))
        self.x_hold = self._at_tensor(run, run.cal, hold)
        self.reference = self._run(run.work, self.layer, self.x_hold).astype(np.float64)

    def _at_tensor(self, run: Pruner, cal: Calibration, idx: np.ndarray) -> np.ndarray:
        if self.tensor in {i.name for i in run.work.graph.input}:
            return cal.take(idx)[self.tensor]
        return np.concatenate([out[self.tensor] for _, out in run_batches(run.work, [self.tensor], cal, idx, 500)])

    def _extract(self, model: onnx.ModelProto, output: str) -> onnx.ModelProto:
        return onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model)).extract_model([self.tensor], [output])

    def _run(self, model: onnx.ModelProto, output: str, x: np.ndarray) -> np.ndarray:
        sub = self._extract(model, output)
        sess = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
        return np.concatenate([sess.run(None, {self.tensor: x[i:i + 500]})[0] for i in range(0, len(x), 500)])

    def score(self, model: onnx.ModelProto) -> tuple[float, float]:
        """(top-1 % on the test set, ‖Y' − Y‖² / ‖Y‖² of the layer on the held-out calibration images)."""
        data = self._extract(model, self.logits).SerializeToString()
        key = hashlib.sha1(data).hexdigest()
        if key not in self.cache:
            got = self._run(model, self.layer, self.x_hold).astype(np.float64)
            err = float(np.sum((got - self.reference) ** 2) / max(np.sum(self.reference ** 2), 1e-30))
            self.cache[key] = (accuracy(data, self.x, self.y), err)
        return self.cache[key]


def bench_layer(run: Pruner, grp: ChannelGroup, speedups: list[float], x: np.ndarray, y: np.ndarray,
                base_error: float) -> dict[tuple[str, float], tuple[float, float]]:
    """(criterion, speedup) -> (test-error increase in points, layer relative output error)."""
    suffix = Suffix(run, grp, x, y)
    scores = response(run, grp)
    full = {g.index: g.channels for g in run.candidates}
    cells = {}
    for s in speedups:
        keep_n = max(1, int(round(grp.channels / s)))
        for crit in CRITERIA:
            opts = PruneOptions(**{**run.opts.__dict__, "method": crit.method, "reconstruct": crit.reconstruct})
            keep = own_keep(crit, keep_n, scores)
            model = run.prune(Plan({**full, grp.index: keep_n}, 1), opts, None if keep is None else {grp.index: keep}).model
            top1, err = suffix.score(model)
            cells[crit.label, s] = (100.0 - top1 - base_error, err)
    return cells


def table(cells: dict[tuple[str, float], tuple[float, float]], speedups: list[float], which: int, fmt: str) -> str:
    """Markdown: one row per criterion, one column per speedup; ``which`` picks the cell's value."""
    lines = ["| criterion | " + " | ".join(f"{s:g}x" for s in speedups) + " |", "|---|" + "---:|" * len(speedups)]
    lines += [f"| {c.label} | " + " | ".join(format(cells[c.label, s][which], fmt) for s in speedups) + " |"
              for c in CRITERIA]
    return "\n".join(lines)


def plot(results: list[tuple[str, dict]], speedups: list[float], path: str) -> None:
    """One panel per layer: increase of test error against layer speedup, one line per criterion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.6 * len(results), 4.2), squeeze=False)
    xs = [1.0, *speedups]
    for ax, (title, cells) in zip(axes[0], results):
        for c in CRITERIA:
            ax.plot(xs, [0.0, *(cells[c.label, s][0] for s in speedups)], marker="o", label=c.label,
                    linestyle="-" if c.reconstruct else "--")
        ax.set(title=title, xlabel="speed-up of the layer", ylabel="increase of top-1 error (points)")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vgg_fmnist", help="a model in models/ (vgg_fmnist, resnet_fmnist)")
    ap.add_argument("--layers", nargs="+", type=int, default=None,
                    help="which conv layers, as positions among those whose input channels can be pruned "
                         "(default: first, middle, last)")
    ap.add_argument("--speedups", nargs="+", type=float, default=[1.5, 2.0, 3.0, 4.0])
    ap.add_argument("--calib", default=None, help="calibration images (default: models/fmnist_calib_2k.npz; "
                    "with --quick models/fmnist_calib.npy, 512 images)")
    ap.add_argument("--test-images", type=int, default=None, help="first N test images (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--blas-threads", type=int, default=1,
                    help="BLAS threads of numpy/scipy (default 1: on a shared 2-core machine OpenBLAS threads "
                         "spin-wait, and one eigh can take 50x longer); ONNX Runtime keeps its own threads")
    ap.add_argument("--plot", default=str(ROOT / "docs" / "single_layer.png"), help="PNG to write ('' for none)")
    ap.add_argument("--quick", action="store_true",
                    help="last layer only, speedups 2 and 4, 2000 test images, 512 calibration images")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.speedups, args.test_images = args.layers or [-1], [2.0, 4.0], args.test_images or 2000
    args.calib = args.calib or str(ROOT / "models" / ("fmnist_calib.npy" if args.quick else "fmnist_calib_2k.npz"))
    return args


def main(argv: list[str] | None = None) -> dict[str, dict[tuple[str, float], tuple[float, float]]]:
    """Run the benchmark; returns, per layer title, its cells (also printed as markdown)."""
    args = parse_args(argv)
    with threadpool_limits(args.blas_threads, user_api="blas"):
        return bench(args)


def bench(args: argparse.Namespace) -> dict[str, dict[tuple[str, float], tuple[float, float]]]:
    """:func:`main` once its arguments are parsed."""
    start = time.perf_counter()
    x, y, source = test_set()
    if args.test_images:
        x, y, source = x[:args.test_images], y[:args.test_images], f"the first {args.test_images} of {source}"
    path = ROOT / "models" / f"{args.model}.onnx"
    run = make_run(path, args.calib, args.seed)
    layers = conv_layers(run)
    chosen = [layers[i] for i in (args.layers if args.layers is not None else [0, (len(layers) - 1) // 2, -1])]
    base_error = 100.0 - accuracy(path.read_bytes(), x, y)
    print(f"machine: {machine()}; onnxruntime {ort.__version__}\n\n{args.model}: top-1 error {base_error:.2f} % "
          f"on {source}; calibration {Path(args.calib).name} ({len(run.fit_idx)} fit / {len(run.hold_idx)} "
          f"held-out images); random is one draw (seed {args.seed})\n")
    results = []
    for grp in chosen:
        title = layer_name(run, grp)
        cells = bench_layer(run, grp, args.speedups, x, y, base_error)
        results.append((title, cells))
        print(f"### {title}\n\nincrease of top-1 test error (points):\n\n{table(cells, args.speedups, 0, '+.2f')}\n\n"
              f"layer output error ‖ΔY‖²/‖Y‖² (held-out calibration images):\n\n"
              f"{table(cells, args.speedups, 1, '.4f')}\n\n{ordering(cells, max(args.speedups))}\n", flush=True)
    print(PAPER)
    if args.plot:
        plot(results, args.speedups, args.plot)
        print(f"\nplot: {args.plot}")
    print(f"\nwall time {time.perf_counter() - start:.1f} s")
    return dict(results)


if __name__ == "__main__":
    main()
