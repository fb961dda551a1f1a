"""The torchgraft metadata of an exported file: written as ONNX `metadata_props` or a `.pt2`
archive's `extra/torchgraft.json`, keys prefixed `torchgraft.`, non-string values as JSON."""
from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from torchgraft.interop.export_spec import config_of

if TYPE_CHECKING:
    from torchgraft.interop.export_spec import ExportSpec

PT2_METADATA = "torchgraft.json"  # the extra file in a .pt2 archive that holds the metadata


def model_metadata(model: nn.Module, spec: ExportSpec, output_names: Sequence[str],
                   extra: Mapping[str, Any] | None = None, opset: int | None = None) -> dict[str, str]:
    """String key/values written into the file: name, family, config, I/O names and axes, what the
    spec adds (kind, spec, kv_cache), opset, and the caller's `extra` (labels, tokenizer, ...)."""
    from torchgraft import __version__

    cfg = config_of(model)
    meta: dict[str, Any] = {"name": getattr(model, "model_name", type(model).__name__),
                            "inputs": spec.input_names, "outputs": list(output_names),
                            "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in spec.dynamic_axes.items()},
                            "version": __version__}
    if cfg is not None:
        from torchgraft.config import to_dict
        from torchgraft.models.registry import family_of_config

        with contextlib.suppress(Exception):
            meta["family"] = family_of_config(cfg).name
        meta["config"] = to_dict(cfg)
    if opset is not None:
        meta["opset"] = opset
    meta.update(spec.metadata())
    for k, v in (extra or {}).items():
        if v is not None:
            meta[k] = v
    return {f"torchgraft.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The torchgraft metadata of an exported `.onnx` or `.pt2` file, JSON values decoded."""
    p = Path(path)
    if p.suffix == ".pt2":
        import zipfile

        with zipfile.ZipFile(p) as z:
            name = next((n for n in z.namelist() if n.endswith(f"extra/{PT2_METADATA}")), None)
            raw = json.loads(z.read(name)) if name else {}
    else:
        import onnx

        m = onnx.load(str(p), load_external_data=False)
        raw = {prop.key: prop.value for prop in m.metadata_props}
    out: dict[str, Any] = {}
    for k, v in raw.items():
        key = k.removeprefix("torchgraft.")
        try:
            out[key] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            out[key] = v
    return out
