"""Measured latency on an ONNX Runtime execution provider: warm-up, then repeats in alternating blocks."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from functools import cache
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from .errors import OptionError
from .io import inference_session
from .runtime import PROVIDERS, default_round_to, import_ort  # noqa: F401  (default_round_to: re-exported)

ort = import_ort()


# models are compared on this percentile of their runs' times: the runs nothing else interrupted
# (interruptions only add time). On a VM whose host interrupts runs now and then, the ratio of
# medians of one pair read 0.92x to 1.57x in twelve measurements while that of the 10th
# percentiles read 1.45x to 1.51x (docs/latency.md)
COMPARED_PERCENTILE = 10


def typical_time(times) -> float:
    """The figure models (and their op types) are compared on, of some runs' times (in their unit)."""
    return float(np.percentile(times, COMPARED_PERCENTILE))


@dataclass
class Latency:
    """Per-run latency of one model (milliseconds), and how busy the machine was meanwhile."""

    median_ms: float
    p90_ms: float
    ms: float  # the figure models are compared on (:func:`typical_time`, :func:`speedup`)
    runs: int
    # the share of the CPU time this process could run on that other processes (or the hypervisor)
    # took while the models were timed; None where the system does not tell (not Linux)
    busy: float | None = None


def require_provider(provider: str) -> str:
    """ONNX Runtime's name for ``provider``, or a one-line error where this build lacks it."""
    if provider not in PROVIDERS:
        raise OptionError(f"unknown provider '{provider}'; choose one of {', '.join(PROVIDERS)}")
    name = PROVIDERS[provider]
    if name not in ort.get_available_providers():
        raise OptionError(f"execution provider '{provider}' ({name}) is not available in this onnxruntime "
                          f"build (available: {', '.join(ort.get_available_providers())}); "
                          'on a machine with a GPU, replace onnxruntime by onnxruntime-gpu (pip uninstall '
                          'onnxruntime, then pip install "onnxprune[gpu]"), or use --provider cpu')
    return name


def provider_session(model: onnx.ModelProto, provider: str = "cpu", threads: int = 0,
                     profile_prefix: str = "") -> ort.InferenceSession:
    """An ORT session on ``provider`` (cpu, cuda or tensorrt), or a one-line error if unavailable;
    with ``profile_prefix``, ORT's profiler writes its events to a file named from it."""
    name = require_provider(provider)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    # an explicit thread count, as ORT's default picks (one per physical core): with the default
    # (0), ORT pins the workers of each session to cores, and two sessions in one process then
    # land in one of two timing regimes at random (on a 2-core VM: 1.35x or 1.67x for one pair)
    opts.intra_op_num_threads = threads or physical_cores()
    chain = [name] if provider == "cpu" else [name, "CPUExecutionProvider"]
    return inference_session(model, opts, chain)  # any size, over 2 GB too


