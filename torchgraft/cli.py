"""The `torchgraft` command line (typer).

Each command is a thin wrapper over the library; user errors (`TorchgraftError`) are printed as
one line on stderr with exit code 2, never as a traceback.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    name="torchgraft",
    help="Build models from PyTorch modules, train them from scratch, fine-tune them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """torchgraft: build, inspect, train and fine-tune PyTorch models."""


def _echo_err(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)


@app.command("models")
def models_cmd() -> None:
    """List registered model presets."""
    from torchgraft.models.registry import get_preset, list_models

    for name in list_models():
        p = get_preset(name)
        typer.echo(f"{name:24s} {p.family:10s} {p.description}")


# --- commands added by later issues go below (keep each a thin wrapper) ---


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point: run the app, turning user errors into one clean line."""
    from typer._click import exceptions as click_exc

    from torchgraft.errors import TorchgraftError

    try:
        app(args=argv, standalone_mode=False)
    except TorchgraftError as e:
        _echo_err(str(e))
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except click_exc.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except typer.Abort:
        _echo_err("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        _echo_err("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
