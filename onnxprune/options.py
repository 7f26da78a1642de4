"""Every setting of a pruning run, validated together, and what a run returns."""

from __future__ import annotations

import math

from dataclasses import dataclass

import onnx

from .budget import Targets
from .errors import OptionError
from .runtime import CALIBRATE_METHODS, PROVIDERS, QUANTIZE_FORMATS
from .report import Report
from .select import Method


# how widths are chosen: one keep ratio; the search over sensitivity curves; the greedy descent
# over them alone (the allocation before the search, kept to compare against)
ALLOCATIONS = ("uniform", "sensitivity", "greedy")


@dataclass
class PruneResult:
    """The pruned model and the report of how it was made."""

    model: onnx.ModelProto
    report: Report


@dataclass(frozen=True)
class PruneOptions:
    """Every setting of a pruning run, validated together (the CLI maps flags onto these)."""

    speedup: float | None = None  # MACs ratio; 2 when no target at all is given
    params: float | None = None  # fraction of parameters kept at most
    size_mb: float | None = None  # pruned model size at most (10^6 bytes)
    latency: float | None = None  # measured latency speedup at least, on ``provider``
    provider: str = "cpu"
    latency_batch: int = 1  # batch size of latency measurements
    max_drop: float | None = None  # accuracy guard on held-out data (see :func:`onnxprune.verify.guard_loss`)
    method: Method = Method.AUTO  # resolved per model when the Pruner is built (Method.for_network)
    reconstruct: bool = True
    calib_samples: int | None = 2048  # at most this many calibration samples, a random subset (None: all)
    holdout: float = 0.2
    samples_per_image: int = 10
    mixtures: float = 1.0  # mixtures of two fit samples added per fit sample (Calibration.with_mixtures)
    seed: int = 0
    round_to: int = 1  # the CLI defaults to its provider's block: 16 on cpu, 8 on GPUs (see --round-to)
    relax_round_to: bool = False  # round_to is a default, not the user's: finer multiples where a target needs them
    prune_coupled: bool | None = None  # None: residual-joined groups shrink only where the targets need them
    # or the plan keeping them would cut a group more than allocation.DEEP_CUT times
    residual_target: bool = True
    batch_size: int = 32
    allocation: str = "sensitivity"  # uniform | sensitivity | greedy (curves: need calibration data; else uniform)
    sensitivity_images: int = 256  # fit images the sensitivity curves are measured on (a random subset)
    refit_downstream: bool = True  # also refit unpruned layers whose inputs changed
    refine: bool = True  # refine residual branches' convs together (onnxprune/refine.py)
    refine_tail: bool = False  # tune the last layers of a plain chain to the output together (onnxprune/tail.py)
    slim_fallback: str = "error"  # what --method slim does when a group has no BatchNorm: error | l1
    measure_latency: bool = True
    progress: bool | None = None  # None: only when stderr is a terminal
    exclude: tuple[str, ...] = ()  # fnmatch patterns of node/tensor/weight names whose groups keep their width
    quantize: str | None = None  # "int8": ORT static QDQ quantization after pruning (onnxprune/quantize.py)
    calibrate_method: str = "minmax"  # activation ranges for --quantize: minmax | entropy | percentile
    sparsity: str | None = None  # "2:4": semi-structured sparsity after pruning (onnxprune/sparsity.py)

    def validate(self) -> "PruneOptions":
        method = self.method
        if not isinstance(method, Method):
            try:
                method = Method(method)
            except ValueError:
                raise OptionError(f"unknown method '{self.method}'; choose one of "
                                  f"{', '.join(m.value for m in Method)}") from None
        exclude = (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude or ())
        for pattern in exclude:
            if not isinstance(pattern, str) or not pattern:
                raise OptionError(f"--exclude needs a name pattern (got {pattern!r})")
        if exclude and method is Method.STRIPE:
            raise OptionError("--exclude applies to channel pruning, not to --method stripe")
        if self.quantize is not None and self.quantize not in QUANTIZE_FORMATS:
            raise OptionError(f"unknown --quantize '{self.quantize}'; choose one of {', '.join(QUANTIZE_FORMATS)}")
        if self.calibrate_method not in CALIBRATE_METHODS:
            raise OptionError(f"unknown --calibrate-method '{self.calibrate_method}'; choose one of "
                              f"{', '.join(CALIBRATE_METHODS)}")
        if self.quantize and method is Method.STRIPE:
            # stripe runs its own pipeline (onnxprune/stripe.py), which has no quantization stage
            raise OptionError("--quantize applies to channel pruning, not to --method stripe")
        if self.sparsity is not None and self.sparsity != "2:4":
            raise OptionError(f"unknown --sparsity '{self.sparsity}'; the one pattern supported is 2:4")
        if self.sparsity and method is Method.STRIPE:
            raise OptionError("--sparsity 2:4 applies to channel pruning, not to --method stripe (its stripes "
                              "already remove kernel positions)")
        speedup = self.speedup
        if speedup is None:
            speedup = 1.0 if any(t is not None for t in (self.params, self.size_mb, self.latency)) else 2.0
        checks = [
            (speedup >= 1.0, f"--speedup must be >= 1 (got {speedup})"),
            (self.params is None or 0.0 < self.params <= 1.0, f"--params must be in (0, 1] (got {self.params})"),
            (self.size_mb is None or self.size_mb > 0, f"--size-mb must be > 0 (got {self.size_mb})"),
            (self.latency is None or self.latency >= 1.0, f"--latency must be >= 1 (got {self.latency})"),
            (self.provider in PROVIDERS, f"--provider must be one of {', '.join(PROVIDERS)} (got {self.provider})"),
            (self.latency_batch >= 1, f"--latency-batch must be >= 1 (got {self.latency_batch})"),
            (self.max_drop is None or 0.0 <= self.max_drop < 1.0, f"--max-drop must be in [0, 1) (got {self.max_drop})"),
            (self.calib_samples is None or self.calib_samples >= 2,
             f"--calib-samples must be >= 2, or 0 for all (got {self.calib_samples})"),
            (0.0 <= self.holdout < 1.0, f"--holdout must be in [0, 1) (got {self.holdout})"),
            (self.mixtures >= 0, f"--mixtures must be >= 0 (got {self.mixtures})"),
            (self.samples_per_image >= 1, f"--samples-per-image must be >= 1 (got {self.samples_per_image})"),
            (self.round_to >= 1, f"--round-to must be >= 1 (got {self.round_to})"),
            (self.batch_size >= 1, f"--batch-size must be >= 1 (got {self.batch_size})"),
            (self.sensitivity_images >= 2, f"--sensitivity-images must be >= 2 (got {self.sensitivity_images})"),
            (self.allocation in ALLOCATIONS,
             f"--allocation must be one of {', '.join(ALLOCATIONS)} (got {self.allocation})"),
            (self.slim_fallback in ("error", "l1"), f"--slim-fallback must be error or l1 (got {self.slim_fallback})"),
        ]
        for ok, msg in checks:
            if not ok:
                raise OptionError(msg)
        # 2:4 kernels need input channels in runs of 4: kept widths are multiples of 4 too
        round_to = math.lcm(self.round_to, 4) if self.sparsity else self.round_to
        return PruneOptions(**{**self.__dict__, "method": method, "speedup": speedup, "exclude": exclude,
                               "round_to": round_to})

    @property
    def targets(self) -> Targets:
        return Targets(self.speedup or 1.0, self.params, self.size_mb)

    @property
    def calibration_provider(self) -> str:
        """Where calibration passes run: CUDA for ``--provider cuda|tensorrt``, else the CPU."""
        return "cpu" if self.provider == "cpu" else "cuda"

    @property
    def needs_data(self) -> bool:
        return self.method.needs_data or self.reconstruct