@cache
def physical_cores() -> int:
    """Physical CPU cores usable by this process (hyper-threads counted once)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(base + "physical_package_id") as pkg, open(base + "core_id") as core:
                cores.add((pkg.read().strip(), core.read().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


MIN_TIMED_SECONDS = 1.0  # per model: sub-millisecond models get more repeats, or the median is noise
WARMUP_SECONDS = 0.3
BLOCK_SECONDS = 0.2  # runs of one model are timed in blocks about this long, the models taking turns
# untimed runs at the start of each block, for at least this long: the other session's intra-op
# threads go on spinning for about 25 ms after its last run (2-core VM), and runs meanwhile are
# up to 4x slower
SETTLE_SECONDS = 0.04
# other processes taking more than this share of the CPUs while the runs are timed make a
# measurement unreliable: a run then waits whole scheduler ticks, and the medians of two models
# timed in turns came out anywhere from 0.8x to 3.0x for a pair that measures 1.4x on a quiet
# machine (docs/latency.md); such a measurement is repeated once and the quieter one kept
BUSY_SHARE = 0.1


def measure(models: Sequence[onnx.ModelProto], feed: dict[str, np.ndarray], provider: str = "cpu",
            repeats: int = 30, warmup: int = 5, threads: int = 0,
            seconds: float = MIN_TIMED_SECONDS) -> list[Latency]:
    """Latency of each model on ``feed``. The models take turns in short blocks of runs so that
    load on the machine affects them alike; fast models are repeated until each is timed for at
    least ``seconds`` (at most 2000 runs).

    Blocks rather than alternating single runs: ORT's intra-op threads spin for a while after a
    run, and a run of the other session that starts meanwhile competes with them for the cores
    (on a 2-core machine that hid a 1.7x speedup as 1.2x). The runs at the start of each block,
    while the other session's threads still spin (:data:`SETTLE_SECONDS`), are not timed, for
    the same reason.

    While they run, the CPU time other processes take is measured (:func:`busy_share`); where it
    is over :data:`BUSY_SHARE` the measurement is repeated once and the quieter one returned, its
    share in :attr:`Latency.busy` for the caller to say so."""
    sessions = [provider_session(m, provider, threads) for m in models]
    quietest: list[Latency] = []
    for _ in range(2):
        before = cpu_seconds()
        # warm up for a while, not only a few runs: caches, allocators, and BLAS threads still
        # spinning from the work just before (pruning) settle first
        runs = _in_turns(sessions, feed, repeats, warmup, seconds, 2000, min(WARMUP_SECONDS, seconds))
        share = busy_share(before, cpu_seconds())
        times = [[t for t in session_runs if t is not None] for session_runs in runs]
        result = [Latency(float(np.median(t)), float(np.percentile(t, 90)), typical_time(t), len(t), share)
                  for t in times]
        if not quietest or (share or 0.0) < (quietest[0].busy or 0.0):
            quietest = result
        if not is_busy(share):
            break
    return quietest


@dataclass(frozen=True)
class CpuSeconds:
    """CPU seconds so far: those the CPUs this process may run on spent busy (``steal`` included:
    time the hypervisor gave to other machines), all of them, and this process's own."""

    busy: float
    total: float
    own: float


def cpu_seconds(stat: str = "/proc/stat") -> CpuSeconds | None:
    """:class:`CpuSeconds` now, from Linux's ``/proc/stat``; None where it cannot be read."""
    try:
        with open(stat) as f:
            lines = f.read().splitlines()
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    mine = {f"cpu{c}" for c in os.sched_getaffinity(0)} if hasattr(os, "sched_getaffinity") else None
    busy = total = 0
    for line in lines:
        fields = line.split()
        if not fields or not fields[0].startswith("cpu") or fields[0] == "cpu" or (mine and fields[0] not in mine):
            continue
        # user nice system idle iowait irq softirq steal (guest time is counted in user already)
        ticks = [int(v) for v in fields[1:9]] + [0] * max(0, 9 - len(fields))
        busy += sum(ticks) - ticks[3] - ticks[4]
        total += sum(ticks)
    if not total:
        return None
    own = os.times()
    return CpuSeconds(busy / tick, total / tick, own.user + own.system)


def is_busy(share: float | None) -> bool:
    """Whether a measurement taken while other processes took ``share`` of the CPUs is unreliable."""
    return share is not None and share > BUSY_SHARE


def busy_note(share: float | None) -> str:
    """What a report says of a measurement taken on a busy machine."""
    return (f"unreliable: other processes took {share:.0%} of the CPUs meanwhile; "
            "re-measure with `onnxprune bench` on a quiet machine")


def busy_share(before: CpuSeconds | None, after: CpuSeconds | None) -> float | None:
    """The share of the CPU time between two :func:`cpu_seconds` readings that went to other
    processes (or the hypervisor), not to this one; None where either reading is missing."""
    if before is None or after is None or after.total <= before.total:
        return None
    others = (after.busy - before.busy) - (after.own - before.own)
    return float(min(1.0, max(0.0, others / (after.total - before.total))))


def _in_turns(sessions: list, feed: dict[str, np.ndarray], repeats: int, warmup: int, seconds: float,
              max_runs: int, warm_seconds: float) -> list[list[float | None]]:
    """Run each session ``warmup`` times, then for ``warm_seconds`` more (untimed), then in turns
    of blocks until the first has at least ``repeats`` timed runs and ``seconds`` of them (at most
    ``max_runs``): every run of each session in order, its milliseconds, or None where untimed (the
    warm-up, and the first runs of each block while the other session's threads still spin)."""
    runs: list[list[float | None]] = [[] for _ in sessions]
    for s, r in zip(sessions, runs):
        for _ in range(warmup):
            s.run(None, feed)
            r.append(None)
    start = time.perf_counter()
    sessions[0].run(None, feed)
    runs[0].append(None)
    once = max(time.perf_counter() - start, 1e-6)
    for s, r in zip(sessions, runs):
        for _ in range(int(min(1000, warm_seconds / once))):
            s.run(None, feed)
            r.append(None)
    repeats = max(repeats, min(max_runs, int(seconds / once)))
    block = max(1, min(repeats, int(BLOCK_SECONDS / once)))
    untimed = max(1, math.ceil(SETTLE_SECONDS / once)) if block > 1 else 0
    timed = 0
    while timed < repeats:
        for s, r in zip(sessions, runs):
            for i in range(untimed + block):
                start = time.perf_counter()
                s.run(None, feed)
                r.append((time.perf_counter() - start) * 1e3 if i >= untimed else None)
        timed += block
    return runs


