"""Activations of a model being pruned, carried at a cut through its nodes.

Pruning goes front to back, and each step needs the inputs of a few layers *on the model pruned
so far*. Running the pruned prefix from the graph input for every step costs forward passes
quadratic in depth. A :class:`Frontier` instead keeps, for every calibration sample, the values
of the tensors that cross a cut through the node list (in memory while they fit a budget,
otherwise in ``.npy`` files in a temporary folder that :meth:`Frontier.close` always removes),
and each run executes only the segment from that cut to the tensors asked for — moving the cut
forward in the same pass. Each step then costs a short segment, the whole pruning about one
forward pass plus the segments' overlap.

The cut stays valid as long as no node before it changes; callers say how far it may move
(``advance_to``: the first node any later step may still edit). A tensor the cut cannot give is
computed from the graph inputs instead (slower, never wrong).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np
import onnx

from .activations import padded_feed, session, static_batch
from .calib import Calibration
from .io import add_initializers, copy_fields
from .graphview import inputs_of

FRONTIER_BUDGET = 1 << 29  # bytes of carried activations held in memory; more go to disk


def cut_tensors(model: onnx.ModelProto, position: int) -> set[str]:
    """Tensors produced by the first ``position`` nodes and read by a later node (or a graph output)."""
    nodes = model.graph.node
    produced = {o for n in nodes[:position] for o in n.output if o}
    read = {i for n in nodes[position:] for i in inputs_of(n)} | {o.name for o in model.graph.output}
    return produced & read


Shape = tuple[int | None, ...]


def segment_model(model: onnx.ModelProto, start: int, available: dict[str, tuple[np.dtype, Shape]],
                  outputs: Sequence[str]) -> onnx.ModelProto | None:
    """A model computing ``outputs`` from the tensors in ``available`` (their element types and
    shapes given, None for a dim not fixed), with nodes from ``start`` on only; None where some
    output needs a node before ``start``. The inputs declare their shapes: ONNX Runtime's shape
    inference misreads shape arithmetic on inputs of unknown rank or length (a Resize whose
    sizes concatenate scalars read ``size()``-wise, or a carried ``Shape(x)[0:2]``: "Number of
    elements of input 'sizes' (0)")."""
    nodes = list(model.graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    inits = {t.name for t in model.graph.initializer}
    live, used_inputs, stack, seen = set(), [], list(outputs), set()
    while stack:
        t = stack.pop()
        if t in seen or not t:
            continue
        seen.add(t)
        if t in available:
            used_inputs.append(t)
        elif t in inits:
            continue
        elif t in producer:
            i = producer[t]
            if i < start:
                return None
            if i not in live:
                live.add(i)
                stack.extend(inputs_of(nodes[i]))
        # else: a name produced inside a subgraph (If/Loop bodies read their own tensors too)
    seg = onnx.ModelProto()
    copy_fields(model, seg, skip=("graph",))
    graph = seg.graph
    copy_fields(model.graph, graph, skip=("node", "initializer", "input", "output", "value_info"))
    kept = [nodes[i] for i in sorted(live)]
    graph.node.extend(kept)
    for name in sorted(used_inputs):
        dtype, shape = available[name]
        graph.input.append(onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), list(shape)))
    for name in outputs:
        vi = onnx.ValueInfoProto()
        vi.name = name
        graph.output.append(vi)
    used = {i for n in kept for i in inputs_of(n)}
    add_initializers(graph, (t for t in model.graph.initializer if t.name in used))
    return seg


