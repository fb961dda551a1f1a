"""User-facing errors: one clear line naming the problem and the fix.

The CLI catches `TorchgraftError` and prints its message without a traceback.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class TorchgraftError(Exception):
    """An error caused by user input (bad name, bad config, missing file, ...)."""


class ConfigError(TorchgraftError, ValueError):
    """A config key, value or file is wrong."""


class CheckpointError(TorchgraftError):
    """A checkpoint is missing, unreadable or corrupted."""


class TransferError(TorchgraftError):
    """Weights cannot be moved between two models as asked."""


class ExportError(TorchgraftError):
    """A model cannot be exported (torch.export / ONNX) as asked."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


def warning_line(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> str:
    """`warnings.formatwarning` for the CLI: `warning: MESSAGE`, one line, no source location."""
    return f"warning: {message}\n"
