"""Pruned vs original on held-out samples: relative output error, top-1 agreement of class
scores, and for probability maps the overlap of the regions each model marks."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from .activations import run_batches
from .calib import Calibration
from .graphview import inputs_of
from .io import default_opset
from .ops import LinearHandler, handler_for

log = logging.getLogger(__name__)


@dataclass
class OutputFidelity:
    """How close one output of the pruned model stays to the original's."""

    name: str
    relative_error: float  # ‖y' − y‖ / ‖y‖ over all held-out samples
    max_abs_diff: float
    top1_agreement: float | None  # for outputs that look like class scores [N, K]
    samples: int = 0  # held-out samples the agreement was counted on
    # for probability maps (see probability_outputs): IoU of the elements above MARKED in the pruned
    # and in the original output; None where the original marks fewer than MIN_MARKED of them
    marked_iou: float | None = None
    # False: a layer's output checked in place of the graph outputs it feeds, or a part a Concat joins
    # into a graph output (checked_tensors)
    graph_output: bool = True
    # ‖y − ȳ‖ / ‖y‖ of the original's output over the held-out samples (ȳ: their mean): how much it
    # depends on the input at all; None where it has no sample axis or one sample was compared
    variation: float | None = None
    # for a Sigmoid's probability map: the relative error of its logits (the Sigmoid's input, recovered
    # from the probabilities), what judges it where too few elements are marked for an IoU
    logit_error: float | None = None
    # the graph output a Concat joins this part into ('' where it is not such a part)
    part_of: str = ""
    # for probability maps that mark too few elements for marked_iou: the IoU of what they mark and
    # how many elements either map marks (what the safety net bounds it by); None where none is marked
    sparse_iou: float | None = None
    sparse_marks: int = 0


# A probability map marks what lies above its sigmoid's own decision boundary (a Softmax map: what a
# class wins outright); an IoU over fewer marked elements than this (a detector's class map where
# little fires) is too noisy to judge by.
MARKED = 0.5
MIN_MARKED = 100
# Fewer marks than MIN_MARKED still show a map that lost them, where even the IoU's upper confidence
# bound is poor; below this many marked elements (in either map) they are not read at all: a few
# marks are one object, which one borderline score decides.
MIN_SPARSE_MARKS = 10
# Probabilities are clipped this far from 0 and 1 before their logits are taken: float32 Sigmoids
# saturate to exactly 0 or 1, whose logits would be infinite (±13.8 here).
LOGIT_CLIP = 1e-6
# Ops that move or select a tensor's elements without changing their values.
_LAYOUT_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Slice", "Concat"}


# Ops that pick elements by their values: what comes out of them (kept boxes, indices, a class
# map) is sized by the data or integer, so it cannot be compared with the original's element by
# element, and neither can what is computed from it.
_SELECTING_OPS = {"NonMaxSuppression", "NonZero", "Compress", "Unique", "TopK", "ArgMax", "ArgMin"}
_SHAPE_READERS = {"Shape", "Size"}  # read no values: not a path from a layer's values


def checked_tensors(model: onnx.ModelProto) -> list[str]:
    """The tensors fidelity is measured on (:func:`checked_parts`, in order)."""
    return list(checked_parts(model))


