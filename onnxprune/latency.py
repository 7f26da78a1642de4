"""Measured latency on an ONNX Runtime execution provider: warm-up, then interleaved repeats."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from .errors import OptionError
from .io import inference_session

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}


@dataclass
class Latency:
    """Per-run latency of one model (milliseconds)."""

    median_ms: float
    p90_ms: float
    runs: int


def provider_session(model: onnx.ModelProto, provider: str = "cpu", threads: int = 0) -> ort.InferenceSession:
    """An ORT session on ``provider`` (cpu, cuda or tensorrt), or a one-line error if unavailable."""
    if provider not in PROVIDERS:
        raise OptionError(f"unknown provider '{provider}'; choose one of {', '.join(PROVIDERS)}")
    name = PROVIDERS[provider]
    if name not in ort.get_available_providers():
        raise OptionError(f"execution provider '{provider}' ({name}) is not available in this onnxruntime "
                          f"build (available: {', '.join(ort.get_available_providers())}); "
                          "install onnxprune[gpu] on a machine with a GPU, or use --provider cpu")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    chain = [name] if provider == "cpu" else [name, "CPUExecutionProvider"]
    return inference_session(model, opts, chain)  # any size, over 2 GB too


MIN_TIMED_SECONDS = 1.0  # per model: sub-millisecond models get more repeats, or the median is noise
WARMUP_SECONDS = 0.3


def measure(models: Sequence[onnx.ModelProto], feed: dict[str, np.ndarray], provider: str = "cpu",
            repeats: int = 30, warmup: int = 5, threads: int = 0) -> list[Latency]:
    """Latency of each model on ``feed``; the runs of all models are interleaved so that load on
    the machine affects them alike. Fast models are repeated until each is timed for at least
    ``MIN_TIMED_SECONDS`` (at most 2000 runs)."""
    sessions = [provider_session(m, provider, threads) for m in models]
    # warm up for a while, not only a few runs: caches, allocators, and BLAS threads still
    # spinning from the work just before (pruning) settle first
    for s in sessions:
        for _ in range(warmup):
            s.run(None, feed)
    start = time.perf_counter()
    sessions[0].run(None, feed)
    once = max(time.perf_counter() - start, 1e-6)
    for _ in range(int(min(2000, WARMUP_SECONDS / once))):
        for s in sessions:
            s.run(None, feed)
    repeats = max(repeats, min(2000, int(MIN_TIMED_SECONDS / once)))
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(repeats):
        for s, t in zip(sessions, times):
            start = time.perf_counter()
            s.run(None, feed)
            t.append((time.perf_counter() - start) * 1e3)
    return [Latency(float(np.median(t)), float(np.percentile(t, 90)), len(t)) for t in times]


def latency_ms(models: Sequence[onnx.ModelProto], feed: dict[str, np.ndarray], provider: str = "cpu",
               repeats: int = 30, warmup: int = 5) -> list[float]:
    """Median latency (ms) of each model on ``feed``, runs interleaved across models."""
    return [m.median_ms for m in measure(models, feed, provider, repeats, warmup)]
