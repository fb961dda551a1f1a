"""Fine-tune recipe: pretrained source -> transfer -> method (full | freeze | lora | dora) -> trainer.

    torchgraft finetune configs/finetune-lenet.yaml finetune.method=freeze --out runs/ft

The YAML is a training config (model, data, optim, schedule, trainer) plus a `finetune` section
(see `FinetuneConfig`). Outputs in the run directory, besides the trainer's: `transfer.json` (what
happened to every tensor), `finetune.json` (method, trainable parameters, final metrics),
`adapter/` (PEFT-layout adapter, LoRA/DoRA) and, with `--merge`, `merged/model.safetensors`
(adapters folded in, original parameter names) + `merged/meta.json`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from torchgraft.config import apply_overrides, from_dict, load_yaml, parse_overrides, to_dict
from torchgraft.errors import CheckpointError, ConfigError
from torchgraft.train.config import RunConfig, load_run_config

if TYPE_CHECKING:  # the config half of this module is read before torch is imported (config errors: instant)
    from torch import nn


@dataclass
class LoraSection:
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False


@dataclass
class FinetuneConfig:
    source: str | None = None             # checkpoint folder, run dir, .safetensors or HF-layout dir
    rules: dict[str, str | None] = field(default_factory=dict)    # {"bert.*": "*"}
    exclude: list[str] = field(default_factory=list)             # ["fc2.*"]: keep the new head
    policies: dict[str, str] = field(default_factory=dict)        # {"fc2.*": "reset"}
    default_policy: str = "skip"
    strict: bool = False
    method: Literal["full", "freeze", "lora", "dora", "qlora"] = "full"
    quantize: Literal["nf4", "int8"] = "nf4"                      # qlora: format of the frozen base
    freeze: list[str] = field(default_factory=list)               # frozen patterns (method freeze only)
    unfreeze_at: dict[int, list[str]] = field(default_factory=dict)  # gradual unfreezing {step: patterns}
    lora: LoraSection = field(default_factory=LoraSection)
    train_also: list[str] = field(default_factory=list)           # lora/dora: also train these (e.g. head)
    layer_decay: float | None = None
    lr_mult: dict[str, float] = field(default_factory=dict)
    merge: bool = False                                           # write merged weights at the end
    tokenizer: Literal["source", "data"] = "source"  # source: reuse the source's tokenizer when it has one


ADAPTER_METHODS = ("lora", "dora", "qlora")  # methods that train adapters (saved in adapter/)


def split_config(source: str | Path | dict[str, Any], overrides: list[str] | dict[str, Any] | None = None
                 ) -> tuple[FinetuneConfig, dict[str, Any]]:
    """(finetune section, the rest as a run-config tree), with dotted overrides applied to both."""
    tree = load_yaml(source) if not isinstance(source, dict) else dict(source)
    if overrides:
        tree = apply_overrides(tree, parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    if "finetune" not in tree or not isinstance(tree["finetune"], dict):
        raise ConfigError("fine-tune config needs a `finetune:` section with at least `source:` "
                          "(see docs/finetuning.md)")
    ft = from_dict(FinetuneConfig, tree.pop("finetune"), prefix="finetune")
    if not ft.source:
        raise ConfigError("finetune.source is required: a checkpoint folder, run dir, .safetensors file "
                          "or Hugging Face model directory")
    return ft, tree


@dataclass
class FinetuneRun:
    """A parsed fine-tune config: the `finetune:` section and the checked run config of the rest."""

    finetune: FinetuneConfig
    run: RunConfig


def load_finetune_config(source: str | Path | dict[str, Any],
                         overrides: list[str] | dict[str, Any] | None = None) -> FinetuneRun:
    """The one parse of a fine-tune config (YAML path or mapping, plus dotted overrides), no torch import."""
    ft, tree = split_config(source, overrides)
    return FinetuneRun(ft, load_run_config(tree))


def load_source(path: str) -> Any:
    """What `transfer` reads for `finetune.source` (`checkpoint.artifact.resolve` says what it is): a
    torchgraft checkpoint or safetensors file as its path (transfer reads the tensors, manifest
    verified), a Hugging Face directory or a PEFT adapter on its base as the loaded model
    (`torchgraft.load_model`: our names, the adapter merged)."""
    from torchgraft.checkpoint.artifact import resolve

    a = resolve(path)
    if a.kind in ("hf", "peft-adapter"):
        from torchgraft.interop.artifacts import load_model

        return load_model(a)
    if a.exported:
        raise CheckpointError(f"finetune.source: {a.what}; fine-tune from the run or checkpoint it was "
                              "exported from")
    return path


def apply_method(model: nn.Module, ft: FinetuneConfig) -> dict[str, Any]:
    """Freeze / inject adapters as the method asks; returns a short description."""
    from torchgraft.tools.freeze import freeze, trainable_summary, unfreeze

    info: dict[str, Any] = {"method": ft.method}
    if ft.method == "freeze":
        if not ft.freeze and not ft.unfreeze_at:
            raise ConfigError("method=freeze needs finetune.freeze patterns (e.g. ['conv1', 'conv2']) "
                              "or a finetune.unfreeze_at schedule")
        info["frozen"] = len(freeze(model, ft.freeze or None))
    elif ft.method in ADAPTER_METHODS:
        from torchgraft.peft import apply_lora

        layers = apply_lora(model, ft.lora.targets, rank=ft.lora.rank, alpha=ft.lora.alpha,
                            dropout=ft.lora.dropout, dora=ft.method == "dora", use_rslora=ft.lora.use_rslora,
                            quantize_base=ft.quantize if ft.method == "qlora" else None)
        info["adapted_layers"] = sorted(layers)
        if ft.method == "qlora":
            info["base_format"] = ft.quantize
    if ft.train_also:
        unfreeze(model, ft.train_also)
    info.update(trainable_summary(model))
    return info


def run_finetune(config: str | Path | dict[str, Any] | FinetuneRun, out_dir: str | Path, overrides: list[str] | None = None,
                 merge: bool | None = None, data: Any = None, model: nn.Module | None = None,
                 resume: bool = False) -> dict[str, Any]:
    """Run the whole recipe; returns the summary also written to `out_dir/finetune.json`.
    `data` (a DataBundle) replaces the config's `data:` section and `model` (any nn.Module, e.g. one
    that is not in the registry) the `model:` section, for use from Python. `resume=True` continues
    an interrupted fine-tune in `out_dir` from its newest good checkpoint (exactly, as `train --resume`)."""
    from torchgraft.data.registry import build_data
    from torchgraft.tools.freeze import GradualUnfreeze
    from torchgraft.tools.param_groups import param_groups
    from torchgraft.tools.transfer import transfer
    from torchgraft.recipes.training import run_training
    from torchgraft.train.trainer import build_model_for, model_meta, seed_everything

    if isinstance(config, FinetuneRun) and overrides:
        raise ConfigError("overrides apply while parsing: pass them to load_finetune_config")
    parsed = config if isinstance(config, FinetuneRun) else load_finetune_config(config, overrides)
    ft, cfg = parsed.finetune, parsed.run
    out = Path(out_dir)
    seed_everything(cfg.trainer.seed)
    if data is None:
        data = build_data(cfg.data, cfg.trainer.seed)
        reuse = source_tokenizer(ft.source) if ft.tokenizer == "source" else None
        own = data.info.get("tokenizer")
        if reuse is not None and own is not None and "tokenizer" in cfg.data \
                and reuse[1].fingerprint() != own.fingerprint():
            import warnings

            warnings.warn(f"finetune: using the source's tokenizer {reuse[0]} instead of "
                          f"data.tokenizer={cfg.data['tokenizer']!r}, so token ids keep their meaning "
                          "(set finetune.tokenizer=data to build the data's own)", stacklevel=2)
            cfg = dataclasses.replace(cfg, data={**cfg.data, "tokenizer": str(reuse[0])})
            data = build_data(cfg.data, cfg.trainer.seed)
    model = model if model is not None else build_model_for(cfg.model, data.info)

    report = transfer(load_source(ft.source), model, rules=ft.rules or None, exclude=ft.exclude,
                      policies=ft.policies, default_policy=ft.default_policy, strict=ft.strict)
    if not report.copied and not report.adapted:
        raise ConfigError(f"nothing was transferred from {ft.source}: no tensor names match the target model "
                          "(map them with finetune.rules)")
    info = apply_method(model, ft)

    callbacks = []
    if ft.unfreeze_at:
        callbacks.append(GradualUnfreeze(ft.unfreeze_at))
    groups_fn = None
    if ft.layer_decay is not None or ft.lr_mult:
        def groups_fn(m: nn.Module) -> list[dict[str, Any]]:
            return param_groups(m, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                layer_decay=ft.layer_decay, lr_mult=ft.lr_mult or None)

    out.mkdir(parents=True, exist_ok=True)
    (out / "transfer.json").write_text(json.dumps(report.to_dict(), indent=1))
    # the run's status while it trains (checkpoints describe their adapters in meta.json themselves)
    (out / "finetune.json").write_text(json.dumps({"method": ft.method, "finetune_config": to_dict(ft),
                                                   "status": "training"}, indent=1, default=str))
    result = run_training(cfg, out, model=model, data=data, callbacks=callbacks, param_groups_fn=groups_fn,
                          resume=resume)
    model = result.model  # the trained model (unsharded when it was trained with FSDP)

    summary: dict[str, Any] = {"source": report.source, "transfer": report.summary(), **info,
                               "metrics": result.metrics, "best": result.best, "steps": result.step,
                               "finetune_config": to_dict(ft)}
    from torchgraft.distributed.env import is_main_process

    if not is_main_process():  # a distributed run: rank 0 writes the outputs
        return summary
    if ft.method in ADAPTER_METHODS:
        from torchgraft.peft import save_adapter

        summary["adapter"] = str(save_adapter(model, out / "adapter"))
    if merge if merge is not None else ft.merge:
        summary["merged"] = str(write_merged(model, out / "merged", model_meta,
                                             run_config=cfg.to_dict(), step=result.step, tokenizer_dir=out))
    (out / "finetune.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def write_merged(model: nn.Module, path: Path, meta_fn, *, run_config: dict[str, Any] | None = None,
                 step: int | None = None, tokenizer_dir: Path | None = None) -> Path:
    """Fold adapters into the base weights and write a weights-only checkpoint folder with the original
    names (manifest-verified, like the trainer's), plus the run's tokenizer, so `eval`, `generate`,
    `convert`, `export` and `load_model` take `merged/` directly."""
    import shutil

    from torchgraft.peft import lora_layers, unload
    from torchgraft.checkpoint.files import write_checkpoint
    from torchgraft.quant.converters import dequantize_model

    dequantize_model(model)  # a QLoRA base: back to float (its compute dtype) before the merge
    if lora_layers(model):
        unload(model, merge=True)
    meta: dict[str, Any] = {"model": meta_fn(model), "merged": True, "step": step}
    if run_config is not None:
        meta["run_config"] = run_config
    write_checkpoint(path, model_state=model.state_dict(), meta=meta)
    tok = tokenizer_dir / "tokenizer" if tokenizer_dir is not None else None
    if tok is not None and (tok / "tokenizer.json").is_file():
        for f in tok.iterdir():
            if f.is_file():
                shutil.copyfile(f, path / f.name)
    return path


def source_tokenizer(source: str) -> tuple[Path, Any] | None:
    """(path, tokenizer) saved with a fine-tune source (`Artifact.tokenizer`), or None."""
    from torchgraft.checkpoint.artifact import resolve
    from torchgraft.data.tokenizers import load_tokenizer

    where = resolve(source).tokenizer
    if where is None:
        return None
    return where / "tokenizer.json", load_tokenizer(where / "tokenizer.json")
