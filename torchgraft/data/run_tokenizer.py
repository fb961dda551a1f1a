"""A run's tokenizer rebuilt from its `data:` section, for runs saved before the trainer wrote
tokenizer.json (where a saved one lies is `checkpoint.artifact.resolve`'s `Artifact.tokenizer`).
Here (in data/) because both `interop.convert` and `recipes.lm` need it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torchgraft.data.tokenizers import Tokenizer


def run_data_section(run_dir: Path | None, meta: dict[str, Any]) -> dict[str, Any] | None:
    """The `data:` section of the run config, from meta.json or the run's config.yaml."""
    for key in ("run_config", "config", "run"):
        section = meta.get(key)
        if isinstance(section, dict) and isinstance(section.get("data"), dict):
            return section["data"]
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        from torchgraft.config import load_yaml

        data = load_yaml(run_dir / "config.yaml").get("data")
        if isinstance(data, dict):
            return data
    return None


def tokenizer_from_data(data: dict[str, Any] | None) -> Tokenizer | None:
    if not data or data.get("name") != "text":
        return None
    from torchgraft.data.text import resolve_tokenizer

    tok, _ = resolve_tokenizer(str(data.get("tokenizer", "char")), str(data.get("source", "builtin")),
                               str(data.get("field", "text")), int(data.get("vocab_size", 4096)),
                               data.get("cache_dir"))
    return tok
