"""The training loop: config in, run directory out.

Separate small pieces so other features plug in without touching the loop:
`build_model_for` (model from config + data), `wrap_model` (compile; DDP/FSDP later), `make_sampler`
(stateful, rank-aware), `MetricsLogger` (rank-0 logging), `Trainer.save_checkpoint` /
`Trainer.restore` (checkpoint I/O), `Trainer.global_count` (target count across ranks).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from torchgraft.config import to_dict
from torchgraft.data.loader import StatefulLoader, StatefulSampler, iter_eval_batches
from torchgraft.data.registry import DataBundle, build_data
from torchgraft.errors import CheckpointError, ConfigError, TorchgraftError
from torchgraft.train.callbacks import Callback, CallbackList
from torchgraft.train.checkpoint import (CheckpointManager, capture_rng, list_checkpoints, load_latest,
                                         load_optimizer_state, restore_rng)
from torchgraft.train.config import RunConfig, load_run_config
from torchgraft.train.logging import MetricsLogger, ProgressBar
from torchgraft.train.mfu import count_flops, device_peak_flops
from torchgraft.train.optim import ParamGroupsFn, build_optimizer
from torchgraft.train.precision import autocast, make_grad_scaler
from torchgraft.train.schedule import LRSchedule

IGNORE_INDEX = -100


class NonFiniteError(TorchgraftError):
    """Too many consecutive steps with a NaN/Inf loss or gradient."""


# ------------------------------------------------------------------------------------ helpers

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name!r} but CUDA is not available; use device=cpu or auto")
    return dev


def build_model_for(section: dict[str, Any], info: dict[str, Any], device: str | None = None) -> nn.Module:
    """Build the model of a run config; the data fills `num_classes` / `vocab_size` unless set.
    `device="meta"` allocates nothing (a sharded run materialises after sharding)."""
    from torchgraft.models.registry import build, resolve_config

    spec = dict(section)
    _, mcfg = resolve_config(spec)
    fields = {f.name for f in dataclasses.fields(mcfg)}
    for key in ("num_classes", "vocab_size"):
        if key in info and key in fields:
            have = getattr(mcfg, key)
            if key not in spec:
                spec[key] = info[key]
            elif (key == "num_classes" and have != info[key]) or (key == "vocab_size" and have < info[key]):
                raise ConfigError(f"model.{key}={have} does not fit the data ({info[key]}); "
                                  f"remove model.{key} to take it from the data")
    return build(spec, device=device)


def wrap_model(model: nn.Module, cfg: RunConfig, device: torch.device) -> nn.Module:
    """The module the loop calls: `torch.compile` when asked (DDP/FSDP wrapping goes here too)."""
    if cfg.trainer.compile:
        return torch.compile(model)
    return model


def make_sampler(dataset: Any, cfg: RunConfig) -> StatefulSampler:
    """The training sampler (a distributed run passes rank / world_size)."""
    return StatefulSampler(len(dataset), cfg.trainer.batch_size, shuffle=True, seed=cfg.trainer.seed)


def model_meta(model: nn.Module) -> dict[str, Any]:
    """Name, family and config of a model for meta.json (family None for unregistered modules)."""
    mcfg = getattr(model, "config", None)
    family = None
    if dataclasses.is_dataclass(mcfg):
        from torchgraft.models.registry import family_of_config

        try:
            family = family_of_config(mcfg).name
        except TorchgraftError:
            family = None
    return {"name": getattr(model, "model_name", type(model).__name__), "family": family,
            "config": to_dict(mcfg) if dataclasses.is_dataclass(mcfg) else None}


def save_run_tokenizer(run_dir: Path, info: dict[str, Any]) -> Path | None:
    """Write the data's tokenizer (`DataBundle.info["tokenizer"]`) as `run_dir/tokenizer/` (tokenizer.json
    + tokenizer_config.json), which `generate`, `eval` and `convert` use. None if there is none."""
    tok = info.get("tokenizer")
    if tok is None or not hasattr(tok, "save"):
        return None
    return tok.save(run_dir / "tokenizer")


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def flat_logits_and_labels(model: nn.Module, batch: dict[str, torch.Tensor], task: str
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the model on a batch; return float32 logits (N, K) and labels (N,) over every target."""
    if task == "lm":
        logits = _logits(model(batch["input_ids"], attention_mask=batch.get("attention_mask")))  # (B, T, V)
    else:
        logits = _logits(model(batch["inputs"]))  # (B, K)
    return logits.reshape(-1, logits.shape[-1]).float(), batch["labels"].reshape(-1)


