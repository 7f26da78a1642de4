"""onnxprune: channel pruning of trained CNNs on the ONNX graph, with data-driven reconstruction."""

from importlib import import_module

# Names load on first use: `python -m onnxprune` imports this package before its own Ctrl-C guard
# runs, so the package itself must import nothing heavy (numpy, onnx, ONNX Runtime).
_EXPORTS = {
    "Method": "select",
    "MissingRuntimeError": "runtime",
    "PruneError": "errors",
    "PruneOptions": "options",
    "PruneResult": "options",
    "Pruner": "pipeline",
    "prune": "pipeline",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"