def checked_parts(model: onnx.ModelProto) -> dict[str, str]:
    """The tensors fidelity is measured on, each with the graph output it is a part of ('' where
    it is not a part).

    The graph outputs, except that an output computed through an op that picks elements by value
    (a built-in NMS, ``TopK``, ``ArgMax``…) is replaced by the outputs of the last layers (Conv,
    Gemm, MatMul…) its values come from — a detector's head convs before its decoding and NMS, a
    segmenter's logits before its arg-max — or of a ``Sigmoid`` where they pass one: a score map
    the selection thresholds or ranks is judged as a probability map (:func:`probability_outputs`),
    as its few high scores are what is picked, while its logits' error is mostly the certain
    background's. What lies between is fixed post-processing; the layers are what pruning
    changes. A layer that itself runs on picked rows (a two-stage detector's box head on the
    proposals its NMS kept) is not compared, as the two models pick different rows: the layers
    its values come from are.

    And an output that a ``Concat`` joins (through layout ops) from parts computed apart — a YOLO
    export's ``[boxes, objectness, classes]`` columns, its levels' rows — is measured part by part:
    one relative error over the whole is mostly its largest values' (box coordinates in pixels,
    offsets near 0.5) and stays small while the scores beside them, near 0 or 1, are lost."""
    producer = {out: node for node in model.graph.node for out in node.output if out}
    position = {id(node): i for i, node in enumerate(model.graph.node)}
    picked: set[str] = set()  # tensors computed through a selecting op
    for node in model.graph.node:  # in topological order, as ONNX requires
        if (node.domain in ("", "ai.onnx") and node.op_type in _SELECTING_OPS) or \
                any(i in picked for i in inputs_of(node)):
            picked.update(o for o in node.output if o)

    def layers_above(name: str) -> list[str]:
        found, seen, stack = [], set(), [name]
        while stack:
            tensor = stack.pop()
            node = producer.get(tensor)
            if tensor in seen or node is None:
                continue
            seen.add(tensor)
            if tensor not in picked and (node.op_type == "Sigmoid" or (
                    isinstance(handler_for(node), LinearHandler) and tensor == node.output[0])):
                found.append(tensor)
            elif node.op_type not in _SHAPE_READERS:  # a layer on picked rows (a two-stage detector's RoI head) too
                stack.extend(inputs_of(node))
        return sorted(found, key=lambda t: position[id(producer[t])])

    checked: dict[str, str] = {}
    for o in model.graph.output:
        layers = layers_above(o.name) if o.name in picked else []
        parts = [] if layers else _joined_parts(o.name, producer)
        if len(parts) > MAX_PARTS:  # each part is a line of the report and an output of every probe run
            parts = []
        for name in parts:
            checked.setdefault(name, o.name)
        for name in [] if parts else layers or [o.name]:
            checked.setdefault(name, "")
    return checked


# An output joined from more parts than this is checked whole: a detector's joins hold a few per
# level (YOLO: boxes, objectness, classes at three strides), while a join of hundreds of slices
# would make as many report lines and probe outputs.
MAX_PARTS = 64
# Layout ops that neither join nor cut: a part keeps its values through them.
_MOVING_OPS = _LAYOUT_OPS - {"Slice", "Concat"}


def _joined_parts(name: str, producer: dict[str, onnx.NodeProto]) -> list[str]:
    """The computed tensors a ``Concat`` joins into ``name`` (through :data:`_MOVING_OPS`), each
    split the same way in turn, in order; [] where ``name`` is not such a join. Constant inputs
    (anchors, a grid) and graph inputs are left out: they are the same in both models, and would
    only dilute a part's error."""
    parts: list[str] = []
    stack, seen = [(name, True)], set()
    while stack:
        tensor, top = stack.pop()
        if tensor in seen:  # a part joined twice, or by two joins: once (and no blow-up on nested joins)
            continue
        seen.add(tensor)
        node = producer.get(tensor)
        while node is not None and node.op_type in _MOVING_OPS and node.input:
            node = producer.get(node.input[0])
        joined = [] if node is None or node.op_type != "Concat" else \
            [i for i in node.input if i and i in producer and producer[i].op_type != "Constant"]
        if joined and len([i for i in node.input if i]) > 1:  # a join, if only of one part and constants
            stack.extend((i, False) for i in reversed(joined))
        elif not top:
            parts.append(tensor)
    return parts


