"""`torchgraft convert SRC DST`: Hugging Face directory <-> torchgraft checkpoint, either way.

- HF -> torchgraft: `load_hf` (lazy, meta-device build), then a checkpoint folder in the trainer's
  format (`model.safetensors` under our state-dict names, `meta.json` with model family/name/config,
  `manifest.json`), so `torchgraft.checkpoint.files.load_model(DST)` rebuilds it.
- torchgraft -> HF: a checkpoint folder or run directory (its newest good checkpoint) -> `save_hf`.

Tokenizer files found next to the source (for a run: the checkpoint folder, the run root or
`<run>/tokenizer/`, where the trainer saves it) are copied along; a run without one gets the tokenizer
rebuilt from its config's `data:` section (`torchgraft.data.run_tokenizer.checkpoint_tokenizer`).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from torchgraft.errors import CheckpointError, ConfigError

Layout = Literal["hf", "torchgraft"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")
SPECIAL_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class ConvertResult:
    src: Path
    dst: Path
    to: str
    summary: str


def detect_layout(path: str | Path) -> Layout:
    """'hf' for a Hugging Face model directory, 'torchgraft' for a checkpoint folder or run dir."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"{p} is a file; give a Hugging Face model directory (config.json) or a "
                              "torchgraft checkpoint folder / run directory")
    if (p / "meta.json").is_file() or (p / "manifest.json").is_file() or (p / "checkpoints").is_dir() \
            or any(c.name.startswith("step_") for c in p.iterdir() if c.is_dir()):
        return "torchgraft"
    if (p / "config.json").is_file():
        return "hf"
    raise CheckpointError(f"{p} is neither a Hugging Face model directory (config.json) nor a "
                          "torchgraft checkpoint (meta.json / checkpoints/)")


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _copy_tokenizer(candidates: list[Path], dst: Path) -> list[str]:
    for d in candidates:
        found = [f for f in TOKENIZER_FILES if (d / f).is_file()]
        if found:
            for f in found:
                shutil.copyfile(d / f, dst / f)
            return found
    return []


def hf_to_torchgraft(src: str | Path, dst: str | Path, *, dtype: torch.dtype | None = None,
                     strict: bool = True) -> ConvertResult:
    from torchgraft.config import to_dict
    from torchgraft.interop.hf import load_hf_with_report, read_hf_config
    from torchgraft.checkpoint.files import write_checkpoint

    src, dst = Path(src), Path(dst)
    model, report = load_hf_with_report(src, dtype=dtype, strict=strict)
    hf_cfg = read_hf_config(src)
    meta = {"model": {"family": report.family, "name": hf_cfg.get("_name_or_path") or src.resolve().name,
                      "config": to_dict(model.config)},
            "source": {"format": "huggingface", "path": str(src), "architecture": report.architecture,
                       # kept so that converting back restores them in config.json
                       "special_tokens": {k: hf_cfg[k] for k in SPECIAL_TOKEN_FIELDS if k in hf_cfg}}}
    write_checkpoint(dst, model_state=model.state_dict(), meta=meta)
    copied = _copy_tokenizer([src], dst)
    extra = f"; tokenizer: {', '.join(copied)}" if copied else ""
    return ConvertResult(src, dst, "torchgraft", report.summary() + extra)


def _tokenizer_dirs(src: Path, ckpt: Path) -> list[Path]:
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else src
    dirs = [ckpt, src, src / "tokenizer", run, run / "tokenizer"]
    return list(dict.fromkeys(d for d in dirs if d.is_dir()))


