"""onnxprune: channel pruning of trained CNNs on the ONNX graph, with data-driven reconstruction."""

from .errors import PruneError
from .runtime import MissingRuntimeError
from .select import Method

try:
    from .options import PruneOptions, PruneResult
    from .pipeline import Pruner, prune
except MissingRuntimeError as _missing:  # no ONNX Runtime build installed: say so on first use, in one line
    _MISSING = str(_missing)  # (the CLI in this package reports it itself)

    def __getattr__(name: str):
        if name in ("PruneOptions", "PruneResult", "Pruner", "prune"):
            raise MissingRuntimeError(_MISSING)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["Method", "MissingRuntimeError", "PruneError", "PruneOptions", "PruneResult", "Pruner", "prune"]
__version__ = "0.1.0"
