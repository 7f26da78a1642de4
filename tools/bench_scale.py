"""Time and peak memory of pruning ResNet-50 / VGG-16-sized graphs (224², random weights) against image count.

    python tools/bench_scale.py --images 256 --speedup 2                       # one run (ResNet-50)
    python tools/bench_scale.py --models resnet50 vgg16 --images 64 256 1024   # the scale study

Every (model, images) pair runs in its own subprocess (this script again, with ``--one``), so
peak RSS is that run's own. Prints the machine, then per run the pruning report, and at the end
a markdown table (MACs, pruning wall time, peak RSS, the RSS of model + calibration data before
pruning, time per image), the growth between image counts (log-log slopes of the time and of the
peak RSS above the model + data), and where the time went (per phase).

Models: ``resnet50`` (``tests/graphs.py``: bottlenecks [3, 4, 6, 3], BN kept separate),
``resnet26`` ([2, 2, 2, 2]) and ``resnet101`` ([3, 4, 23, 3]) for growth with depth, ``vgg16``
(configuration D, no BN, the 4096-wide classifier after Flatten), all with seeded random weights;
or, with ``--zoo DIR``, the torch exports of ``tools/build_zoo.py`` (``DIR/resnet50_op17.onnx``,
``DIR/vgg16_bn_op17.onnx``). Calibration images are N(0, 1) noise.

The stages (load, analyse, targets, sensitivity, pruning, verify, report) are the report's own
``phases``. The finer breakdown wraps a few public functions of onnxprune and onnxruntime from this
script: ORT ``run`` calls, session set-up, patch sampling, the ``XᵀX`` accumulation, channel
selection, the least-squares refits, activations written to disk, the checker; "other" is the
rest (graph analysis, rewriting, Python overhead). Each phase counts its own time only (a
refit's time is not counted again in the function that called it).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib
import json
import math
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(Path(__file__).resolve().parent), str(ROOT)]

MODELS = {"resnet26": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3), "vgg16": None}
ZOO_FILES = {"resnet50": "resnet50_op17.onnx", "vgg16": "vgg16_bn_op17.onnx"}


def build(name: str, size: int, zoo: str | None):
    if zoo:
        import onnx

        return onnx.load(str(Path(zoo) / ZOO_FILES[name]))
    from graphs import resnet50, vgg16

    if name == "vgg16":
        return vgg16(size, random=True)
    return resnet50(size, blocks=MODELS[name])


# ---------------------------------------------------------------------------------------------- memory

def rss_mib() -> float:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak() -> bool:
    """Reset the kernel's high-water mark (VmHWM) of this process, where Linux allows it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------- phases

LEAVES = [  # (module, attribute path, phase): each phase counts its own time, minus the phases it calls
    ("onnxruntime", "InferenceSession.run", "ORT forward passes"),
    ("onnxprune.io", "inference_session", "ORT session set-up"),
    ("onnxprune.sampling", "Sampler.stats", "patch sampling"),
    ("onnxprune.stats", "LayerStats.add", "XᵀX accumulation"),
    ("onnxprune.select", "lasso_selections", "channel selection (Gram + LARS)"),
    ("onnxprune.select", "lasso_select", "channel selection (Gram + LARS)"),
    ("onnxprune.select", "normalized_contribution", "channel selection (Gram + LARS)"),
    ("onnxprune.select", "obs_order", "channel selection (obs)"),
    ("onnxprune.select", "RefitProblem.__init__", "channel selection (obs)"),
    ("onnxprune.reconstruct", "refit", "least-squares refits"),
    ("onnxprune.reconstruct", "held_out_error", "least-squares refits"),
    ("onnxprune.frontier", "Frontier.spill", "carried activations written to disk"),
    ("onnx.checker", "check_model", "ONNX checker"),
]