def loss_sum_and_count(model: nn.Module, batch: dict[str, torch.Tensor], task: str
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of per-target cross-entropy, number of targets, number correct) for one (micro-)batch."""
    logits, labels = flat_logits_and_labels(model, batch, task)
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    valid = labels != IGNORE_INDEX
    correct = ((logits.argmax(-1) == labels) & valid).sum()
    return loss, valid.sum(), correct


def step_loss(model: nn.Module, batch: dict[str, torch.Tensor], task: str,
              total: torch.Tensor | None) -> torch.Tensor:
    """Training loss of one micro-batch: summed cross-entropy / `total` targets of the whole step
    (so accumulated micro-batches give exactly the full batch's gradient), or the plain mean over
    this batch's targets when `total` is None (a single micro-batch)."""
    logits, labels = flat_logits_and_labels(model, batch, task)
    if total is None:
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum") / total


def split_batch(batch: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    if n == 1:
        return [batch]
    parts = {k: v.chunk(n) for k, v in batch.items()}
    return [{k: parts[k][i] for k in batch} for i in range(n)]


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ------------------------------------------------------------------------------------ state / result

@dataclass
class TrainState:
    step: int = 0
    best_value: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    consecutive_bad: int = 0
    skipped_steps: int = 0
    samples_seen: int = 0
    targets_seen: int = 0
    last_eval: dict[str, float] = field(default_factory=dict)
    should_stop: bool = False
    stop_reason: str = ""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    metrics: dict[str, float]          # last evaluation
    best: dict[str, Any]               # {"metric", "value", "step"}
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    stop_reason: str
    model: nn.Module
    elapsed_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "step": self.step, "metrics": self.metrics,
                "best": self.best, "last_checkpoint": str(self.last_checkpoint or ""),
                "best_checkpoint": str(self.best_checkpoint or ""), "stop_reason": self.stop_reason,
                "elapsed_s": self.elapsed_s}


# ------------------------------------------------------------------------------------ trainer

class Trainer:
    is_main = True  # this process logs and writes run files (rank 0 in a distributed run)

    def __init__(self, cfg: RunConfig | dict | str | Path, out_dir: str | Path, *,
                 model: nn.Module | None = None, data: DataBundle | None = None,
                 callbacks: Sequence[Callback] = (), param_groups_fn: ParamGroupsFn | None = None):
        self.cfg = cfg if isinstance(cfg, RunConfig) else load_run_config(cfg)
        t = self.cfg.trainer
        self.run_dir = Path(out_dir)
        self.device = resolve_device(t.device)
        seed_everything(t.seed)
        self.data = data if data is not None else build_data(self.cfg.data, t.seed)
        self.task = self.data.task
        self.model, self.train_model = self.setup_model(model)
        self.check_inputs()
        self.optimizer = build_optimizer(self.model, self.cfg.optim, param_groups_fn)
        self.schedule = LRSchedule(self.cfg.schedule, t.max_steps)
        self.scaler = make_grad_scaler(t.precision, self.device)
        self.loader = StatefulLoader(self.data.train, self.make_sampler(self.data.train),
                                     self.data.collate_fn)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", keep_last=t.keep_last)
        self.callbacks = CallbackList(callbacks)
        self.state = TrainState()
        self.best_mode = t.best_mode if t.best_mode != "auto" else ("max" if "acc" in t.best_metric else "min")
        self.flops_per_step: int | None = None
        self.peak_flops = device_peak_flops(self.device, t.precision)
        self.logger: MetricsLogger | None = None
        self.scaler_skip = False  # the last step was skipped by the fp16 GradScaler

    def load_initial_weights(self, path: str) -> None:
        """`trainer.init_from`: load weights (manifest verified) into the model before training."""
        from torchgraft.train.checkpoint import load_checkpoint

        state, _ = load_checkpoint(path)
        try:
            self.model.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"trainer.init_from={path}: weights do not fit the model "
                                  f"({str(e).splitlines()[0]}); use torchgraft.transfer for partial loads") from None

    def check_inputs(self) -> None:
        """Before any work: the data fits the model's declared sizes, and one example goes through it."""
        from torchgraft.train.validate import check_model_against_data

        check_model_against_data(getattr(self.model, "config", None), self.data.info)

    # ---- pieces a distributed run overrides (torchgraft.distributed.trainer.DistributedTrainer)
    def setup_model(self, model: nn.Module | None) -> tuple[nn.Module, nn.Module]:
        """(the model, the module the loop calls): build, load init_from, move, wrap."""
        self.model = model if model is not None else build_model_for(self.cfg.model, self.data.info)
        if self.cfg.trainer.init_from:
            self.load_initial_weights(self.cfg.trainer.init_from)
        self.model.to(self.device)
        self.model.train()
        return self.model, wrap_model(self.model, self.cfg, self.device)

    def make_sampler(self, dataset: Any) -> StatefulSampler:
        return make_sampler(dataset, self.cfg)

    def micro_batch_context(self, last: bool) -> Any:
        """Context around one micro-batch's forward/backward (DDP: no gradient sync unless `last`)."""
        return contextlib.nullcontext()

    def reduce_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The step's loss as logged (averaged over ranks when distributed)."""
        return loss

    def global_count(self, count: torch.Tensor) -> torch.Tensor:
        """Number of targets in the whole optimizer step (all micro-batches; all ranks when distributed)."""
        return count

    def make_logger(self, resume_step: int | None) -> MetricsLogger:
        return MetricsLogger(self.run_dir, tensorboard=self.cfg.trainer.tensorboard, resume_step=resume_step)

    # ---- one optimizer step
    def train_step(self, batch: dict[str, torch.Tensor]) -> tuple[float, float, bool]:
        """Forward/backward over the micro-batches, guard, clip, update. Returns (loss, grad norm, ok)."""
        t = self.cfg.trainer
        micro_batches = split_batch(batch, t.grad_accum_steps)
        if len(micro_batches) == 1 and type(self).global_count is Trainer.global_count:
            total = None  # one micro-batch in one process: the plain mean over its targets
        else:
            total = self.global_count((batch["labels"] != IGNORE_INDEX).sum()).clamp(min=1)
        loss_acc = None
        for i, mb in enumerate(micro_batches):
            with self.micro_batch_context(last=i == len(micro_batches) - 1):
                with autocast(t.precision, self.device):
                    loss = step_loss(self.train_model, mb, self.task, total)
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            loss_acc = loss.detach() if loss_acc is None else loss_acc + loss.detach()
        loss_acc = self.reduce_loss(loss_acc)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if t.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip, foreach=True)
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros(())
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        loss_val, norm_val = loss_acc.item(), norm.item()
        ok = math.isfinite(loss_val) and math.isfinite(norm_val)
        # fp16: overflowing gradients with a finite loss are the GradScaler's normal calibration
        # (it skips the update and lowers the scale), not a diverging run
        self.scaler_skip = not ok and self.scaler is not None and math.isfinite(loss_val)
        if ok:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_val, norm_val, ok

    # ---- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.data.val is None or len(self.data.val) == 0:
            return {}
        t = self.cfg.trainer
        self.model.eval()
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.long, device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        for batch in iter_eval_batches(self.data.val, t.eval_batch_size, self.data.collate_fn,
                                       t.eval_max_batches):
            with autocast(t.precision, self.device):
                ls, c, k = loss_sum_and_count(self.train_model, _to_device(batch, self.device), self.task)
            loss += ls.double()
            count += c
            correct += k
        self.model.train()
        n = max(1, int(count))
        metrics = {"val_loss": float(loss) / n, "val_accuracy": int(correct) / n}
        if self.task == "lm":
            metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50.0))
        return metrics

    def _after_eval(self, metrics: dict[str, float]) -> bool:
        """Update best / early stopping; True when this evaluation is a new best."""
        t, s = self.cfg.trainer, self.state
        s.last_eval = metrics
        if t.best_metric not in metrics:
            raise ConfigError(f"trainer.best_metric={t.best_metric!r} is not an evaluation metric "
                              f"(have: {', '.join(metrics)})")
        value = metrics[t.best_metric]
        sign = 1.0 if self.best_mode == "max" else -1.0
        improved = s.best_value is None or sign * (value - s.best_value) > t.early_stopping_min_delta
        if improved:
            s.best_value, s.best_step, s.evals_without_improvement = value, s.step, 0
        else:
            s.evals_without_improvement += 1
            if t.early_stopping_patience and s.evals_without_improvement >= t.early_stopping_patience:
                s.should_stop = True
                s.stop_reason = (f"early stopping: {t.best_metric} did not improve for "
                                 f"{s.evals_without_improvement} evaluations")
        self.callbacks.on_eval_end(self, metrics)
        return improved

    # ---- checkpoints
    def save_checkpoint(self, best: bool = False) -> Path:
        s = self.state
        rng_json, rng_tensors = capture_rng()
        trainer_state = {"state": dataclasses.asdict(s), "loader": self.loader.state_dict(),
                         "rng": rng_json,
                         "scaler": self.scaler.state_dict() if self.scaler is not None else None}
        meta = {"model": model_meta(self.model), "step": s.step, "metrics": s.last_eval,
                "run_config": self.cfg.to_dict(), "task": self.task}
        from torchgraft import __version__
        meta["torchgraft_version"] = __version__
        path = self.ckpt.save(s.step, model_state=self.model.state_dict(), meta=meta,
                              optimizer_state=self.optimizer.state_dict(),
                              trainer_state=trainer_state, rng_tensors=rng_tensors)
        if best:
            self.ckpt.mark_best(s.step, self.cfg.trainer.best_metric, s.best_value)
        self.ckpt.prune()
        self.callbacks.on_checkpoint(self, path)
        return path

    def restore(self) -> bool:
        """Load the newest good checkpoint of the run directory; False when there is none."""
        root = self.run_dir / "checkpoints"
        self.ckpt.clean_temp()
        if not list_checkpoints(root):
            return False
        ck = load_latest(root)
        if ck.optimizer_state is None or ck.trainer_state is None or ck.rng_tensors is None:
            raise CheckpointError(f"{ck.path} holds weights only; it cannot resume a run")
        from torchgraft.train.resume import apply_hyperparameters, check_resumable, fresh_hyperparameters

        applied = check_resumable(ck.meta.get("run_config"), self.cfg.to_dict(), ck.path)
        try:
            self.model.load_state_dict(ck.model_state)
        except RuntimeError as e:
            raise CheckpointError(f"cannot resume from {ck.path}: its weights do not fit this model "
                                  f"({str(e).splitlines()[0]}); resume with the run's own config") from None
        fresh = fresh_hyperparameters(self.optimizer)
        load_optimizer_state(self.optimizer, ck.optimizer_state)
        groups = apply_hyperparameters(self.optimizer, fresh)  # the current config's lr, betas, ...
        self.resume_changes = applied + [f"param groups: {c}" for c in groups]
        ts = ck.trainer_state
        self.loader.load_state_dict(ts["loader"])
        if self.scaler is not None and ts.get("scaler"):
            self.scaler.load_state_dict(ts["scaler"])
        self.state = TrainState(**ts["state"])
        self.state.should_stop, self.state.stop_reason = False, ""
        restore_rng(ts["rng"], ck.rng_tensors)
        return True

    # ---- the loop
    def _measure_flops(self) -> None:
        """FLOPs of one optimizer step (fwd + bwd), counted on a side batch in eval mode."""
        t = self.cfg.trainer
        micro = t.batch_size // t.grad_accum_steps
        batch = _to_device(next(iter_eval_batches(self.data.train, micro, self.data.collate_fn)), self.device)

        def fwd_bwd() -> None:
            with autocast(t.precision, self.device):
                loss, _, _ = loss_sum_and_count(self.model, batch, self.task)
            loss.backward()

        was_training = self.model.training
        self.model.eval()
        try:
            self.flops_per_step = count_flops(fwd_bwd) * t.grad_accum_steps
        finally:
            self.model.train(was_training)
            self.optimizer.zero_grad(set_to_none=True)
            for p in self.model.parameters():
                p.grad = None

    def fit(self, resume: bool = False) -> TrainResult:
        """Train (or resume) into the run directory, holding its lock (torchgraft.train.lock)."""
        from torchgraft.train.lock import RunLock, check_run_dir

        check_run_dir(self.run_dir)
        if not self.is_main:
            return self._fit(resume)
        with RunLock(self.run_dir):
            return self._fit(resume)

    def _fit(self, resume: bool = False) -> TrainResult:
        t, s = self.cfg.trainer, self.state
        self.run_dir.mkdir(parents=True, exist_ok=True)
        from torchgraft.train.validate import inputs_must_fit

        if t.measure_flops:
            with inputs_must_fit(self.model, {}):
                self._measure_flops()
        if not resume and list_checkpoints(self.ckpt.root):
            raise ConfigError(f"{self.run_dir} already holds checkpoints of a run; pass --resume "
                              f"(resume=True) to continue it, or choose another output directory")
        resumed = self.restore() if resume else False
        s = self.state
        if self.is_main:
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
            save_run_tokenizer(self.run_dir, self.data.info)
        self.logger = self.make_logger(s.step if resumed else None)
        unit = "tokens" if self.task == "lm" else "samples"
        bar = ProgressBar(t.max_steps, s.step, enabled=t.progress and self.is_main, unit=unit)
        if resumed:
            changes = getattr(self, "resume_changes", [])
            bar.print(f"resumed from step {s.step}" + (f"; applied: {', '.join(changes)}" if changes else ""))
        elif resume and self.is_main:
            warnings.warn(f"no checkpoint in {self.ckpt.root} to resume from: starting a new run", stacklevel=2)
        self.callbacks.on_train_start(self)
        start = time.perf_counter()
        last_t, last_step, last_targets, last_samples = start, s.step, s.targets_seen, s.samples_seen
        last_saved = s.step if resumed else -1
        last_eval_step = -1
        first_step, loss = s.step, float("nan")
        try:
            while s.step < t.max_steps and not s.should_stop:
                batch = _to_device(next(self.loader), self.device)
                lr = self.schedule.apply(self.optimizer, s.step)
                if s.step == first_step:  # the first forward: a shape mismatch is the config's fault
                    with inputs_must_fit(self.model, batch):
                        loss, gnorm, ok = self.train_step(batch)
                else:
                    loss, gnorm, ok = self.train_step(batch)
                s.step += 1
                s.samples_seen += len(batch["labels"])
                s.targets_seen += int((batch["labels"] != IGNORE_INDEX).sum()) if unit == "tokens" else 0
                if ok:
                    s.consecutive_bad = 0
                else:
                    s.skipped_steps += 1
                    s.consecutive_bad += 0 if self.scaler_skip else 1
                    if s.consecutive_bad >= t.max_bad_steps:
                        self._stop_non_finite(loss, gnorm)
                final = s.step >= t.max_steps
                do_eval = (t.eval_every and s.step % t.eval_every == 0) or final
                do_log = do_eval or (t.log_every and s.step % t.log_every == 0)
                record: dict[str, Any] = {}
                if do_log:
                    now = time.perf_counter()
                    dt = max(now - last_t, 1e-9)
                    record = {"step": s.step, "loss": loss, "lr": lr, "grad_norm": gnorm,
                              "epoch": self.loader.epoch, "samples_per_s": (s.samples_seen - last_samples) / dt,
                              "skipped_steps": s.skipped_steps, "elapsed_s": now - start}
                    if unit == "tokens":
                        record["tokens_per_s"] = (s.targets_seen - last_targets) / dt
                    if self.flops_per_step:
                        record["flops_per_s"] = self.flops_per_step * (s.step - last_step) / dt
                        if self.peak_flops:
                            record["mfu"] = record["flops_per_s"] / self.peak_flops
                    last_t, last_step, last_targets, last_samples = now, s.step, s.targets_seen, s.samples_seen
                improved = False
                if do_eval:
                    metrics = self.evaluate()
                    last_eval_step = s.step
                    if metrics:
                        record.update(metrics)
                        improved = self._after_eval(metrics)
                if record:
                    self.logger.log(record)
                    bar.update(s.step, record)
                    if do_eval and "val_loss" in record:
                        bar.print(f"step {s.step}: " + "  ".join(
                            f"{k} {record[k]:.4f}" for k in ("loss", "val_loss", "val_accuracy") if k in record))
                self.callbacks.on_step_end(self, record or {"step": s.step, "loss": loss, "lr": lr})
                save_best = improved and t.save_best and t.eval_every > 0
                due = (t.checkpoint_every and s.step % t.checkpoint_every == 0) or final or s.should_stop
                if (due or save_best) and s.consecutive_bad == 0:  # never checkpoint inside a bad streak
                    self.save_checkpoint(best=improved)
                    last_saved = s.step
            ran = s.step > first_step
            if ran and last_eval_step != s.step:  # stopped early by a callback
                metrics = self.evaluate()
                if metrics:
                    self._after_eval(metrics)
                    self.logger.log({"step": s.step, "loss": loss, **metrics})
            if ran and last_saved != s.step and s.consecutive_bad == 0:
                self.save_checkpoint(best=s.best_step == s.step)
        finally:
            bar.close()
            self.logger.close()
        ckpts = list_checkpoints(self.ckpt.root)
        best_name = self.ckpt.best_name()
        result = TrainResult(
            run_dir=self.run_dir, step=s.step, metrics=dict(s.last_eval),
            best={"metric": t.best_metric, "value": s.best_value, "step": s.best_step},
            last_checkpoint=ckpts[-1] if ckpts else None,
            best_checkpoint=(self.ckpt.root / best_name) if best_name else None,
            stop_reason=s.stop_reason or ("max_steps" if s.step >= t.max_steps else ""),
            model=self.model, elapsed_s=time.perf_counter() - start)
        if self.is_main:
            (self.run_dir / "result.json").write_text(json.dumps(result.to_dict(), indent=1))
        self.callbacks.on_train_end(self, result)
        return result

    def _stop_non_finite(self, loss: float, gnorm: float) -> None:
        s = self.state
        ckpts = list_checkpoints(self.ckpt.root)
        kept = f"last good checkpoint: {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
        self.logger.log({"step": s.step, "loss": loss, "grad_norm": gnorm, "skipped_steps": s.skipped_steps})
        raise NonFiniteError(
            f"stopped at step {s.step}: {s.consecutive_bad} consecutive steps had a non-finite loss or "
            f"gradient (loss={loss}, grad_norm={gnorm}); {kept}. Lower optim.lr, set trainer.grad_clip, "
            f"or use precision=bf16 instead of fp16")


def run_training(cfg: RunConfig | dict | str | Path, out_dir: str | Path, *, model: nn.Module | None = None,
                 data: DataBundle | None = None, resume: bool = False, callbacks: Sequence[Callback] = (),
                 param_groups_fn: ParamGroupsFn | None = None) -> TrainResult:
    """Train `cfg` (RunConfig, mapping or YAML path) into `out_dir`.

    `model` replaces the one named by cfg.model (only its requires_grad parameters are optimized);
    `data` replaces cfg.data; `param_groups_fn(model)` supplies custom optimizer groups;
    `resume=True` continues from the newest good checkpoint in `out_dir` (or starts if there is none).
    """
    cfg = cfg if isinstance(cfg, RunConfig) else load_run_config(cfg)
    trainer_cls = Trainer
    from torchgraft.distributed.trainer import DistributedTrainer, wants_distributed

    if wants_distributed(cfg, out_dir, resume):  # a strategy set, torchrun, or a distributed run's checkpoint
        trainer_cls = DistributedTrainer
    trainer = trainer_cls(cfg, out_dir, model=model, data=data, callbacks=callbacks,
                          param_groups_fn=param_groups_fn)
    return trainer.fit(resume=resume)