class Frontier:
    """Carried activations of ``model`` (edited in place by the caller) over ``calib[indices]``.

    Use as a context manager, or call :meth:`close`: the temporary folder goes with it.
    """

    def __init__(self, model: onnx.ModelProto, calib: Calibration, indices: Sequence[int], batch: int,
                 budget: int | None = None, provider: str = "cpu"):
        self.model, self.calib, self.provider = model, calib, provider
        self.budget = FRONTIER_BUDGET if budget is None else budget
        self.indices = np.asarray(indices)
        self.static = static_batch(model)
        self.batch = self.static or batch
        self.batches = [self.indices[s:s + self.batch] for s in range(0, len(self.indices), self.batch)]
        self.position = 0
        self.store: list[dict[str, np.ndarray | str]] = [{} for _ in self.batches]
        # carried tensor -> (element type, shape over this frontier's batches, None where they differ)
        self.kinds: dict[str, tuple[np.dtype, Shape]] = {}
        self._dir: str | None = None
        self._files = 0

    # ------------------------------------------------------------------ storage
    def __enter__(self) -> "Frontier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Forget the carried values and remove the temporary folder."""
        self.store = [{} for _ in self.batches]
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    @property
    def on_disk(self) -> bool:
        return any(isinstance(v, str) for part in self.store for v in part.values())

    def spill(self, value: np.ndarray) -> str:
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="onnxprune-frontier-")
        self._files += 1
        path = os.path.join(self._dir, f"{self._files}.npy")
        np.save(path, value, allow_pickle=False)
        return path

    @staticmethod
    def _load(value: np.ndarray | str) -> np.ndarray:
        return np.load(value, allow_pickle=False) if isinstance(value, str) else value

    # ------------------------------------------------------------------ runs
    def run(self, outputs: Sequence[str], advance_to: int | None = None
            ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Run the current model from the cut to ``outputs`` over every sample, in batches,
        yielding (sample indices, {output: array}); with ``advance_to``, the cut moves there in
        the same pass (no node before ``advance_to`` may change afterwards)."""
        outputs = list(dict.fromkeys(outputs))
        graph_inputs = {i.name for i in self.model.graph.input} - {t.name for t in self.model.graph.initializer}
        new_cut: set[str] = set()
        if advance_to is not None and advance_to > self.position:
            new_cut = cut_tensors(self.model, advance_to) - graph_inputs
        else:
            advance_to = None
        available = dict(self.kinds)
        feed0 = self.calib.take(self.batches[0][:1]) if self.batches else {}
        available.update({name: (v.dtype, (None,) * v.ndim) for name, v in feed0.items() if name in graph_inputs})
        computed = [t for t in outputs if t not in available]
        computed += sorted(t for t in new_cut if t not in available and t not in computed)
        seg = segment_model(self.model, self.position, available, computed) if computed else None
        if computed and seg is None:  # the cut cannot give them: from the graph inputs
            seg = segment_model(self.model, 0, {k: v for k, v in available.items() if k in graph_inputs}, computed)
        sess = session(seg, provider=self.provider, source=self.model) if seg is not None else None
        names = [i.name for i in seg.graph.input] if seg is not None else []
        new_store: list[dict[str, np.ndarray | str]] = []
        spill, new_kinds = False, {}
        for b, idx in enumerate(self.batches):
            needs_inputs = any(n in graph_inputs for n in [*names, *outputs])
            feed = padded_feed(self.calib, idx, self.static) if needs_inputs else {}
            carried = self.store[b]
            values: dict[str, np.ndarray] = {}
            if sess is not None:
                inputs = {n: feed[n] if n in graph_inputs else self._load(carried[n]) for n in names}
                values = dict(zip(computed, sess.run(computed, inputs)))
            for t in outputs:
                if t not in values:
                    values[t] = feed[t] if t in graph_inputs else self._load(carried[t])
            if advance_to is not None:
                part: dict[str, np.ndarray | str] = {t: carried[t] if t in carried else values[t] for t in new_cut}
                if b == 0:
                    held = sum(v.nbytes for v in part.values() if isinstance(v, np.ndarray))
                    spill = held * len(self.batches) > self.budget
                if spill:
                    part = {t: v if isinstance(v, str) else self.spill(v) for t, v in part.items()}
                new_store.append(part)
                for t in new_cut:
                    if t in values:
                        new_kinds[t] = _seen(new_kinds.get(t), values[t])
                    elif b == 0:
                        new_kinds[t] = self.kinds[t]
            yield idx, {t: values[t][:len(idx)] if values[t].ndim else values[t] for t in outputs}
        if advance_to is not None:
            self._replace(new_store, new_kinds if self.batches else {}, advance_to)

    def _replace(self, new_store: list[dict[str, np.ndarray | str]], kinds: dict[str, tuple[np.dtype, Shape]],
                 position: int) -> None:
        kept = {v for part in new_store for v in part.values() if isinstance(v, str)}
        for part in self.store:
            for v in part.values():
                if isinstance(v, str) and v not in kept:
                    os.remove(v)
        self.store, self.position, self.kinds = new_store, position, kinds


def _seen(kind: tuple[np.dtype, Shape] | None, value: np.ndarray) -> tuple[np.dtype, Shape]:
    """A carried tensor's (element type, shape) once ``value`` was seen too: a dim that differs
    between batches (the last, shorter one) is not fixed."""
    if kind is None:
        return value.dtype, tuple(value.shape)
    shape = kind[1]
    if len(shape) != value.ndim:
        return value.dtype, (None,) * value.ndim
    return value.dtype, tuple(d if d == v else None for d, v in zip(shape, value.shape))
