"""`resolve(path) -> Artifact`: the one answer to "what is this path?".

Every command that takes a model path (generate, eval, predict, export, convert, finetune.source,
transfer / init_from, inspect, rl eval, serve) resolves it here first. `resolve` only inspects files
(names, small JSON files); it loads no weights and imports no torch, so it can sit this low
(`checkpoint/`) and be used by tools, interop, rl, recipes and the CLI alike. Loading the model an
artifact describes is `torchgraft.interop.artifacts.load_model` (one loader per kind).

Kinds, tried in this order:

| kind           | what marks it                                               | weights                |
|----------------|-------------------------------------------------------------|------------------------|
| `onnx`, `pt2`  | a `.onnx` / `.pt2` file (an exported model)                 | the file               |
| `safetensors`  | a `.safetensors` file (bare weights, no meta)               | the file               |
| `run`          | `checkpoints/` (or `step_*` folders) inside                 | its newest step folder |
| `merged`       | `meta.json` with `"merged": true` (`finetune --merge`)      | the folder             |
| `checkpoint`   | `meta.json` / `manifest.json` (a trainer step folder; also  | the folder             |
|                | a manifest-less `step_*` folder of weights, older layouts)  |                        |
| `peft-adapter` | `adapter_config.json` (PEFT layout, torchgraft's or PEFT's) | the folder             |
| `hf`           | `config.json` (a Hugging Face model directory)              | `model.safetensors*`   |

A path that is none of these, or a kind that lacks what a command needs, is a `CheckpointError`
naming what the path is and what it lacks (`Artifact.missing`, `Artifact.require_weights`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torchgraft.errors import CheckpointError
from torchgraft.io import STEP_DIR_RE

ArtifactKind = Literal["run", "checkpoint", "merged", "hf", "peft-adapter", "onnx", "pt2", "safetensors"]

KIND_NAMES: dict[str, str] = {
    "run": "a run directory",
    "checkpoint": "a checkpoint folder",
    "merged": "a merged fine-tune folder",
    "hf": "a Hugging Face model directory",
    "peft-adapter": "a PEFT adapter directory",
    "onnx": "an ONNX file (an exported model)",
    "pt2": "a torch.export program (.pt2, an exported model)",
    "safetensors": "a bare safetensors weights file",
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
EXPORTED_HINT = ("run it with onnxruntime / torch.export.load (torchgraft.onnx_generate for decoders), or "
                 "give the run directory or checkpoint it was exported from")


@dataclass
class Artifact:
    """What a path holds. `weights` is the file or folder the model's tensors come from (for a run:
    its newest step folder, unverified; the loader verifies and falls back); `meta` is that
    checkpoint's meta.json, an HF directory's config.json or an adapter's adapter_config.json."""
    path: Path
    kind: ArtifactKind
    weights: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None
    tokenizer: Path | None = None            # the folder holding tokenizer.json
    labels_file: Path | None = None          # a classification run's labels.json
    labels: list[Any] | None = None          # class names from meta / config.json / the run's data section
    task: str | None = None                  # the training task (lm, classification, ppo, ...), when known
    adapters: dict[str, Any] | None = None   # adapter spec (meta.json's, a legacy finetune.json's, PEFT's)
    base: Path | None = None                 # a PEFT adapter's local base model, when it names one

    @property
    def what(self) -> str:
        """'runs/x is a run directory' (the start of every message about this path)."""
        return f"{self.path} is {KIND_NAMES[self.kind]}"

    @property
    def exported(self) -> bool:
        return self.kind in ("onnx", "pt2")

    @property
    def is_checkpoint(self) -> bool:
        """A torchgraft checkpoint: a run directory, a checkpoint folder or a merged folder."""
        return self.kind in ("run", "checkpoint", "merged")

    @property
    def model_section(self) -> dict[str, Any]:
        """meta.json's `model` entry (family, name, config, adapters) of a torchgraft checkpoint."""
        m = self.meta.get("model") if self.is_checkpoint else None
        return m if isinstance(m, dict) else {}

    @property
    def run_config(self) -> dict[str, Any] | None:
        """The run's config: meta.json's `run_config`, else the run directory's config.yaml."""
        rc = self.meta.get("run_config")
        if isinstance(rc, dict):
            return rc
        if self.run_dir is not None and (self.run_dir / "config.yaml").is_file():
            from torchgraft.config import load_yaml

            return load_yaml(self.run_dir / "config.yaml")
        return None

    def missing(self, need: str, fix: str) -> CheckpointError:
        """The one-line error for a command that cannot use this kind: what it is, what it lacks, the fix."""
        return CheckpointError(f"{self.what} without {need}; {fix}")

    def require_checkpoint(self, command: str) -> None:
        """Raise unless this is a torchgraft checkpoint (run, checkpoint or merged folder)."""
        if self.is_checkpoint:
            return
        raise CheckpointError(f"{self.what}; {command} needs a torchgraft run directory or checkpoint folder"
                              + (f" ({EXPORTED_HINT})" if self.exported else ""))


