"""The tokenizer of a trained run or checkpoint: the saved tokenizer.json, else rebuilt from the
run's `data:` section. Here (in data/) because both `interop.convert` and `recipes.lm` need it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torchgraft.data.tokenizers import Tokenizer, load_tokenizer


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


def find_tokenizer(*dirs: Path | None) -> Tokenizer | None:
    """The first tokenizer.json in `dirs` (or their `tokenizer/` subfolder), else None."""
    for d in dirs:
        if d is None:
            continue
        for cand in (d / "tokenizer.json", d / "tokenizer" / "tokenizer.json"):
            if cand.is_file():
                return load_tokenizer(cand)
    return None


def checkpoint_tokenizer(ck_dir: Path, meta: dict[str, Any]) -> Tokenizer | None:
    """The tokenizer of a trainer checkpoint folder: a saved tokenizer.json (the checkpoint folder, then
    its run directory's root or `tokenizer/`, where the trainer saves it), else one rebuilt from the
    run's `data:` section (runs saved before the trainer wrote it), else None."""
    run_dir = ck_dir.parent.parent if ck_dir.parent.name == "checkpoints" else None
    return find_tokenizer(ck_dir, run_dir) or tokenizer_from_data(run_data_section(run_dir, meta))
