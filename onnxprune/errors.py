"""Errors a user can cause. The CLI prints them on one line and exits with ``exit_code``."""

from __future__ import annotations


class PruneError(Exception):
    """Base class: a problem with the user's input or options, with a message naming the fix."""

    exit_code = 2


class ModelError(PruneError):
    """The model file cannot be read or is not something onnxprune can work on."""


class CalibrationError(PruneError):
    """The calibration data is missing, malformed or does not fit the model."""


class OptionError(PruneError):
    """A bad option value or combination of options."""


class OutputError(PruneError):
    """The output cannot be written where the user asked."""


class TargetNotMetError(PruneError):
    """The requested target (speedup, size, accuracy gate) could not be reached."""

    exit_code = 1


class NothingToPrune(PruneError):
    """The model has no layer onnxprune can prune: not a failure, nothing is written."""

    exit_code = 0
