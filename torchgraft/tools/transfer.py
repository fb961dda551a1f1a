"""Move weights from a source (model, state dict, safetensors file, checkpoint dir) into any nn.Module.

The generalisation of `model.conv1.weight.data.copy_(pretrained.conv1.weight.data)`:

    report = torchgraft.transfer(pretrained, model, exclude=["fc2.*"])
    print(report)                      # a table: what happened to every tensor
    report.to_dict(), report.summary()

Source names pass through `rules` (in order, each rewriting the result of the previous one), then
are matched against destination names. Tensors with equal shapes are copied; different shapes go
to the shape policy chosen for that destination name (see `torchgraft.tools.adapt`). Nothing is
ever unpickled: files are read with safetensors only.
"""
from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from torchgraft.errors import CheckpointError, TransferError
from torchgraft.models.parts import parts_of
from torchgraft.tools.adapt import POLICIES, PolicyFn, PolicyMismatch, auto_policy, declared_auto_policy
from torchgraft.tools.console import recording_console

Source = Union[nn.Module, Mapping[str, torch.Tensor], str, Path]
Rules = Union[Mapping[str, "str | None"], Iterable["tuple[str, str | None]"], Callable[[str], "str | None"], None]
Policy = Union[str, PolicyFn]

# statuses, in table order; the first three are successes, `excluded`/`reset` are deliberate
STATUSES = ("copied", "adapted", "reset", "excluded", "mismatched", "missing", "unexpected")
_PROBLEMS = ("mismatched", "missing", "unexpected")


@dataclass
class TensorRecord:
    """What happened to one tensor. `name` is the destination name (source name for `unexpected`)."""
    name: str
    status: str
    src_name: str | None = None
    src_shape: tuple[int, ...] | None = None
    dst_shape: tuple[int, ...] | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "src_name": self.src_name,
                "src_shape": list(self.src_shape) if self.src_shape is not None else None,
                "dst_shape": list(self.dst_shape) if self.dst_shape is not None else None,
                "note": self.note}


@dataclass
class TransferReport:
    """Every tensor of the transfer with its status; prints as a table."""
    records: list[TensorRecord] = field(default_factory=list)
    source: str = ""

    def names(self, status: str) -> list[str]:
        return [r.name for r in self.records if r.status == status]

    @property
    def copied(self) -> list[str]:
        return self.names("copied")

    @property
    def adapted(self) -> list[str]:
        return self.names("adapted")

    @property
    def mismatched(self) -> list[str]:
        return self.names("mismatched")

    @property
    def missing(self) -> list[str]:
        return self.names("missing")

    @property
    def unexpected(self) -> list[str]:
        return self.names("unexpected")

    @property
    def excluded(self) -> list[str]:
        return self.names("excluded")

    @property
    def reset(self) -> list[str]:
        return self.names("reset")

    @property
    def ok(self) -> bool:
        """True when nothing was mismatched, missing or unexpected."""
        return not any(r.status in _PROBLEMS for r in self.records)

    def summary(self) -> dict[str, int]:
        """Counts per status, e.g. {'copied': 6, 'adapted': 0, ..., 'unexpected': 0}."""
        counts = {s: 0 for s in STATUSES}
        for r in self.records:
            counts[r.status] += 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: summary counts, name lists per status and every record."""
        out: dict[str, Any] = {"source": self.source, "summary": self.summary()}
        for s in STATUSES:
            out[s] = self.names(s)
        out["tensors"] = [r.to_dict() for r in self.records]
        return out

    def table(self, title: str | None = None) -> Any:
        """A `rich.table.Table` with one row per tensor."""
        from rich.table import Table

        counts = ", ".join(f"{n} {s}" for s, n in self.summary().items() if n)
        t = Table(title=title or f"transfer{' from ' + self.source if self.source else ''}: {counts or 'nothing'}")
        for col in ("tensor", "status", "source", "src shape", "dst shape", "note"):
            t.add_column(col, overflow="fold")
        style = {"copied": "green", "adapted": "cyan", "reset": "yellow", "excluded": "dim",
                 "mismatched": "red", "missing": "red", "unexpected": "magenta"}
        order = {s: i for i, s in enumerate(STATUSES)}
        for r in sorted(self.records, key=lambda r: order[r.status]):
            t.add_row(r.name, f"[{style[r.status]}]{r.status}[/]",
                      r.src_name if r.src_name not in (None, r.name) else "",
                      _fmt_shape(r.src_shape), _fmt_shape(r.dst_shape), r.note)
        return t

    def __str__(self) -> str:
        console = recording_console(140)
        console.print(self.table())
        return console.export_text().rstrip()

    def __rich__(self) -> Any:
        return self.table()


@dataclass(frozen=True)
class NameAliases:
    """How a module wrapper renames state-dict entries, registered by the package that wraps
    (peft registers LoRA's), so transfer matches plain source names without knowing any wrapper.

    `plain(dst_name)`: the unwrapped name, or None when `dst_name` is not a wrapped tensor.
    `is_added(dst_name)`: True for tensors the wrapper added (they keep their init, status "reset").
    """
    plain: Callable[[str], str | None]
    is_added: Callable[[str], bool]
    note: str = "added by a wrapper: kept its init"


_ALIASES: list[NameAliases] = []


def register_name_aliases(aliases: NameAliases) -> None:
    """Teach `transfer` a wrapper's state-dict names (idempotent)."""
    if aliases not in _ALIASES:
        _ALIASES.append(aliases)


def plain_name(dst_name: str) -> str | None:
    """`dst_name` without any registered wrapper's renaming, or None when no wrapper renamed it."""
    for a in _ALIASES:
        plain = a.plain(dst_name)
        if plain is not None:
            return plain
    return None


def adapter_note(dst_name: str) -> str | None:
    """The note for a tensor a registered wrapper added, or None."""
    return next((a.note for a in _ALIASES if a.is_added(dst_name)), None)


def _fmt_shape(s: tuple[int, ...] | None) -> str:
    return "" if s is None else "(" + ", ".join(map(str, s)) + ")"


# ---------------------------------------------------------------------------------------------
# loading sources


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__} "
                              "(is it a complete safetensors file?)") from None


