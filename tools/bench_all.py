"""Run every benchmark of the shipped models in one go and collect their outputs in one markdown file.

    python tools/bench_all.py [--out docs/bench.md] [--models ...] [--speedups ...] [--scale]

Runs, one after the other (they time themselves, so never in parallel): tools/bench_fmnist.py
(methods × speedups 1.5–4×, 2048 calibration images), tools/bench_allocation.py (uniform vs
sensitivity widths), tools/bench_peers.py (against Torch-Pruning, needs the ``bench`` extra),
tools/bench_latency.py (measured latency at batch 1 and 32), tools/bench_single_layer.py (He et
al.'s single-layer experiment) and, with --scale, tools/bench_scale.py (ResNet-50 at 224² and 256
images, ~14 min and ~2.9 GB peak on 2 cores, so off by default). Plots go next to --out (docs/*.png by default: the
files README.md shows). Each script's markdown output goes into its own section with the exact
command and its wall time; a failing script is recorded with its stderr tail and the others still
run (exit code 1 at the end).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = Path(__file__).resolve().parent


@dataclass
class Step:
    """One benchmark script and its arguments."""

    title: str
    script: str
    args: list[str]

    def command(self) -> list[str]:
        return [sys.executable, str(TOOLS / self.script), *self.args]

    def shown(self) -> str:
        return " ".join(["python", f"tools/{self.script}", *self.args])


@dataclass
class Outcome:
    step: Step
    returncode: int
    seconds: float
    stdout: str
    stderr: str

    def markdown(self) -> str:
        lines = [f"## {self.step.title}", "", f"    {self.step.shown()}", "",
                 f"wall time {self.seconds / 60:.1f} min, exit code {self.returncode}", "", self.stdout.rstrip()]
        if self.returncode:
            tail = "\n".join(self.stderr.rstrip().splitlines()[-20:])
            lines += ["", "**failed**, last lines of stderr:", "", "```", tail, "```"]
        return "\n".join(lines) + "\n"


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")), "") if cpuinfo.exists() else platform.processor()
    return (f"{platform.machine()} {cpu}, {os.cpu_count()} cores, {platform.system()}, "
            f"Python {platform.python_version()}")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def steps(args: argparse.Namespace) -> list[Step]:
    """The scripts to run, with the shared --models/--speedups passed on where given; plots are
    written next to --out (docs/*.png for the default, the files README.md shows)."""
    models = ["--models", *args.models] if args.models else []
    speedups = ["--speedups", *map(str, args.speedups or [1.5, 2.0, 3.0, 4.0])]
    shared = models + (["--speedups", *map(str, args.speedups)] if args.speedups else [])
    docs = Path(args.out).resolve().parent

    def plot(name: str) -> str:
        return os.path.relpath(docs / name, ROOT)

    chosen = [Step("Methods and speedups (tools/bench_fmnist.py)", "bench_fmnist.py",
                   [*models, *speedups, "--calib", "models/fmnist_calib_2k.npz", "--plot", plot("methods.png")]),
              Step("Width allocation (tools/bench_allocation.py)", "bench_allocation.py", shared),
              Step("Against Torch-Pruning (tools/bench_peers.py)", "bench_peers.py", [*shared, "--plot", plot("peers.png")]),
              Step("Measured latency (tools/bench_latency.py)", "bench_latency.py", shared),
              Step("Single-layer experiment of He et al. (tools/bench_single_layer.py)", "bench_single_layer.py",
                   ["--plot", plot("single_layer.png")])]
    if args.scale:
        chosen.append(Step("ResNet-50-sized graph (tools/bench_scale.py)", "bench_scale.py",
                           ["--images", str(args.scale_images)]))
    return [s for s in chosen if not args.only or s.script.removesuffix(".py") in args.only]


def run(step: Step) -> Outcome:
    print(f"running {step.shown()} ...", flush=True)
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(step.command(), cwd=ROOT, capture_output=True, text=True, env=env)
    outcome = Outcome(step, proc.returncode, time.perf_counter() - start, proc.stdout, proc.stderr)
    print(f"  done in {outcome.seconds / 60:.1f} min, exit code {proc.returncode}", flush=True)
    return outcome


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench.md"))
    ap.add_argument("--models", nargs="+", default=None, help="passed on to each script (default: theirs)")
    ap.add_argument("--speedups", nargs="+", type=float, default=None, help="passed on (default: each script's own)")
    ap.add_argument("--only", nargs="+", choices=["bench_fmnist", "bench_allocation", "bench_peers", "bench_latency",
                                                   "bench_single_layer", "bench_scale"],
                    help="run only these scripts")
    ap.add_argument("--scale", action="store_true", help="also run tools/bench_scale.py (slow: ~14 min, ~2.9 GB)")
    ap.add_argument("--scale-images", type=int, default=256)
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args()
    if args.dry_run:
        print("\n".join(step.shown() for step in steps(args)))
        return 0
    header = (f"# onnxprune benchmarks\n\nmachine: {machine()}\n\ncommit {git_commit()}, "
              f"{datetime.datetime.now().isoformat(timespec='minutes')}; times are upper bounds when "
              f"other jobs share the machine\n")
    print(f"machine: {machine()}", flush=True)
    outcomes = [run(step) for step in steps(args)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join([header, *(o.markdown() for o in outcomes)]))
    print(f"wrote {out}")
    return 1 if any(o.returncode for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
