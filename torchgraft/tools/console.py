"""The one text-rendering console of tools/: reports' `__str__` print rich tables into it."""
from __future__ import annotations

from typing import Any


class NullWriter:
    """A file that discards everything (a recording console needs a file but should not print)."""

    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


def recording_console(width: int = 120) -> Any:
    """A `rich.console.Console` that records what is printed (read it back with `export_text()`)
    and writes nothing to the terminal."""
    from rich.console import Console

    return Console(width=width, record=True, file=NullWriter(), force_terminal=False)
