"""onnxprune: channel pruning of trained CNNs on the ONNX graph, with data-driven reconstruction."""

from .errors import PruneError
from .options import PruneOptions, PruneResult
from .pipeline import Pruner, prune
from .select import Method

__all__ = ["Method", "PruneError", "PruneOptions", "PruneResult", "Pruner", "prune"]
__version__ = "0.1.0"