def latency_ms(models: Sequence[onnx.ModelProto], feed: dict[str, np.ndarray], provider: str = "cpu",
               repeats: int = 30, warmup: int = 5) -> list[float]:
    """Latency (ms) of each model on ``feed`` as models are compared (:func:`speedup`), runs
    alternating across models in blocks."""
    return [m.ms for m in measure(models, feed, provider, repeats, warmup)]


def speedup(before: Latency, after: Latency) -> float:
    """How many times faster ``after`` runs than ``before``, on the figure models are compared on
    (:attr:`Latency.ms`)."""
    return before.ms / after.ms


# profiled runs of one model: at least this long in all, and at most this many node events
# (each is about 1 kB of ORT's JSON, held in memory while it is read)
PROFILE_SECONDS = 1.0
MAX_PROFILED_EVENTS = 40_000


@dataclass
class OpTimes:
    """Where a run's time goes (milliseconds, from ONNX Runtime's profiler): the kernels of each
    op type as ORT runs them — after its graph optimisations, so a fused node counts under its own
    type (a ``Conv`` with its activation, SiLU as ``QuickGelu``) and the layout reorders ORT
    inserts around blocked convs under theirs —, the part of a run outside any kernel
    (scheduling, copies, the session's own work) and the whole run; each the figure runs are
    compared on (:func:`typical_time`) over the profiled runs, so they need not add up exactly."""

    by_op: dict[str, float]
    run_ms: float
    runs: int
    between_ms: float


def op_times(models: Sequence[onnx.ModelProto], feed: dict[str, np.ndarray], provider: str = "cpu",
             warmup: int = 5, threads: int = 0) -> list[OpTimes]:
    """:class:`OpTimes` of each model on ``feed``, from about :data:`PROFILE_SECONDS` of runs
    each after ``warmup`` untimed ones, the models taking turns in blocks as :func:`measure`'s
    do (a block's first runs, while the other session's threads still spin, left out). The
    profiler's files go to a temporary folder, removed after."""
    with tempfile.TemporaryDirectory(prefix="onnxprune-profile-") as folder:
        sessions = [provider_session(m, provider, threads, profile_prefix=os.path.join(folder, f"model{i}"))
                    for i, m in enumerate(models)]
        nodes = max(len(m.graph.node) for m in models) or 1
        runs = _in_turns(sessions, feed, 3, warmup, PROFILE_SECONDS, max(3, MAX_PROFILED_EVENTS // nodes), 0.0)
        results = []
        for s, session_runs in zip(sessions, runs):
            with open(s.end_profiling()) as f:
                results.append(_op_times(json.load(f), [t is not None for t in session_runs]))
    return results


def _op_times(events: list[dict], timed: list[bool]) -> OpTimes:
    """Op-type times of the runs marked ``timed`` (in the order they ran): each op type's kernel
    time within a run, taken per run, then :func:`typical_time` of them over the runs."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    windows = [(e["ts"], e["ts"] + e["dur"]) for e, t in zip(runs, timed) if t]
    if not windows:
        return OpTimes({}, 0.0, 0, 0.0)
    starts = np.array([w[0] for w in windows])
    by_op: dict[str, np.ndarray] = {}  # microseconds, per run
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        k = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if k >= 0 and e["ts"] <= windows[k][1]:
            op = e.get("args", {}).get("op_name", "?")
            by_op.setdefault(op, np.zeros(len(windows)))[k] += e["dur"]
    whole = np.array([b - a for a, b in windows], np.float64)
    between = whole - sum(by_op.values(), np.zeros(len(windows)))
    ops = {op: typical_time(us) / 1e3 for op, us in by_op.items()}
    return OpTimes(dict(sorted(ops.items(), key=lambda kv: -kv[1])), typical_time(whole) / 1e3, len(windows),
                   max(0.0, typical_time(between) / 1e3))
