"""Every `torchgraft ...` shell command in README.md and docs/*.md parses as written (command, options,
option values, config files that exist), and the cheap ones (inspect, models, --help) run with exit 0."""
import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from torchgraft.cli import app

ROOT = Path(__file__).resolve().parents[1]
CHEAP = ("inspect", "models")  # meta-device work only: seconds, no data, no training


def doc_commands() -> list[tuple[str, str]]:
    """(file:line, command) for each line of a ```bash / ```sh block that starts with `torchgraft `."""
    out = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        in_shell, pending = False, ""
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if line.rstrip().endswith("\\"):  # a continued shell line: join it with the next one
                pending += line.rstrip()[:-1] + " "
                continue
            line, pending = pending + line, ""
            fence = line.strip()
            if fence.startswith("```"):
                in_shell = not in_shell and fence[3:].strip() in ("bash", "sh", "shell", "console")
                continue
            if not in_shell:
                continue
            cmd = re.sub(r"\s+#.*$", "", line.strip().removeprefix("$ ")).split(" | ")[0].strip()
            if cmd.startswith("torchgraft "):
                out.append((f"{path.relative_to(ROOT)}:{i}", cmd))
    return out


COMMANDS = doc_commands()


def test_docs_have_commands():
    assert len(COMMANDS) > 20  # the extraction itself works


def _parse(args: list[str]) -> None:
    """Resolve the (sub)command and parse its options without running it (click raises on errors)."""
    group = typer.main.get_command(app)
    ctx = group.make_context("torchgraft", list(args), resilient_parsing=False)
    cmd, rest = group, _rest(ctx)
    while hasattr(cmd, "resolve_command") and rest:
        _, cmd, rest = cmd.resolve_command(ctx, rest)
        ctx = cmd.make_context(cmd.name, list(rest), parent=ctx)
        rest = _rest(ctx) if hasattr(cmd, "resolve_command") else []


def _rest(ctx) -> list[str]:
    protected = getattr(ctx, "protected_args", None)
    if protected is None:
        protected = getattr(ctx, "_protected_args", [])
    return list(protected) + list(ctx.args)


@pytest.mark.parametrize("where,cmd", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_doc_command_parses(where, cmd):
    args = shlex.split(cmd)[1:]
    _parse(args)
    for a in args:  # config files the command names exist in the repository
        if re.fullmatch(r"configs/[\w.-]+\.ya?ml", a):
            assert (ROOT / a).is_file(), f"{where}: {a} does not exist"


CHEAP_COMMANDS = [(w, c) for w, c in COMMANDS if shlex.split(c)[1] in CHEAP]


@pytest.mark.parametrize("where,cmd", CHEAP_COMMANDS, ids=[w for w, _ in CHEAP_COMMANDS])
def test_cheap_doc_command_runs(where, cmd, one_thread):
    args = shlex.split(cmd)[1:]
    if any(a.endswith((".yaml", ".yml")) and not (ROOT / a).is_file() for a in args):
        pytest.skip(f"{where} names the reader's own YAML")
    res = CliRunner().invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0, f"{where}: `{cmd}` failed: {res.output[-500:]}"


def test_every_help_runs():
    group = typer.main.get_command(app)
    names = [[n] for n in group.commands] + [["tokenizer", n] for n in group.commands["tokenizer"].commands]
    for name in [[], *names]:
        res = CliRunner().invoke(app, [*name, "--help"])
        assert res.exit_code == 0 and "Usage" in res.output, name
