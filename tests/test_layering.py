"""No import cycles among torchgraft modules, deferred (function-level) imports included.

Every module is parsed with `ast`; every `import x` / `from x import y` anywhere in it (module level,
inside functions, under `if TYPE_CHECKING`) is an edge to a torchgraft module (`from pkg import name`
counts as an edge to `pkg.name` when that is a module, else to `pkg`). A package's `__init__` is a
node of its own. The graph must be acyclic, so layering cannot quietly come back.
"""
from __future__ import annotations

import ast
from pathlib import Path

import torchgraft

ROOT = Path(torchgraft.__file__).parent


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src for a in node.names]
            for t in targets:
                if t.split(".")[0] != "torchgraft":
                    continue
                r = _resolve(t, mods)
                if r and r != mod:
                    graph[mod].add(r)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_deferred_imports():
    g = import_graph()
    # build_model_for imports the model registry inside the function
    assert "torchgraft.models.registry" in g["torchgraft.train.trainer"]
    assert "torchgraft.train.tasks.causal_lm" in g["torchgraft.train.tasks"]  # `from pkg import module`
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_train_never_imports_distributed():
    g = import_graph()
    bad = sorted(f"{m} -> {t}" for m, ts in g.items() if m.startswith("torchgraft.train")
                 for t in ts if t.startswith("torchgraft.distributed"))
    assert not bad, "\n".join(bad)


def test_tools_interop_and_rl_read_checkpoints_below_train():
    """Checkpoint reading lives in torchgraft.checkpoint: tools/, interop/ and rl/ never import the
    trainer's checkpoint or resume modules (or the engine that used to read checkpoints) for it."""
    g = import_graph()
    readers = ("torchgraft.train.checkpoint", "torchgraft.train.resume", "torchgraft.train.engine")
    bad = sorted(f"{m} -> {t}" for m, ts in g.items()
                 if m.startswith(("torchgraft.tools", "torchgraft.interop", "torchgraft.rl"))
                 for t in ts if t.startswith(readers))
    assert not bad, "\n".join(bad)
    assert any(t.startswith("torchgraft.checkpoint") for t in g["torchgraft.rl.runs"])


def test_one_checkpoint_writer_and_one_verified_reader():
    """Only torchgraft/checkpoint/ (and io.py, which defines it) touches the one folder writer and the
    one manifest-verified reader; everything else goes through the manager or load_latest."""
    users = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
                   if ("write_checkpoint_dir" in p.read_text() or "read_verified" in p.read_text())
                   and p.parent.name != "checkpoint" and p.name != "io.py")
    assert users == [], users