def probability_outputs(model: onnx.ModelProto, names: Sequence[str] | None = None) -> dict[str, int | None]:
    """Graph outputs that are probability maps, each with its class axis: computed by a ``Sigmoid``
    (through layout ops only; class axis None), such as a text detector's probability map or a
    segmentation mask, or by a ``Softmax`` over one axis of a map with positions besides it
    (``[N, anchors, classes]``: an SSD-style detector's scores, a recogniser's per-step character
    scores). Their relative error counts every boundary that moves by a pixel, or is mostly the
    certain background's, which their thresholded regions do not: they are judged by the overlap
    of the regions they mark (:func:`compare`, :func:`poor_fidelity`, :func:`guard_loss`)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    consts = {init.name for init in model.graph.initializer}
    seen: dict[str, bool] = {}

    def from_sigmoid(name: str) -> bool:
        if name not in seen:
            seen[name] = False  # a cycle cannot make it one
            node = producer.get(name)
            if node is not None and node.op_type == "Sigmoid":
                seen[name] = True
            elif node is not None and node.op_type in _LAYOUT_OPS:
                data = node.input if node.op_type == "Concat" else node.input[:1]  # the rest: shapes, indices
                live = [i for i in data if i and i not in consts]
                seen[name] = bool(live) and all(from_sigmoid(i) for i in live)
        return seen[name]

    ranks = {o.name: len(o.type.tensor_type.shape.dim) for o in model.graph.output
             if o.type.tensor_type.HasField("shape")}
    opset = default_opset(model) or 13
    maps: dict[str, int | None] = {}
    for name in (names if names is not None else [o.name for o in model.graph.output]):
        if from_sigmoid(name):
            maps[name] = None
        elif (axis := _softmax_axis(name, producer, ranks.get(name), opset)) is not None:
            maps[name] = axis
    return maps


def _softmax_axis(name: str, producer: dict[str, onnx.NodeProto], rank: int | None, opset: int) -> int | None:
    """The class axis of ``name`` where it is a Softmax's output (through Identity) over one axis
    of a map: rank ≥ 3 (a batch axis, a class axis and positions), or rank 2, ``[anchors, classes]``
    from an exporter that dropped a batch of 1 (a classifier's ``[N, K]``, whose rows are the
    samples, is judged by top-1 agreement instead: :func:`compare` tells them apart by the rows);
    None otherwise — before opset 13 a Softmax whose axis is not the last normalises over all the
    axes from it on."""
    node = producer.get(name)
    while node is not None and node.op_type == "Identity":
        node = producer.get(node.input[0])
    if node is None or node.op_type != "Softmax" or node.domain not in ("", "ai.onnx") or rank is None or rank < 2:
        return None
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1 if opset >= 13 else 1)
    axis = axis + rank if axis < 0 else axis
    if not 0 < axis < rank or (opset < 13 and axis != rank - 1):
        return None
    return axis


def _marked_by_class(a: np.ndarray, b: np.ndarray, axis: int) -> np.ndarray:
    """``[3, K]``: per class along ``axis``, the elements above :data:`MARKED` in both maps, in
    either, and in the original ``a``."""
    a, b = np.moveaxis(a > MARKED, axis, -1), np.moveaxis(b > MARKED, axis, -1)
    k = a.shape[-1]
    a, b = a.reshape(-1, k), b.reshape(-1, k)
    return np.stack([(a & b).sum(0), (a | b).sum(0), a.sum(0)]).astype(np.int64)


def _without_background(counts: np.ndarray) -> tuple[int, int, int]:
    """Intersection, union and original marks over the classes, less the class that holds more
    than half the original's marks where one does (the background of a detector's scores, the
    blank of a recogniser's: certain almost everywhere, it would make any two maps agree)."""
    inter, union, marks = counts
    if marks.sum() and marks.max() * 2 > marks.sum():
        keep = np.arange(len(marks)) != marks.argmax()
        inter, union, marks = inter[keep], union[keep], marks[keep]
    return int(inter.sum()), int(union.sum()), int(marks.sum())


def comparable(reference: np.ndarray, output: np.ndarray) -> bool:
    """Whether an output can be compared with the original's: floating-point, of the same shape
    (integer outputs are indices or counts; a shape that differs is sized by the data)."""
    return np.issubdtype(reference.dtype, np.floating) and reference.shape == output.shape


SUM_BLOCK = 1 << 20  # values per float64 block of squared_sums: a segmentation map batch is 10⁷–10⁸


