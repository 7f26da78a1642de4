"""onnxprune: channel pruning of trained CNNs on the ONNX graph, with data-driven reconstruction."""

from .errors import PruneError
from .prune import PruneOptions, PruneResult, prune
from .select import Method

__all__ = ["Method", "PruneError", "PruneOptions", "PruneResult", "prune"]
__version__ = "0.1.0"
