"""What a pruning run did: per-group and per-layer tables, totals, JSON for CI gates."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .latency import busy_note, is_busy
from .tail import TailResult
from .verify import OutputFidelity, label


@dataclass
class GroupResult:
    """One pruned channel group."""

    name: str
    channels_before: int
    channels_after: int
    consumers: list[str]
    error_before_refit: float | None = None  # relative error of the consumers, sliced weights
    error_after_refit: float | None = None
    samples_per_unknown: float | None = None
    residual_target: bool = False
    refit_skipped: list[str] = field(default_factory=list)
    # held-out relative error of the residual branch before and after pair refinement (--refine),
    # where it was refined
    refined_error: tuple[float, float] | None = None


@dataclass
class LayerRow:
    """One MAC-bearing node, before and after."""

    node: str
    op_type: str
    in_channels: tuple[int, int]
    out_channels: tuple[int, int]
    macs: tuple[int, int]
    groups: tuple[int, int] = (1, 1)  # a conv's groups (its ``group`` attribute)


@dataclass
class Totals:
    macs: tuple[int, int]
    params: tuple[int, int]
    size_bytes: tuple[int, int]
    latency_ms: tuple[float, float] | None = None  # as models are compared (latency.Latency.ms)
    # the share of the CPUs other processes took while the latency was measured (None: unknown)
    latency_busy: float | None = None

    @property
    def macs_speedup(self) -> float:
        return self.macs[0] / max(self.macs[1], 1)

    @property
    def latency_speedup(self) -> float | None:
        return self.latency_ms[0] / self.latency_ms[1] if self.latency_ms else None


@dataclass
class ModelForm:
    """One form of the pruned model (float, or quantized): size, latency, held-out fidelity."""

    size_bytes: int
    latency_ms: float | None  # None: not measured (--no-latency)
    fidelity: list[OutputFidelity]  # against the float original, on the held-out samples

    def summary(self) -> str:
        """Size, worst output's error and agreement, latency, on one line."""
        err = max((f.relative_error for f in self.fidelity), default=0.0)
        agree = min((f.top1_agreement for f in self.fidelity if f.top1_agreement is not None), default=None)
        return (f"{self.size_bytes / 1e6:.2f}M, rel err {err:.4f}"
                + (f", top-1 {agree:.1%}" if agree is not None else "")
                + (f", {self.latency_ms:.2f}ms" if self.latency_ms is not None else ""))


@dataclass
class Quantization:
    """``--quantize``: how the pruned model was quantized, and its float and quantized forms
    side by side (the report's totals and fidelity are the quantized, final model's)."""

    dtype: str  # "int8"
    scheme: dict[str, str]  # format, weights, activations, bias
    calibrate_method: str
    calibration_samples: int  # the fit samples; the held-out ones are not used for calibration
    pruned_float: ModelForm
    pruned_quantized: ModelForm