class Phases:
    """Exclusive time per phase (a stack of running wrapped public functions) and peak RSS."""

    def __init__(self):
        self.own: dict[str, float] = {}
        self.stack: list[list] = []  # [phase, start, time in callees]
        self._stop = threading.Event()
        self.stage: str | None = None
        self.stage_peak: dict[str, float] = {}  # MiB, sampled every 0.2 s

    def _leaf(self, owner, attr, phase):
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def wrapped(*a, **k):
            frame = [phase, time.perf_counter(), 0.0]
            self.stack.append(frame)
            try:
                return fn(*a, **k)
            finally:
                self.stack.pop()
                took = time.perf_counter() - frame[1]
                self.own[phase] = self.own.get(phase, 0.0) + took - frame[2]
                if self.stack:
                    self.stack[-1][2] += took
        setattr(owner, attr, wrapped)
        # modules that imported the function by name call their own reference: patch those too
        for mod in list(sys.modules.values()):
            if getattr(mod, "__name__", "").startswith("onnxprune") and getattr(mod, attr, None) is fn:
                setattr(mod, attr, wrapped)

    def install(self):
        from onnxprune.progress import Progress

        phase, watcher = Progress.phase, self

        @contextlib.contextmanager
        def tracked(progress, name):  # which stage the memory watcher is in
            outer, watcher.stage = watcher.stage, name
            try:
                with phase(progress, name):
                    yield
            finally:
                watcher.stage = outer
        Progress.phase = tracked
        for module, path, label in LEAVES:
            owner = importlib.import_module(module)
            *parents, attr = path.split(".")
            for p in parents:
                owner = getattr(owner, p)
            self._leaf(owner, attr, label)
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self):
        while not self._stop.wait(0.2):
            key = self.stage or "other"
            self.stage_peak[key] = max(self.stage_peak.get(key, 0.0), rss_mib())

    def stop(self):
        self._stop.set()


# ---------------------------------------------------------------------------------------------- one run

def one(args) -> None:
    """Prune one model with one image count; the last line of stdout is the JSON result."""
    import platform

    import onnxprune
    import onnxprune.pipeline  # noqa: F401  (every module loaded before the timers go in)

    phases = Phases()
    if args.phases:
        phases.install()
    model = build(args.model, args.size, args.zoo)
    x = np.random.default_rng(0).normal(size=(args.images, 3, args.size, args.size)).astype(np.float32)
    gc.collect()
    rss0 = rss_mib()
    reset_peak()
    load0 = os.getloadavg()[0]
    start = time.perf_counter()
    result = onnxprune.prune(model, x, speedup=args.speedup, method=args.method, refine=args.refine,
                             mixtures=args.mixtures, progress=args.progress)
    wall = time.perf_counter() - start
    peak = peak_mib()
    phases.stop()
    rep = result.report
    print(rep.table(max_rows=10), flush=True)
    fid = rep.fidelity[0] if rep.fidelity else None
    print(json.dumps({
        "model": args.model + (" (zoo)" if args.zoo else "") + (f" ({args.label})" if args.label else ""),
        "images": args.images, "size": args.size,
        "macs": rep.totals.macs[0], "macs_after": rep.totals.macs[1], "params": rep.totals.params[0],
        "wall_s": wall, "peak_mib": peak, "data_mib": rss0, "fit": rep.calibration["fit"],
        "rel_err": fid.relative_error if fid else None, "python": platform.python_version(),
        "load": [load0, os.getloadavg()[0]],
        "phases": phases.own, "stages": rep.phases, "stage_peak_mib": phases.stage_peak}))


# ---------------------------------------------------------------------------------------------- the study

def machine() -> str:
    from bench_all import machine as describe

    load = os.getloadavg()
    return f"{describe()}, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB RAM, " \
           f"load average at start {load[0]:.1f}"