def resolve(path: str | Path) -> Artifact:
    """Inspect `path` and say what it is (see the module docstring); a CheckpointError if nothing."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p} does not exist (give a run directory, a checkpoint "
                              "folder, a Hugging Face model directory or a PEFT adapter directory)")
    if p.is_file():
        return _resolve_file(p)
    if (p / "checkpoints").is_dir() or _step_dirs(p):
        return _run(p)
    if (p / "meta.json").is_file() or (p / "manifest.json").is_file() \
            or (STEP_DIR_RE.match(p.name) and (p / "model.safetensors").is_file()):
        return _checkpoint(p)
    if (p / "adapter_config.json").is_file():
        return _adapter(p)
    if (p / "config.json").is_file():
        return _hf(p)
    if (p / "config.yaml").is_file():
        return Artifact(p, "run", run_dir=p, meta={})
    raise CheckpointError(f"{p} holds no checkpoint: it is neither a run directory nor a checkpoint folder, "
                          "Hugging Face or PEFT adapter directory (none of checkpoints/, meta.json, config.json, "
                          "adapter_config.json inside)")


def _resolve_file(p: Path) -> Artifact:
    suffix = p.suffix.lower()
    if suffix == ".onnx":
        return Artifact(p, "onnx", weights=p)
    if suffix == ".pt2":
        return Artifact(p, "pt2", weights=p)
    if suffix == ".safetensors":
        return Artifact(p, "safetensors", weights=p, tokenizer=_tokenizer_dir([p.parent]))
    if suffix in PICKLE_SUFFIXES:
        raise CheckpointError(f"{p} is a pickle file; torchgraft never unpickles weights (convert it to "
                              ".safetensors first)")
    raise CheckpointError(f"{p} is a {suffix or 'suffix-less'} file, not a model: give a run directory, a "
                          "checkpoint folder, a Hugging Face model directory or a .safetensors file")


def _step_dirs(root: Path) -> list[Path]:
    found = [(int(m.group(1)), d) for d in root.iterdir() if (m := STEP_DIR_RE.match(d.name)) and d.is_dir()]
    return [d for _, d in sorted(found)]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable ({str(e).splitlines()[0]})") from None
    return value if isinstance(value, dict) else {}


def _tokenizer_dir(dirs: list[Path | None]) -> Path | None:
    """The first of `dirs` (or its `tokenizer/` subfolder) holding a tokenizer.json."""
    for d in dirs:
        if d is None:
            continue
        for cand in (d, d / "tokenizer"):
            if (cand / "tokenizer.json").is_file():
                return cand
    return None


def _run(p: Path) -> Artifact:
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    run_dir = root.parent if root.name == "checkpoints" else p
    steps = _step_dirs(root)
    newest = steps[-1] if steps else None
    meta = _read_json(newest / "meta.json") if newest is not None else {}
    return _with_run_info(Artifact(p, "run", weights=newest, meta=meta, run_dir=run_dir))


def _checkpoint(p: Path) -> Artifact:
    meta = _read_json(p / "meta.json")
    run_dir = checkpoint_run_dir(p)
    kind: ArtifactKind = "merged" if meta.get("merged") else "checkpoint"
    return _with_run_info(Artifact(p, kind, weights=p, meta=meta, run_dir=run_dir))


def _with_run_info(a: Artifact) -> Artifact:
    """Tokenizer, labels, task and adapter spec of a torchgraft checkpoint (and its run)."""
    a.tokenizer = _tokenizer_dir([a.weights, a.path, a.run_dir])
    if a.run_dir is not None and (a.run_dir / "labels.json").is_file():
        a.labels_file = a.run_dir / "labels.json"
    run_cfg = a.run_config or {}
    data = run_cfg.get("data") if isinstance(run_cfg.get("data"), dict) else {}
    labels = a.meta.get("labels") or data.get("labels")
    a.labels = list(labels) if isinstance(labels, (list, tuple)) else None
    task = a.meta.get("task") or run_cfg.get("task")
    a.task = task.get("name") if isinstance(task, dict) else task
    a.adapters = adapter_spec_of(a.meta, a.run_dir)
    return a


def adapter_spec_of(meta: dict[str, Any], run_dir: Path | None) -> dict[str, Any] | None:
    """The adapter spec of a checkpoint: meta.json's `model.adapters` (what the trainer writes for a
    LoRA/DoRA model), else, for runs written before that, the `finetune` entry of meta.json, the run's
    `finetune.json` or its `adapter/adapter_config.json` (groups without layer names: the tensors say
    which layers, and their rank)."""
    model = meta.get("model")
    spec = model.get("adapters") if isinstance(model, dict) else None
    if isinstance(spec, dict):
        return spec
    legacy = meta.get("finetune")
    if not isinstance(legacy, dict) and run_dir is not None:
        legacy = _read_json(run_dir / "finetune.json").get("finetune_config")
        if not isinstance(legacy, dict) and (run_dir / "adapter" / "adapter_config.json").is_file():
            return spec_of_peft_config(_read_json(run_dir / "adapter" / "adapter_config.json"))
    if not isinstance(legacy, dict) or legacy.get("method") not in ("lora", "dora", "qlora"):
        return None
    lora = legacy.get("lora") or {}
    group = {"layers": None, "rank": int(lora.get("rank", 8)), "alpha": float(lora.get("alpha", 16.0)),
             "dora": legacy["method"] == "dora", "use_rslora": bool(lora.get("use_rslora", False))}
    if legacy["method"] == "qlora":
        group["quantize"] = legacy.get("quantize") or "nf4"
    return {"groups": [group]}


def checkpoint_run_dir(ck_dir: Path) -> Path | None:
    """The run directory a checkpoint folder belongs to (`<run>/checkpoints/step_X`, or a folder such as
    `merged/` next to the run's config.yaml), else None."""
    ck_dir = Path(ck_dir)
    if ck_dir.parent.name == "checkpoints":
        return ck_dir.parent.parent
    return ck_dir.parent if (ck_dir.parent / "config.yaml").is_file() else None


def spec_of_peft_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """An adapter spec (`{"groups": [...]}`, as `torchgraft.peft.adapter_spec` writes) from a PEFT
    `adapter_config.json`."""
    return {"groups": [{"layers": None, "rank": int(cfg.get("r", 8)), "alpha": float(cfg.get("lora_alpha", 16.0)),
                        "dora": bool(cfg.get("use_dora")), "use_rslora": bool(cfg.get("use_rslora"))}]}


def _adapter(p: Path) -> Artifact:
    cfg = _read_json(p / "adapter_config.json")
    base_name = cfg.get("base_model_name_or_path")
    base = Path(base_name).expanduser() if base_name else None
    run_dir = p.parent if (p.parent / "config.yaml").is_file() else None  # a fine-tune run's adapter/
    if base is not None and not base.exists():  # a hub id or a path on another machine
        base = None
    return Artifact(p, "peft-adapter", weights=p, meta=cfg, run_dir=run_dir,
                    tokenizer=_tokenizer_dir([p, run_dir, base]), adapters=spec_of_peft_config(cfg), base=base)


def _hf(p: Path) -> Artifact:
    cfg = _read_json(p / "config.json")
    id2label = cfg.get("id2label")
    labels = [str(id2label[k]) for k in sorted(id2label, key=int)] \
        if isinstance(id2label, dict) and id2label and all(str(k).isdigit() for k in id2label) else None
    weights = p if any((p / f).is_file() for f in HF_WEIGHTS) else None
    return Artifact(p, "hf", weights=weights, meta=cfg, tokenizer=_tokenizer_dir([p]), labels=labels,
                    task="hf")


def require_weights(a: Artifact) -> Path:
    """The weights location of `a`, or the error naming what `a` is and what it lacks."""
    if a.weights is not None:
        return a.weights
    if a.kind == "run":
        raise a.missing("checkpoints", "train it (or resume it) until it saves one, or give another run")
    if a.kind == "hf":
        pickled = (a.path / "pytorch_model.bin").is_file()
        raise a.missing("model.safetensors", "torchgraft never unpickles pytorch_model.bin; save it with "
                        "safe_serialization=True" if pickled else "save the model's weights next to config.json")
    raise a.missing("weights", "give a folder that holds the model's weights")


def read_artifact_checkpoint(a: Artifact) -> Any:
    """The `LoadedCheckpoint` of a torchgraft checkpoint `Artifact` (run, checkpoint or merged folder):
    the newest one whose manifest verifies (`checkpoint.files.load_latest`, with its fallback), or, for
    a layout written before manifests (older `finetune --merge` outputs, step folders of weights, where
    no checkpoint in the same place has a manifest), its model.safetensors read as it is. Other kinds: the error naming what the path is."""
    from torchgraft.checkpoint.files import LoadedCheckpoint, list_checkpoints, load_latest
    from torchgraft.io import STEP_DIR_RE

    a.require_checkpoint("this command")
    weights = require_weights(a)
    steps = list_checkpoints(weights.parent) if STEP_DIR_RE.match(weights.name) else [weights]
    if any((d / "manifest.json").is_file() for d in steps):  # a bad or missing one falls back, warned
        return load_latest(a.path if a.kind == "run" else weights)
    if not (weights / "model.safetensors").is_file():
        raise a.missing("model.safetensors", "give a complete checkpoint folder")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights / "model.safetensors"))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {weights / 'model.safetensors'}: {str(e).splitlines()[0]} "
                              "(is it a complete safetensors file?)") from None
    return LoadedCheckpoint(weights, state, a.meta, None, None, None)
