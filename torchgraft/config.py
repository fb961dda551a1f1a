"""Typed configs: dataclasses built from dicts, YAML files and dotted `key=value` overrides.

Unknown keys and wrong types are rejected with the key's dotted name and the closest valid key.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from torchgraft.errors import ConfigError, did_you_mean

T = TypeVar("T")


MAX_YAML_BYTES = 16 * 2**20   # a run config is a few KB; anything this big is not one
MAX_YAML_NODES = 100_000      # scalars + collections after expanding aliases ("billion laughs" guard)


class BoundedSafeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses documents whose alias expansion exceeds MAX_YAML_NODES nodes.

    PyYAML builds an alias as a shared reference, so loading a "billion laughs" document is cheap, but
    anything that walks the result (validation, deepcopy of overrides, writing config.yaml) expands it.
    The expanded size is counted on the composed node graph (memoised, so linear in the document).
    """

    def get_single_node(self):  # type: ignore[no-untyped-def]
        node = super().get_single_node()
        if node is not None:
            sizes: dict[int, int] = {}

            def size(n: yaml.Node) -> int:
                key = id(n)
                if key in sizes:
                    return sizes[key]
                sizes[key] = MAX_YAML_NODES + 1  # a recursive alias (x: &a [*a]) counts as unbounded
                if isinstance(n, yaml.SequenceNode):
                    total = 1 + sum(size(c) for c in n.value)
                elif isinstance(n, yaml.MappingNode):
                    total = 1 + sum(size(k) + size(v) for k, v in n.value)
                else:
                    total = 1
                sizes[key] = total = min(total, MAX_YAML_NODES + 1)
                return total

            if size(node) > MAX_YAML_NODES:
                raise ConfigError(f"YAML document expands to more than {MAX_YAML_NODES:,} values through "
                                  "aliases (&name / *name); write the values out instead")
        return node


def safe_load(text: str) -> Any:
    """`yaml.safe_load` with the alias-expansion bound of `BoundedSafeLoader`."""
    return yaml.load(text, Loader=BoundedSafeLoader)  # noqa: S506 (a SafeLoader subclass)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping. A missing, empty, binary, huge or non-mapping file gives a ConfigError."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config {p} is a directory; give a YAML file")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (check the path)")
    try:
        if p.stat().st_size > MAX_YAML_BYTES:
            raise ConfigError(f"{p} is {p.stat().st_size:,} bytes, too big for a YAML config "
                              f"(limit {MAX_YAML_BYTES:,})")
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
        if "\x00" in text:
            raise UnicodeDecodeError("utf-8", raw, text.index("\x00"), text.index("\x00") + 1, "NUL byte")
    except UnicodeDecodeError:
        raise ConfigError(f"{p} is not a text YAML file (binary or not UTF-8); give a YAML config") from None
    try:
        data = safe_load(text)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{p} is not valid YAML: {first}") from None
    except RecursionError:
        raise ConfigError(f"{p} is nested too deeply to be a config") from None
    if data is None:
        raise ConfigError(f"{p} is empty; a config needs at least a model: or data: section "
                          "(see configs/ for examples)")
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of keys to values (e.g. model: {{name: lenet}}), "
                          f"got a {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{p}: top-level keys must be names, got {bad[0]!r}")
    return data


def parse_value(text: str) -> Any:
    """Parse the value of a `key=value` override with YAML rules (3 -> int, true -> bool, [1,2] -> list)."""
    try:
        value = safe_load(text)
    except (yaml.YAMLError, RecursionError):
        return text
    return _number_or_same(value)


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _number_or_same(value: Any) -> Any:
    """YAML 1.1 reads '3e-4' as a string; treat such strings as the numbers users mean."""
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        return float(value)
    return value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ['model.n_layer=4', 'trainer.seed=1'] into {'model.n_layer': 4, 'trainer.seed': 1}."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. model.n_layer=4)")
        key, _, value = item.partition("=")
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        out[key] = parse_value(value)
    return out


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set tree['a']['b'] = value for dotted 'a.b', creating intermediate dicts."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted!r}: {part!r} holds a value, not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: dict[str, Any] | list[str]) -> dict[str, Any]:
    """Return a deep copy of `tree` with dotted overrides applied."""
    import copy

    out = copy.deepcopy(tree)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in overrides.items():
        set_dotted(out, key, value)
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting where it is lossless (int -> float)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: must be one of {list(allowed)}, got {value!r}"
                              + did_you_mean(str(value), [str(a) for a in allowed]))
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        k_tp, v_tp = get_args(tp) or (Any, Any)
        return {_coerce(k, k_tp, where): _coerce(v, v_tp, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a section (mapping), got {value!r}")
        return from_dict(tp, value, prefix=where)
    if tp is float:
        value = _number_or_same(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types with a clear message."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"unknown config key {where!r}" + did_you_mean(str(key), fields)
                              + f"; valid keys: {', '.join(fields)}")
        kwargs[key] = _coerce(value, hints[key], where)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass -> plain dict (tuples become lists) for YAML/JSON."""
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(cfg)


def replace(cfg: T, **overrides: Any) -> T:
    """`dataclasses.replace` with dotted-key support and the same validation as `from_dict`."""
    tree = to_dict(cfg)
    for key, value in overrides.items():
        set_dotted(tree, key, value)
    return from_dict(type(cfg), tree)