def child(args, model: str, images: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", "--model", model, "--images", str(images),
           "--size", str(args.size), "--speedup", str(args.speedup), "--method", args.method,
           "--refine" if args.refine else "--no-refine", "--mixtures", str(args.mixtures)]
    cmd += (["--zoo", args.zoo] if args.zoo else []) + ([] if args.phases else ["--no-phases"])
    cmd += ["--progress"] if args.progress else []
    cmd += ["--label", args.label] if args.label else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    print(f"\n### {model}, {images} images\n\n    {' '.join(['python', 'tools/bench_scale.py', *cmd[2:]])}\n",
          flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    last = None
    lines = []
    for line in proc.stdout:
        if last is not None:
            lines.append(last)
        last = line
    code = proc.wait()
    if code or last is None or not last.startswith("{"):
        print("".join(lines + [last or ""]))
        raise SystemExit(f"the run of {model} with {images} images failed (exit code {code})")
    if lines:
        print("```\n" + "".join(lines).rstrip() + "\n```", flush=True)
    return json.loads(last)


def slope(xs, ys) -> float | None:
    """Least-squares slope of log y against log x."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    return float(np.polyfit(*zip(*pts), 1)[0])


def fmt_slope(s: float | None) -> str:
    return "–" if s is None else f"{s:.2f}"


def summary(runs: list[dict]) -> str:
    out = ["| model | images (fit) | MACs | MACs after | pruning wall time | peak RSS | model + data RSS "
           "| peak − (model + data) | time per image | held-out rel. error | load avg (start, end) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        out.append(f"| {r['model']} | {r['images']} ({r['fit']}) | {r['macs'] / 1e9:.2f} G | "
                   f"{r['macs_after'] / 1e9:.2f} G | {r['wall_s']:.0f} s | {r['peak_mib'] / 1024:.2f} GiB | "
                   f"{r['data_mib'] / 1024:.2f} GiB | {(r['peak_mib'] - r['data_mib']) / 1024:.2f} GiB | "
                   f"{r['wall_s'] / r['images']:.2f} s | "
                   f"{'–' if r['rel_err'] is None else format(r['rel_err'], '.3f')} | "
                   f"{', '.join(f'{v:.1f}' for v in r.get('load', []))} |")
    models = list(dict.fromkeys(r["model"] for r in runs))
    growth = ["", "Growth with image count (log-log slopes; 1.00 = linear, 0 = flat):", "",
              "| model | images | time slope | (peak − model − data) slope | peak slope |", "|---|---|---|---|---|"]
    shown = False
    for m in models:
        rs = sorted({r["images"]: r for r in runs if r["model"] == m}.values(), key=lambda r: r["images"])
        if len(rs) < 2:
            continue
        shown = True
        pairs = [(a, b) for a, b in zip(rs, rs[1:])] + ([(rs[0], rs[-1])] if len(rs) > 2 else [])
        for a, b in pairs:
            ts = slope([a["images"], b["images"]], [a["wall_s"], b["wall_s"]])
            ms = slope([a["images"], b["images"]], [a["peak_mib"] - a["data_mib"], b["peak_mib"] - b["data_mib"]])
            ps = slope([a["images"], b["images"]], [a["peak_mib"], b["peak_mib"]])
            growth.append(f"| {m} | {a['images']} → {b['images']} | {fmt_slope(ts)} | {fmt_slope(ms)} | "
                          f"{fmt_slope(ps)} |")
    if shown:
        out += growth
    if any(r.get("phases") for r in runs):
        names = list(dict.fromkeys(k for r in runs for k in r["phases"]))
        head = "| phase | " + " | ".join(f"{r['model']} {r['images']}" for r in runs) + " |"
        out += ["", "Where the time went (seconds; each phase its own time only):", "", head,
                "|---|" + "---|" * len(runs)]
        for n in sorted(names, key=lambda n: -sum(r["phases"].get(n, 0.0) for r in runs)):
            out.append(f"| {n} | " + " | ".join(f"{r['phases'].get(n, 0.0):.0f}" for r in runs) + " |")
        out.append("| other (analysis, rewriting, Python) | " + " | ".join(
            f"{r['wall_s'] - sum(r['phases'].values()):.0f}" for r in runs) + " |")
        stages = list(dict.fromkeys(k for r in runs for k in r["stages"]))
        out += ["", "Stages (seconds from the report's phases / peak RSS in GiB seen in the stage):", "", head,
                "|---|" + "---|" * len(runs)]
        for st in stages:
            out.append(f"| {st} | " + " | ".join(
                f"{r['stages'].get(st, 0.0):.0f} / {r.get('stage_peak_mib', {}).get(st, 0.0) / 1024:.2f}"
                for r in runs) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet50"], choices=list(MODELS))
    ap.add_argument("--images", nargs="+", type=int, default=[256])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--speedup", type=float, default=2.0)
    ap.add_argument("--method", default="auto")
    ap.add_argument("--refine", action=argparse.BooleanOptionalAction, default=True,
                    help="refine residual branches' convs together (the default; --no-refine to compare)")
    ap.add_argument("--mixtures", type=float, default=1.0,
                    help="blends of two calibration images added per fit image (default 1; 0 to compare)")
    ap.add_argument("--zoo", default=None, help="prune the tools/build_zoo.py exports in this folder instead")
    ap.add_argument("--no-phases", dest="phases", action="store_false", help="no per-phase timing")
    ap.add_argument("--progress", action="store_true", help="progress bars on stderr")
    ap.add_argument("--json", default=None, help="also write the runs' results to this file")
    ap.add_argument("--summarize", nargs="+", default=None, metavar="JSON",
                    help="run nothing: print the summary of runs saved with --json")
    ap.add_argument("--label", default=None, help="a tag for the runs in the tables (e.g. a commit)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="resnet50", choices=list(MODELS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(argparse.Namespace(**{**vars(args), "images": args.images[0]}))
        return
    if args.summarize:
        print(summary([r for path in args.summarize for r in json.loads(Path(path).read_text())]))
        return
    print(f"machine: {machine()}", flush=True)
    runs = []
    for model in args.models:
        for images in args.images:
            runs.append(child(args, model, images))
            if args.json:
                Path(args.json).write_text(json.dumps(runs, indent=1))
    print("\n## Summary\n")
    print(summary(runs))


if __name__ == "__main__":
    main()