def squared_sums(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """``Σ (b − a)²`` and ``Σ a²`` in float64, a block of rows at a time where the arrays are large
    (whole-batch float64 copies of a dense output made the probes memory-bound)."""
    a, b = np.atleast_1d(a), np.atleast_1d(b)
    rows = max(1, SUM_BLOCK // max(int(np.prod(a.shape[1:])), 1))
    err = ref = 0.0
    for start in range(0, len(a), rows):
        x, y = a[start:start + rows].astype(np.float64), b[start:start + rows].astype(np.float64)
        err, ref = err + float(((y - x) ** 2).sum()), ref + float((x ** 2).sum())
    return err, ref


def compare(original: onnx.ModelProto, pruned: onnx.ModelProto, calib: Calibration,
            indices: Sequence[int], batch: int | None = None, provider: str = "cpu") -> list[OutputFidelity]:
    """Run both models on ``calib[indices]`` and compare the :func:`checked_tensors` that can be
    compared: floating-point ones whose shape the data does not change. Integer outputs (indices,
    counts) and outputs sized by the data are left out and logged."""
    parts = checked_parts(original)
    names = list(parts)
    maps = probability_outputs(original, names)
    sigmoid_maps = {n for n, axis in maps.items() if axis is None}  # the rest are Softmax maps, by class
    # err², ref², maxdiff, agree, count, ∩, ∪, marked, then for Sigmoid maps their logits' err², ref²
    acc = {n: [0.0, 0.0, 0.0, 0, 0, 0, 0, 0, 0.0, 0.0] for n in names}
    sums: dict[str, list] = {n: [None, 0] for n in names}  # per output: Σ over samples of y, samples
    classes: dict[str, np.ndarray] = {}  # Softmax maps: ∩, ∪, marked per class (_marked_by_class)
    left_out: set[str] = set()
    runs = zip(run_batches(original, names, calib, indices, batch, provider),
               run_batches(pruned, names, calib, indices, batch, provider))
    for (idx, ref), (_, out) in runs:
        for n in names:
            if n in left_out or not comparable(ref[n], out[n]):
                left_out.add(n)
                continue
            part_err, part_ref = squared_sums(ref[n], out[n])
            a, b = ref[n].astype(np.float64), out[n].astype(np.float64)
            s = acc[n]
            s[0] += part_err
            s[1] += part_ref
            s[2] = max(s[2], float(np.abs(b - a).max()) if a.size else 0.0)
            if a.ndim and a.shape[0] == len(idx) and sums[n][1] >= 0:  # one row per sample
                total = a.sum(axis=0)
                sums[n] = [total if sums[n][0] is None else sums[n][0] + total, sums[n][1] + len(idx)]
            else:
                sums[n][1] = -1  # no sample axis: not measured
            scores = a.ndim == 2 and a.shape[0] == len(idx)  # one row per sample: class scores, if any
            if n in sigmoid_maps:
                s[5] += int(np.count_nonzero((a > MARKED) & (b > MARKED)))
                s[6] += int(np.count_nonzero((a > MARKED) | (b > MARKED)))
                s[7] += int(np.count_nonzero(a > MARKED))
                logit_a = _logits(a)
                s[8] += float(((_logits(b) - logit_a) ** 2).sum())
                s[9] += float((logit_a ** 2).sum())
            elif n in maps and not scores:  # a map by class ([anchors, classes] too, rows not samples)
                part = _marked_by_class(a, b, maps[n])
                classes[n] = part if n not in classes else classes[n] + part
            elif scores and a.shape[1] > 1:  # one row of scores per sample
                s[3] += int((a.argmax(1) == b.argmax(1)).sum())
                s[4] += a.shape[0]
    if left_out:
        log.warning("held-out check leaves out outputs it cannot compare (integer, or sized by the data): %s",
                    ", ".join(sorted(left_out)))
    outputs = {o.name for o in original.graph.output}
    for n, counts in classes.items():
        acc[n][5:8] = _without_background(counts)
    fidelity = []
    for n, s in acc.items():
        if n in left_out:
            continue
        enough = s[7] >= MIN_MARKED
        fidelity.append(OutputFidelity(
            n, _relative(s[0], s[1]), s[2], s[3] / s[4] if s[4] else None, s[4], s[5] / s[6] if enough else None,
            n in outputs, _variation(s[1], *sums[n]), _relative(s[8], s[9]) if n in sigmoid_maps else None,
            parts[n], s[5] / s[6] if s[6] and not enough else None, s[6] if not enough else 0))
    return fidelity


def _relative(err2: float, ref2: float) -> float:
    """``‖y' − y‖ / ‖y‖`` from the two sums of squares (1 where ``y`` is zero and ``y'`` is not)."""
    return (err2 / ref2) ** 0.5 if ref2 > 0 else float(err2 > 0)


def _logits(p: np.ndarray) -> np.ndarray:
    """The logits a Sigmoid made ``p`` from (float64), its saturated ends clipped (:data:`LOGIT_CLIP`)."""
    p = np.clip(p, LOGIT_CLIP, 1 - LOGIT_CLIP)
    return np.log(p) - np.log1p(-p)


def _variation(squares: float, total: np.ndarray | None, samples: int) -> float | None:
    """``‖y − ȳ‖ / ‖y‖`` over ``samples`` rows from ``Σ‖y‖²`` and the per-element sum of the rows:
    ``Σ‖y − ȳ‖² = Σ‖y‖² − ‖Σy‖² / n``."""
    if total is None or samples < 2 or squares <= 0:
        return None
    spread = max(squares - float((total ** 2).sum()) / samples, 0.0)
    return (spread / squares) ** 0.5


# An output that varies across the held-out samples by less than this share of its size barely
# depends on its input (all-alike or wrongly scaled calibration samples, untrained weights): its
# relative error cannot tell whether the pruned model keeps what the original computes from it.
UNINFORMATIVE_VARIATION = 1e-3


def uninformative(fidelity: list[OutputFidelity]) -> str:
    """Why the held-out check says little ('' when it does not): an output nearly the same for
    every held-out sample."""
    for f in fidelity:
        if f.variation is not None and f.variation < UNINFORMATIVE_VARIATION:
            return (f"{label(f)} is nearly the same for every held-out sample (it varies by {f.variation:.1e} of its "
                    "size), so the check cannot tell whether the pruned model keeps what the original computes from "
                    "its input; check that the calibration samples differ and are scaled as the model expects")
    return ""


def label(f: OutputFidelity) -> str:
    """How reports name what ``f`` measured: a graph output, or a tensor checked in its place."""
    if f.part_of:
        return f"part '{f.name}' of output '{f.part_of}'"
    return f"output '{f.name}'" if f.graph_output else f"layer output '{f.name}' (before the post-processing)"


def output_loss(f: OutputFidelity) -> float:
    """One output's disagreement with the original: top-1 disagreement for class scores, one less
    the IoU of the marked regions for probability maps, otherwise the relative error."""
    if f.top1_agreement is not None:
        return 1 - f.top1_agreement
    if f.marked_iou is not None:
        return 1 - f.marked_iou
    return judged_error(f)


def judged_error(f: OutputFidelity) -> float:
    """The relative error an output is judged by: its logits' for a Sigmoid's probability map (a
    map of near-zero probabilities changes by a large fraction of its small size where its logits,
    what the network computes, barely move), otherwise its own."""
    return f.logit_error if f.logit_error is not None else f.relative_error


def guard_loss(fidelity: list[OutputFidelity]) -> float:
    """What ``--max-drop`` bounds: the worst output's :func:`output_loss`."""
    return max((output_loss(f) for f in fidelity), default=0.0)


# What the CLI treats as a broken result when no --max-drop is given: a pruned classifier that
# changes more than one held-out decision in ten, a probability map whose marked region overlaps
# the original's by an IoU below one half (objects lost or made up, not edges moved; where it marks
# only a few elements, an IoU whose upper confidence bound is below one half), or another
# output (boxes, embeddings) whose error is about a third of its own size, is not a model to hand
# on silently. Agreement counted on a few held-out images is noisy, so it is judged by its upper
# confidence bound.
POOR_AGREEMENT = 0.90
POOR_MARKED_IOU = 0.5
POOR_RELATIVE_ERROR = 0.30
_Z = 1.645  # one-sided 95 %


# Below this many held-out samples even full agreement cannot show, at that confidence, that a
# pruned model keeps POOR_AGREEMENT of its predictions (Wilson bound n / (n + z²) at agreement 1).
CONCLUSIVE_SAMPLES = math.ceil(_Z * _Z * POOR_AGREEMENT / (1 - POOR_AGREEMENT))


def _wilson(agreement: float, samples: int, sign: int) -> float:
    z2n = _Z * _Z / samples
    centre = agreement + z2n / 2
    spread = _Z * (agreement * (1 - agreement) / samples + z2n / (4 * samples)) ** 0.5
    return min(1.0, max(0.0, (centre + sign * spread) / (1 + z2n)))


def agreement_upper_bound(agreement: float, samples: int) -> float:
    """Wilson upper confidence bound of a top-1 agreement measured on ``samples`` images."""
    return 1.0 if samples <= 0 else _wilson(agreement, samples, +1)


def agreement_lower_bound(agreement: float, samples: int) -> float:
    """Wilson lower confidence bound of a top-1 agreement measured on ``samples`` images."""
    return 0.0 if samples <= 0 else _wilson(agreement, samples, -1)


def too_few_to_vouch(held_out: int, holdout: float) -> str:
    """Why a held-out check on ``held_out`` samples cannot vouch for a pruned model ('' when it can)."""
    if held_out >= CONCLUSIVE_SAMPLES:
        return ""
    if held_out == 0:
        why = "there is no hold-out, so the check ran on the samples the model was fit to"
    else:
        why = (f"the held-out check ran on only {held_out} samples: even full agreement there shows only that "
               f"the pruned model agrees with the original on more than {agreement_lower_bound(1.0, held_out):.0%} "
               "of inputs (95% confidence)")
    images = f"{math.ceil(CONCLUSIVE_SAMPLES / holdout)} calibration images at --holdout {holdout:g}" if holdout > 0 \
        else "a --holdout above 0"
    return f"{why}; give {CONCLUSIVE_SAMPLES} or more held-out samples ({images}) or check it on your own data"


def poor_fidelity(fidelity: list[OutputFidelity]) -> str:
    """Why held-out fidelity is too poor to call the run a success ('' when it is not)."""
    for f in fidelity:
        if f.top1_agreement is not None and agreement_upper_bound(f.top1_agreement, f.samples) < POOR_AGREEMENT:
            return f"{label(f)} keeps {f.top1_agreement:.1%} top-1 agreement with the original " \
                   f"(clearly below {POOR_AGREEMENT:.0%})"
        if f.marked_iou is not None and f.marked_iou < POOR_MARKED_IOU:
            return f"{label(f)} marks a region (above {MARKED:g}) overlapping the original's by IoU " \
                   f"{f.marked_iou:.2f} (below {POOR_MARKED_IOU:.2f})"
        if (f.sparse_iou is not None and f.sparse_marks >= MIN_SPARSE_MARKS
                and _wilson(f.sparse_iou, f.sparse_marks, +1) < POOR_MARKED_IOU):
            return f"{label(f)} overlaps the original's few marks (above {MARKED:g}) by IoU {f.sparse_iou:.2f} " \
                   f"over the {f.sparse_marks} elements either marks (clearly below {POOR_MARKED_IOU:.2f})"
        if f.top1_agreement is None and f.marked_iou is None and judged_error(f) > POOR_RELATIVE_ERROR:
            logits = " (its logits)" if f.logit_error is not None else ""
            return f"{label(f)}{logits} is off by a relative error of {judged_error(f):.2f} " \
                   f"(above {POOR_RELATIVE_ERROR:.2f})"
    return ""
