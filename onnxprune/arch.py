"""The pruned architecture as per-layer widths, to train from scratch (Liu et al. 2019,
"Rethinking the Value of Network Pruning")."""

from __future__ import annotations

import re

from .report import Report

_TORCH_NODE = re.compile(r"^/(?:.*/)?([^/]+)/[A-Za-z]+(?:_\d+)?$")


def exporter_name(node_name: str) -> str | None:
    """The framework's module name behind an exported node name, where recoverable.

    PyTorch names nodes ``/layer1/layer1.0/conv1/Conv`` (module ``layer1.0.conv1``); tf2onnx and
    paddle2onnx keep the layer's own name, which is returned unchanged.
    """
    if node_name.startswith("/"):
        parts = [p for p in node_name.strip("/").split("/")[:-1] if p]
        return parts[-1] if parts else None
    return node_name or None


def architecture(report: Report) -> dict:
    """Per-layer input/output widths before and after pruning, keyed by node name."""
    layers = []
    for row in report.layers:
        layers.append({
            "node": row.node,
            "module": exporter_name(row.node),
            "op_type": row.op_type,
            "in_channels": row.in_channels[1],
            "out_channels": row.out_channels[1],
            "original_in_channels": row.in_channels[0],
            "original_out_channels": row.out_channels[0],
            **({"groups": row.groups[1], "original_groups": row.groups[0]} if row.groups != (1, 1) else {}),
        })
    return {
        "format": "onnxprune-architecture/1",
        "method": report.method,
        "macs": {"original": report.totals.macs[0], "pruned": report.totals.macs[1]},
        "layers": layers,
    }