def _hf_state(p: Path) -> dict[str, torch.Tensor]:
    """The tensors of a Hugging Face directory under its own names (single file or sharded index)."""
    if (p / "model.safetensors").is_file():
        return _load_safetensors(p / "model.safetensors")
    index = p / "model.safetensors.index.json"
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"cannot read {index}: {e}") from None
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(_load_safetensors(p / shard))
    return state


def load_state(src: Source) -> tuple[dict[str, torch.Tensor], str]:
    """Read a source into a flat {name: tensor} dict plus a short description of where it came from.

    Accepts an nn.Module, a mapping of tensors, or a path that `checkpoint.artifact.resolve` names:
    a `.safetensors` file, a run directory (its newest good checkpoint), a checkpoint or merged
    folder, or a Hugging Face directory (sharded index included). Pickle files are refused.
    """
    if isinstance(src, nn.Module):
        return dict(src.state_dict()), type(src).__name__
    if isinstance(src, Mapping):
        bad = [k for k, v in src.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise TransferError(f"source state dict entry {bad[0]!r} is a {type(src[bad[0]]).__name__}, "
                                "not a tensor (pass a flat {name: tensor} mapping)")
        return dict(src), "state dict"
    if not isinstance(src, (str, Path)):
        raise TransferError(f"cannot transfer from a {type(src).__name__}: pass an nn.Module, a state dict, "
                            "a .safetensors file or a checkpoint directory")
    from torchgraft.checkpoint.artifact import read_artifact_checkpoint, require_weights, resolve

    a = resolve(src)  # what the path is: one rule for every command (checkpoint/artifact.py)
    if a.kind == "safetensors":
        return _load_safetensors(a.path), str(a.path)
    if a.kind == "hf":
        return _hf_state(require_weights(a)), str(a.path)
    if not a.is_checkpoint:
        raise CheckpointError(f"{a.what}; transfer needs full weights: give a run directory, checkpoint "
                              "folder, Hugging Face directory or .safetensors file (a PEFT adapter: load it "
                              "on its base with torchgraft.load_model first)")
    ck = read_artifact_checkpoint(a)  # newest good checkpoint, manifest verified (LoRA runs: as saved)
    return ck.model_state, str(ck.path)


# ---------------------------------------------------------------------------------------------
# name rules and patterns


def _glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Glob -> regex where each `*` / `?` becomes a capture group (used by rules)."""
    parts = []
    for ch in pattern:
        if ch == "*":
            parts.append("(.*)")
        elif ch == "?":
            parts.append("(.)")
        else:
            parts.append(re.escape(ch))
    return re.compile("".join(parts))


def _compile_rules(rules: Rules) -> Callable[[str], str | None]:
    """Rules -> a function mapping a source name to a destination name (None = drop).

    Rules are (pattern, replacement) pairs applied in order, each to the result of the previous:
    - glob: `"bert.*" -> "*"`; every `*` in the replacement takes the next captured `*`;
    - regex: `"re:^bert\\.(.*)$" -> r"\\1"` (`re.fullmatch` + `Match.expand`);
    - a replacement of None drops matching tensors; a callable rule is used as is.
    """
    if rules is None:
        return lambda name: name
    if callable(rules) and not isinstance(rules, Mapping):
        return rules  # type: ignore[return-value]
    pairs = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    compiled: list[tuple[re.Pattern[str], str | None, bool]] = []
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)):
            raise TransferError(f"bad transfer rule {pair!r}: use {{'pattern': 'replacement'}} or "
                                "[('pattern', 'replacement'), ...]")
        pat, rep = pair
        if pat.startswith("re:"):
            try:
                compiled.append((re.compile(pat[3:]), rep, True))
            except re.error as e:
                raise TransferError(f"bad regex in transfer rule {pat!r}: {e}") from None
        else:
            compiled.append((_glob_to_regex(pat), rep, False))

    def apply(name: str) -> str | None:
        for rx, rep, is_regex in compiled:
            m = rx.fullmatch(name)
            if not m:
                continue
            if rep is None:
                return None
            if is_regex:
                name = m.expand(rep)
            else:
                groups = iter(m.groups())
                name = "".join(next(groups, "") if ch in "*?" else ch for ch in rep)
        return name
    return apply


def matches(name: str, patterns: Iterable[str]) -> str | None:
    """The first glob pattern matching `name` itself or a module prefix of it (`fc2` matches `fc2.weight`)."""
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return p
        elif fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*"):
            return p
    return None


def _resolve_policy(policy: Policy) -> PolicyFn:
    if callable(policy):
        return policy
    if policy not in POLICIES:
        from torchgraft.errors import did_you_mean

        raise TransferError(f"unknown shape policy {policy!r}" + did_you_mean(str(policy), POLICIES)
                            + f"; known: {', '.join(POLICIES)}")
    return POLICIES[policy]


# ---------------------------------------------------------------------------------------------
# transfer


@torch.no_grad()
def _policy_fns(dst: nn.Module, policies: Mapping[str, Policy] | None, default_policy: Policy
                ) -> tuple[dict[str, PolicyFn], PolicyFn]:
    """Resolve the policies; `auto` follows `dst`'s declared parts (name heuristics only when it
    declares nothing)."""
    fns = {pat: _resolve_policy(p) for pat, p in dict(policies or {}).items()}
    default_fn = _resolve_policy(default_policy)
    parts = parts_of(dst)
    if parts is None:
        return fns, default_fn
    declared = declared_auto_policy(parts)
    return ({pat: declared if fn is auto_policy else fn for pat, fn in fns.items()},
            declared if default_fn is auto_policy else default_fn)


def transfer(
    src: Source,
    dst: nn.Module,
    *,
    rules: Rules = None,
    exclude: Iterable[str] | None = None,
    policies: Mapping[str, Policy] | None = None,
    default_policy: Policy = "skip",
    strict: bool = False,
) -> TransferReport:
    """Copy every source tensor into `dst` where (mapped) names and shapes match; return a report.

    - `rules`: rename source tensors, e.g. `{"bert.*": "*"}` strips an HF prefix (see `_compile_rules`).
    - `exclude`: destination (or source) name globs left untouched, e.g. `["fc2.*"]` keeps the head.
    - `policies`: `{dst-name glob: policy}` for tensors whose shapes differ (first match wins), else
      `default_policy` (`"skip"`: report as mismatched). Names: skip, reset, slice, conv, conv_sum,
      conv_mean, conv_repeat, pos_interp, pos_1d, pos_2d, vocab, auto; or a callable
      `(src, dst, name) -> (tensor | None, note)`.
    - `strict=True`: raise TransferError if any tensor is mismatched, missing or unexpected
      (before anything is written to `dst`).
    """
    if not isinstance(dst, nn.Module):
        raise TransferError(f"transfer destination must be an nn.Module, got {type(dst).__name__}")
    state, where = load_state(src)
    rename = _compile_rules(rules)
    exclude = [exclude] if isinstance(exclude, str) else list(exclude or [])
    pol_fns, default_fn = _policy_fns(dst, policies, default_policy)

    dst_state = dst.state_dict()  # detached tensors sharing storage with dst's parameters/buffers
    report = TransferReport(source=where)
    mapped: dict[str, str] = {}  # dst name -> src name
    # a wrapped destination (e.g. LoRA keeps the original layer as `base_layer`): plain names still match
    wrapped = {plain: d for d in dst_state if (plain := plain_name(d)) is not None}
    for s_name in state:
        d_name = rename(s_name)
        if d_name is not None and d_name not in dst_state and d_name in wrapped:
            d_name = wrapped[d_name]
        if d_name is None:
            report.records.append(TensorRecord(s_name, "excluded", s_name, tuple(state[s_name].shape),
                                               None, "dropped by a rule"))
            continue
        if d_name in mapped:
            raise TransferError(f"source tensors {mapped[d_name]!r} and {s_name!r} both map to {d_name!r}; "
                                "fix the transfer rules")
        if d_name not in dst_state:
            if matches(s_name, exclude) or matches(d_name, exclude):
                report.records.append(TensorRecord(d_name, "excluded", s_name, tuple(state[s_name].shape), None,
                                                   "excluded"))
            else:
                report.records.append(TensorRecord(d_name, "unexpected", s_name, tuple(state[s_name].shape), None,
                                                   "not in destination"))
            continue
        mapped[d_name] = s_name

    writes: list[tuple[torch.Tensor, torch.Tensor]] = []
    for d_name, d_t in dst_state.items():
        d_shape = tuple(d_t.shape)
        if d_name not in mapped:
            if matches(d_name, exclude):
                status, note = "excluded", "excluded"
            elif (note := adapter_note(d_name)) is not None:
                status = "reset"
            else:
                status, note = "missing", "not in source"
            report.records.append(TensorRecord(d_name, status, None, None, d_shape, note))
            continue
        s_name = mapped[d_name]
        s_t = state[s_name]
        rec = TensorRecord(d_name, "copied", s_name, tuple(s_t.shape), d_shape)
        report.records.append(rec)
        if matches(d_name, exclude) or matches(s_name, exclude):
            rec.status, rec.note = "excluded", "excluded"
            continue
        if s_t.shape == d_t.shape:
            writes.append((d_t, s_t))
            if s_t.dtype != d_t.dtype:
                rec.note = f"cast {str(s_t.dtype).removeprefix('torch.')} -> {str(d_t.dtype).removeprefix('torch.')}"
            continue
        pat = matches(d_name, pol_fns)
        fn = pol_fns[pat] if pat is not None else default_fn
        try:
            new, how = fn(s_t, d_t, d_name)
        except PolicyMismatch as e:
            rec.status, rec.note = "mismatched", f"skipped: {e}"
            continue
        if new is None:
            rec.status, rec.note = "reset", how
            continue
        if tuple(new.shape) != d_shape:
            raise TransferError(f"shape policy for {d_name!r} returned shape {tuple(new.shape)}, "
                                f"expected {d_shape}")
        rec.status, rec.note = "adapted", how
        writes.append((d_t, new))

    _resolve_ties(dst, report)
    if strict and not report.ok:
        raise TransferError(_strict_message(report))
    for d_t, value in writes:
        if d_t.is_meta:
            raise TransferError("destination has tensors on the meta device; materialize it first "
                                "(torchgraft.materialize(model))")
        d_t.copy_(value.to(device=d_t.device, dtype=d_t.dtype))
    return report


def _resolve_ties(dst: nn.Module, report: TransferReport) -> None:
    """A 'missing' tensor that shares storage with a filled one (tied weights) was filled too."""
    by_name = {r.name: r for r in report.records}
    ptr_to_filled: dict[tuple[int, tuple[int, ...]], str] = {}
    all_named = list(dst.named_parameters(remove_duplicate=False)) + list(dst.named_buffers(remove_duplicate=False))
    for name, t in all_named:
        r = by_name.get(name)
        if r is not None and r.status in ("copied", "adapted") and not t.is_meta:
            ptr_to_filled[(t.data_ptr(), tuple(t.shape))] = name
    for name, t in all_named:
        r = by_name.get(name)
        if r is not None and r.status == "missing" and not t.is_meta:
            other = ptr_to_filled.get((t.data_ptr(), tuple(t.shape)))
            if other is not None:
                src_rec = by_name[other]
                r.status, r.src_name, r.src_shape = src_rec.status, src_rec.src_name, src_rec.src_shape
                r.note = f"tied to {other}"


def _strict_message(report: TransferReport) -> str:
    parts = []
    for status in _PROBLEMS:
        recs = [r for r in report.records if r.status == status]
        if not recs:
            continue
        shown = []
        for r in recs[:3]:
            if status == "mismatched":
                shown.append(f"{r.name} {_fmt_shape(r.src_shape)} vs {_fmt_shape(r.dst_shape)}")
            else:
                shown.append(r.name)
        more = f" and {len(recs) - 3} more" if len(recs) > 3 else ""
        parts.append(f"{len(recs)} {status} ({', '.join(shown)}{more})")
    return ("strict transfer failed: " + "; ".join(parts)
            + "; map names with rules=, skip tensors with exclude= or choose a shape policy")
