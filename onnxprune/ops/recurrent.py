"""Recurrent layers (LSTM, GRU, RNN): barriers whose MACs are counted, so that totals and
targets include them (a CRNN text recogniser spends a share of its compute in them)."""

from __future__ import annotations

import numpy as np

from .base import Handler, register

@register("LSTM", "GRU", "RNN")
class Recurrent(Handler):
    """No channel rule (its input width would need the columns of ``W`` sliced per gate):
    a barrier, with the multiply-accumulates of one sample over its whole sequence."""

    always_barrier = "a recurrent layer: its input channels are not pruned"

    def macs(self, node, g):
        w, r = g.input_const(node, 1), g.input_const(node, 2)
        x = g.shape(node.input[0])
        if w is None or r is None or x is None or len(x) != 3:
            return 0
        layout = next((a.i for a in node.attribute if a.name == "layout"), 0)
        steps = x[1] if layout else x[0]
        return int(steps) * int(np.prod(w.shape) + np.prod(r.shape))