def _build_from_checkpoint(meta: dict, state: dict[str, torch.Tensor], where: Path) -> torch.nn.Module:
    """Meta-device build from meta.json, then the checkpoint's tensors assigned (no init, no copy)."""
    from torchgraft.interop.hf import LoadReport, rebuild_meta_buffers
    from torchgraft.models.registry import build

    m = meta.get("model") or {}
    if not m.get("family"):
        raise CheckpointError(f"{where}/meta.json does not name a registered model family")
    from torchgraft.peft import unload
    from torchgraft.checkpoint.model import attach_saved_adapters, load_weights

    model = build({"family": m["family"], **m.get("config", {})}, device="meta")
    model.model_name = m.get("name", m["family"])
    adapted = attach_saved_adapters(model, state, meta, where)  # a LoRA/DoRA fine-tune's checkpoint
    load_weights(model, state, where, assign=True)
    if adapted:
        unload(model, merge=True)  # Hugging Face layout: the adapters folded into the base weights
    rebuild_meta_buffers(model, torch.device("cpu"), LoadReport("", m["family"]))
    return model.eval()


def torchgraft_to_hf(src: str | Path, dst: str | Path, *, dtype: torch.dtype | None = None,
                     max_shard_size: int | str = "5GB") -> ConvertResult:
    from torchgraft.interop.hf import hf_config_for, save_hf
    from torchgraft.checkpoint.files import load_latest

    src, dst = Path(src), Path(dst)
    loaded = load_latest(src)  # newest checkpoint whose manifest verifies
    ckpt = loaded.path
    model = _build_from_checkpoint(loaded.meta, loaded.model_state, ckpt)
    _, arch, _ = hf_config_for(model)
    special = (loaded.meta.get("source") or {}).get("special_tokens") or {}
    save_hf(model, dst, max_shard_size=max_shard_size, dtype=dtype,
            config_overrides={k: v for k, v in special.items() if k in SPECIAL_TOKEN_FIELDS})
    copied = _copy_tokenizer(_tokenizer_dirs(src, ckpt), dst)
    if not copied:  # a run saved before the trainer wrote its tokenizer: rebuild it from the config
        from torchgraft.data.run_tokenizer import checkpoint_tokenizer

        try:
            tok = checkpoint_tokenizer(ckpt, loaded.meta)
        except ConfigError:  # e.g. the run's text source is gone: convert the weights alone
            tok = None
        if tok is not None:
            tok.save(dst)
            copied = ["tokenizer.json", "tokenizer_config.json (rebuilt from the run's data section)"]
    n = sum(t.numel() for t in model.state_dict().values())
    extra = f"; tokenizer: {', '.join(copied)}" if copied else ""
    return ConvertResult(src, dst, "hf", f"{ckpt.name} ({model.model_name}) -> {arch}: "
                                         f"{n / 1e6:.2f}M values{extra}")


def convert(src: str | Path, dst: str | Path, to: Layout | None = None, *, dtype: str | None = None,
            max_shard_size: int | str = "5GB", strict: bool = True, overwrite: bool = False) -> ConvertResult:
    """Convert between layouts; `to` defaults to the layout SRC is not in.

    DST must be new or empty unless `overwrite`; the output is written to a hidden sibling folder and
    renamed into place when complete, so a failure leaves DST as it was (torchgraft.outputs)."""
    from torchgraft.outputs import check_output_dir, staged_dir

    src_layout = detect_layout(src)
    to = to or ("torchgraft" if src_layout == "hf" else "hf")
    if to not in ("hf", "torchgraft"):
        raise ConfigError(f"--to must be 'hf' or 'torchgraft', got {to!r}")
    if to == src_layout:
        raise ConfigError(f"{src} is already in the {to} layout; use --to "
                          f"{'torchgraft' if to == 'hf' else 'hf'}")
    if Path(dst).resolve() == Path(src).resolve():
        raise ConfigError("DST must differ from SRC")
    if Path(src).resolve() in Path(dst).resolve().parents:
        raise ConfigError(f"DST {dst} lies inside SRC {src}; choose a directory outside it")
    check_output_dir(dst, overwrite=overwrite, what="DST")
    tdtype = parse_dtype(dtype)
    with staged_dir(dst, overwrite=overwrite, what="DST") as tmp:
        if to == "torchgraft":
            res = hf_to_torchgraft(src, tmp, dtype=tdtype, strict=strict)
        else:
            res = torchgraft_to_hf(src, tmp, dtype=tdtype, max_shard_size=max_shard_size)
    res.dst = Path(dst)
    return res

