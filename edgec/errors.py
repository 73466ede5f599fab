"""One error hierarchy, caught at the CLI boundary (docs/design.md principle 7).

Every error carries a message that says what went wrong *and how to fix it*; the CLI prints it
without a traceback (unless ``--verbose``) and exits with ``exit_code``.
"""
from __future__ import annotations


class EdgecError(Exception):
    """Base class: a user-facing problem with a fix-it message."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")


class InputError(EdgecError):
    """Bad user input: missing/unreadable file, wrong layout, unknown name."""

    exit_code = 2


class RecipeError(InputError):
    """A recipe failed validation; ``problems`` lists every issue with its path."""

    def __init__(self, message: str, problems: list[str] | None = None, *, hint: str | None = None):
        self.problems = list(problems or [])
        full = message
        if self.problems:
            full += "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(full, hint=hint)


class ModelError(InputError):
    """Model spec / weights problems (unknown name, key mismatch, unsafe pickle)."""


class DataError(InputError):
    """Data spec problems (unknown kind, wrong folder layout)."""


class RunDirError(InputError):
    """The run directory holds another run, or is missing pieces."""


class DeviceError(InputError):
    """A target device could not be used for a measurement (``edgec bench --remote``): unreachable,
    authentication refused, unknown or changed host key, or the device lacks what the runner needs.
    The message says which, and the hint what to run or install."""


class DeviceUnreachable(DeviceError):
    """No SSH connection to the device (refused, timed out, unknown host name)."""


class DeviceAuthError(DeviceError):
    """The device refused key authentication (passwords are never tried)."""


class HostKeyError(DeviceError):
    """The device's host key is not in known_hosts, or differs from the one recorded there."""


class DeviceSetupError(DeviceError):
    """The device lacks python / numpy / onnxruntime, or its onnxruntime is too old for the model."""


class TrainingError(EdgecError):
    """Training stopped (e.g. NaN/inf loss); the last good checkpoint is kept."""

    exit_code = 3


class ExportError(EdgecError):
    """Export or its self-check failed."""

    exit_code = 4


class BudgetExceeded(EdgecError):
    """A latency budget was missed (``edgec bench --budget-ms``)."""

    exit_code = 5


class AccuracyDropped(EdgecError):
    """The exported compressed model lost more accuracy than the recipe's ``bench.max_drop`` allows, or
    fell to chance (exit 7; 6 is FidelityError). The report is written first; ``results`` holds the rows."""

    exit_code = 7


class MissingDependency(EdgecError):
    """An optional dependency is not installed; names the extra to install."""

    def __init__(self, package: str, extra: str | None = None):
        how = f"pip install 'edgec[{extra}]'" if extra else f"pip install {package}"
        super().__init__(f"this feature needs the optional package {package!r}", hint=how)


class FidelityError(EdgecError):
    """The exported artifact agrees with the FP32 input model less than the recipe's
    ``export.min_fidelity`` (top-1 agreement on real samples); the message names the worst layers."""

    exit_code = 6