@dataclass
class Report:
    """The full account of a run; :meth:`to_json` is stable for CI gates."""

    method: str
    reconstruct: bool
    target_speedup: float
    totals: Totals
    groups: list[GroupResult]
    layers: list[LayerRow]
    skipped: list[tuple[str, str]]  # (group, reason)
    fidelity: list[OutputFidelity]
    calibration: dict[str, int]
    bn_folded: int = 0
    seconds: float = 0.0
    targets: dict = field(default_factory=dict)  # what was asked: speedup, params, size_mb, latency
    targets_met: bool = True  # False when --max-drop made the run give width back
    provider: str = "cpu"
    latency_batch: int = 1
    phases: dict[str, float] = field(default_factory=dict)  # wall seconds per pipeline stage
    stripe: dict | None = None  # --method stripe: keep fraction, stripe MACs, per-layer form (see stripe.py)
    quantization: Quantization | None = None  # --quantize: float vs quantized pruned model
    sparsity: list[dict] | None = None  # --sparsity 2:4: each Conv/Gemm/MatMul, sparse or why it stayed dense
    tail: TailResult | None = None  # the model's last layers tuned together (onnxprune.tail)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["totals"]["macs_speedup"] = self.totals.macs_speedup
        d["totals"]["latency_speedup"] = self.totals.latency_speedup
        d["skipped"] = [{"group": g, "reason": r} for g, r in self.skipped]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def phases_line(self) -> str:
        """Where the time went, on one line (stages in the order they ran)."""
        parts = ", ".join(f"{name} {sec:.1f}s" for name, sec in self.phases.items())
        return f"time {self.seconds:.1f}s: {parts}" if parts else f"time {self.seconds:.1f}s"

    def thinnest_refit(self) -> GroupResult | None:
        """The pruned group whose refit had the fewest calibration samples per unknown."""
        fitted = [grp for grp in self.groups if grp.samples_per_unknown is not None]
        return min(fitted, key=lambda grp: grp.samples_per_unknown, default=None)

    def table(self, max_rows: int = 60) -> str:
        """Human-readable summary: per-layer table, then totals and fidelity."""
        lines = [f"{'layer':<36} {'op':<8} {'in ch':>11} {'out ch':>11} {'MACs':>19}"]
        rows = [r for r in self.layers if r.macs[0] != r.macs[1]] or self.layers
        for r in rows[:max_rows]:
            lines.append(f"{r.node[:36]:<36} {r.op_type:<8} {_arrow(r.in_channels):>11} "
                         f"{_arrow(r.out_channels):>11} {_arrow(tuple(_si(m) for m in r.macs)):>19}"
                         + (f"  groups {_arrow(r.groups)}" if r.groups[0] != r.groups[1] else ""))
        if len(rows) > max_rows:
            lines.append(f"... {len(rows) - max_rows} more layers (see --report JSON)")
        t = self.totals
        lines.append("")
        refined = sum(grp.refined_error is not None for grp in self.groups)
        tail = self.tail
        lines.append(f"method  {self.method}{', least-squares refit' if self.reconstruct else ', no refit'}"
                     + (f", {refined} residual branches refined" if refined else "")
                     + (f", last {tail.layers} layers tuned together" if tail is not None and tail.kept else ""))
        lines.append(f"MACs    {_si(t.macs[0]):>9} -> {_si(t.macs[1]):>9}   ({t.macs_speedup:.2f}x fewer)")
        lines.append(f"params  {_si(t.params[0]):>9} -> {_si(t.params[1]):>9}   ({t.params[1] / max(t.params[0], 1):.1%})")
        lines.append(f"size    {t.size_bytes[0] / 1e6:>8.2f}M -> {t.size_bytes[1] / 1e6:>8.2f}M")
        if t.latency_ms:
            lines.append(f"latency {t.latency_ms[0]:>8.2f}ms -> {t.latency_ms[1]:>7.2f}ms  "
                         f"({t.latency_speedup:.2f}x measured, 10th-percentile runs, ORT {self.provider}, batch {self.latency_batch}"
                         + (f"; {busy_note(t.latency_busy)}" if is_busy(t.latency_busy) else "") + ")")
        if self.quantization:
            q = self.quantization
            lines.append(f"{q.dtype:<7} float {q.pruned_float.summary()} -> {q.dtype} {q.pruned_quantized.summary()} "
                         f"({q.scheme['format']}, {q.scheme['activations']} activations, {q.calibrate_method} "
                         f"on {q.calibration_samples} fit samples)")
        if self.sparsity is not None:
            sparse = [layer for layer in self.sparsity if not layer["skipped"]]
            dense = len(self.sparsity) - len(sparse)
            lines.append(f"2:4     {len(sparse)} of {len(self.sparsity)} Conv/Gemm/MatMul layers sparse"
                         + (f"; {dense} left dense (reasons in the JSON report)" if dense else ""))
        if self.stripe:
            s = self.stripe
            lines.append(f"stripes kept {s['keep_fraction']:.1%} per K×K conv: stripe MACs "
                         f"{_si(s['stripe_macs'])} ({s['stripe_macs_speedup']:.2f}x fewer); the MACs above are "
                         "the written graph's")
            for k in s["kept_dense"]:
                lines.append(f"  kept dense (dropped stripes zeroed): {k['node'][:40]}: {k['reason']}")
        held = self.calibration.get("holdout", 0)
        checked_on = f"{held} held-out samples" if held else f"{self.calibration.get('fit', 0)} fit samples, none held out"
        for f in self.fidelity:
            agree = f", top-1 agreement {f.top1_agreement:.1%}" if f.top1_agreement is not None else ""
            iou = f", marked-region IoU {f.marked_iou:.3f}" if f.marked_iou is not None else ""
            # a probability map without enough marks for an IoU is judged by its logits' error instead
            logits = f" (of its logits {f.logit_error:.4f})" if f.logit_error is not None and not iou else ""
            if f.sparse_iou is not None:  # too few marks to judge by alone (verify.poor_fidelity bounds it)
                iou = f", IoU {f.sparse_iou:.3f} of the {f.sparse_marks} elements either marks"
            lines.append(f"{label(f)}: relative error {f.relative_error:.4f}{logits}{agree}{iou} ({checked_on})")
        if not self.fidelity:
            why = "no calibration data (pass --calib to check)" if not self.calibration.get("given", True) else \
                "none of them is a floating-point tensor whose shape the data leaves alone"
            lines.append(f"outputs not checked against the original: {why}")
        if self.skipped:
            lines.append(f"{len(self.skipped)} channel groups left unpruned (reasons in the JSON report)")
        return "\n".join(lines)


def _arrow(pair: tuple) -> str:
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}->{pair[1]}"


def _si(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"
