"""The training loop: config in, run directory out. One `Trainer` for every task and every scale.

What differs between kinds of problems is the `Task` (torchgraft.train.tasks: batch keys, model call,
loss, metrics); what differs between one process and several is the engine (`LocalEngine` here,
`torchgraft.distributed.engine.DistributedEngine`); when to evaluate, checkpoint and log is decided by
the small objects of `torchgraft.train.cadence`. The loop itself knows none of these details.
"""
from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torchgraft.config import to_dict
from torchgraft.data.loader import StatefulLoader, iter_eval_batches
from torchgraft.data.registry import DataBundle, build_data
from torchgraft.errors import CheckpointError, ConfigError, TorchgraftError
from torchgraft.train.cadence import LogCadence, Throughput, TrainState, Validator, eval_line
from torchgraft.train.callbacks import Callback
from torchgraft.checkpoint.files import list_checkpoints
from torchgraft.checkpoint.manager import CheckpointManager, RNGState
from torchgraft.train.config import RunConfig, load_run_config
from torchgraft.train.engine import LocalEngine, resolve_device  # noqa: F401  (resolve_device: public here too)
from torchgraft.train.logging import MetricsLogger, ProgressBar
from torchgraft.train.run import Run
from torchgraft.train.mfu import device_peak_flops, step_flops
from torchgraft.train.optim import ParamGroupsFn, build_optimizer
from torchgraft.train.precision import autocast, make_grad_scaler
from torchgraft.train.schedule import LRSchedule
from torchgraft.train.tasks import Task, build_task


class NonFiniteError(TorchgraftError):
    """Too many consecutive steps with a NaN/Inf loss or gradient."""


# ------------------------------------------------------------------------------------ helpers

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def data_sizes(info: dict[str, Any]) -> dict[str, tuple[int, str]]:
    """The model sizes a dataset determines, each with how the data says it: `num_classes`,
    `num_labels`, `vocab_size`, and from images of shape (C, H, W) `in_chans` (and `image_size`
    when the images are square)."""
    sizes = {k: (info[k], str(info[k])) for k in ("num_classes", "num_labels", "vocab_size") if k in info}
    shape = info.get("input_shape")
    if isinstance(shape, (tuple, list)) and len(shape) == 3:
        c, h, w = (int(v) for v in shape)
        sizes["in_chans"] = (c, f"{c}-channel images")
        if h == w:
            sizes["image_size"] = (h, f"{h}x{w} images")
    return sizes


def build_model_for(section: dict[str, Any], info: dict[str, Any], device: str | None = None) -> nn.Module:
    """Build the model of a run config; the data fills the sizes it determines (`num_classes`,
    `vocab_size`, `in_chans`, `image_size`, see `data_sizes`) unless the config sets them, and a size
    the config sets that does not fit the data is one line naming both.
    `device="meta"` allocates nothing (a sharded run materialises after sharding)."""
    from torchgraft.models.registry import build, resolve_config

    spec = dict(section)
    _, mcfg = resolve_config(spec)
    fields = {f.name for f in dataclasses.fields(mcfg)}
    for key, (value, said) in data_sizes(info).items():
        if key not in fields:
            continue
        have = getattr(mcfg, key)
        if key not in spec:
            spec[key] = value
        elif (key == "vocab_size" and have < value) or (key != "vocab_size" and have != value):
            raise ConfigError(f"model.{key}={have} does not fit the data ({said}); "
                              f"remove model.{key} to take it from the data")
    return build(spec, device=device)


def model_meta(model: nn.Module) -> dict[str, Any]:
    """Name, family, config (and adapter spec) of a model for meta.json (family None for unregistered modules)."""
    mcfg = getattr(model, "config", None)
    family = None
    if dataclasses.is_dataclass(mcfg):
        from torchgraft.models.registry import family_of_config

        try:
            family = family_of_config(mcfg).name
        except TorchgraftError:
            family = None
    from torchgraft.peft.spec import adapter_spec

    meta = {"name": getattr(model, "model_name", type(model).__name__), "family": family,
            "config": to_dict(mcfg) if dataclasses.is_dataclass(mcfg) else None}
    spec = adapter_spec(model)  # a LoRA/DoRA model describes its adapters (checkpoint.model rebuilds them)
    if spec is not None:
        meta["adapters"] = spec
    return meta


def save_run_tokenizer(run_dir: Path, info: dict[str, Any]) -> Path | None:
    """Write the data's tokenizer (`DataBundle.info["tokenizer"]`) as `run_dir/tokenizer/` (tokenizer.json
    + tokenizer_config.json), which `generate`, `eval` and `convert` use. None if there is none."""
    tok = info.get("tokenizer")
    if tok is None or not hasattr(tok, "save"):
        return None
    return tok.save(run_dir / "tokenizer")


def write_run_files(run_dir: Path, files: dict[str, str | bytes]) -> None:
    """Write `{relative name: content}` into the run directory, each file atomically (data files such
    as `labels.json`, a task's evaluation files such as `confusion_matrix.png`)."""
    from torchgraft.io import atomic_write_bytes

    for name, content in files.items():
        path = run_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, content.encode() if isinstance(content, str) else content)


def reduce_sums(sums: dict[str, torch.Tensor], all_reduce_sum: Any) -> dict[str, Any]:
    """Sum evaluation statistics over processes in one reduction: scalars come back as floats,
    larger statistics (e.g. a (K, K) confusion matrix) as tensors of their shape."""
    if not sums:
        return {}
    names = list(sums)
    flat = all_reduce_sum(torch.cat([sums[k].reshape(-1) for k in names])).cpu()
    out: dict[str, Any] = {}
    for k, part in zip(names, flat.split([sums[k].numel() for k in names])):
        out[k] = float(part) if sums[k].dim() == 0 else part.view(sums[k].shape)
    return out


def split_batch(batch: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    if n == 1:
        return [batch]
    parts = {k: v.chunk(n) for k, v in batch.items()}
    return [{k: parts[k][i] for k in batch} for i in range(n)]


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def rescale_loader_state(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """Let a run resume with another number of processes: the global batch must be the same; the
    position (batches drawn per rank = optimizer steps) then carries over unchanged."""
    ws_old, ws_new = saved.get("world_size", 1), current["world_size"]
    if ws_old == ws_new:
        return saved
    if saved.get("batch_size", 0) * ws_old != current["batch_size"] * ws_new:
        raise CheckpointError(f"cannot resume on {ws_new} processes: the checkpoint's global batch was "
                              f"{saved.get('batch_size', 0) * ws_old}, this run's is "
                              f"{current['batch_size'] * ws_new}; keep trainer.batch_size")
    return {**saved, "world_size": ws_new, "batch_size": current["batch_size"]}


class LoaderState:
    """The data position as a checkpoint entry; resumes on another number of processes when the
    global batch is the same (`rescale_loader_state`)."""

    def __init__(self, loader: StatefulLoader):
        self.loader = loader

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(rescale_loader_state(state, self.loader.state_dict()))


class ScalerState:
    """The fp16 GradScaler as a checkpoint entry (empty without one: bf16 / fp32 runs)."""

    def __init__(self, scaler: Any):
        self.scaler = scaler

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


@dataclass
class StepOutput:
    loss: float
    grad_norm: float
    ok: bool          # finite loss and gradient: the update was applied
    count: torch.Tensor  # loss units (samples / target tokens) of this process's batch
    lr: float = 0.0


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
    """Trains `cfg` into `out_dir` with `engine` (one process by default).

    `model` replaces the one named by cfg.model, `data` replaces cfg.data; `param_groups_fn(model)`
    supplies custom optimizer groups. The run directory (lock, config.yaml, resume rules, logger,
    result.json) is a `Run`; its `CheckpointManager` (`self.ckpt`) saves model, optimizer, counters,
    data position, loss scaler and RNG, each as its own entry, in the engine's checkpoint layout."""

    def __init__(self, cfg: RunConfig | dict | str | Path, out_dir: str | Path, *,
                 model: nn.Module | None = None, data: DataBundle | None = None,
                 callbacks: Sequence[Callback] = (), param_groups_fn: ParamGroupsFn | None = None,
                 engine: LocalEngine | None = None):
        self.cfg = cfg if isinstance(cfg, RunConfig) else load_run_config(cfg)
        t = self.cfg.trainer
        self.engine = engine if engine is not None else LocalEngine(t.device)
        self.device, self.is_main = self.engine.device, self.engine.is_main
        self.run_dir = Path(out_dir)
        seed_everything(t.seed)
        self.data = data if data is not None else self.engine.prepare_data(lambda: build_data(self.cfg.data, t.seed))
        self.task: Task = build_task(self.cfg.task if self.cfg.task is not None else self.data.task)
        self.model, self.train_model = self.engine.setup_model(
            model, lambda device: build_model_for(self.cfg.model, self.data.info, device=device),
            self.load_initial_weights if t.init_from else None, t.compile)
        self.loss_sum = self.engine.training_loss(self.task.loss_sum, t.compile)
        from torchgraft.train.validate import check_model_against_data

        check_model_against_data(getattr(self.model, "config", None), self.data.info)  # seq_len <= block_size
        self.optimizer = build_optimizer(self.model, self.cfg.optim, param_groups_fn)
        self.schedule = LRSchedule(self.cfg.schedule, t.max_steps)
        self.scaler = make_grad_scaler(t.precision, self.device)
        self.loader = StatefulLoader(self.data.train, self.engine.sampler(len(self.data.train), t.batch_size, t.seed),
                                     self.data.collate_fn, num_workers=self.data.num_workers)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.state = TrainState()
        metric = self.cfg.eval.best_metric or self.task.default_metric
        self.validator = Validator(self.cfg.eval, metric, self.task.higher_is_better(metric))
        c = self.cfg.checkpoint
        self.ckpt = CheckpointManager(
            self.run_dir / "checkpoints", {"model": self.model, "optimizer": self.optimizer, "state": self.state,
                                           "loader": LoaderState(self.loader), "scaler": ScalerState(self.scaler),
                                           "rng": RNGState()},
            self.engine.checkpoint_layout(), every=c.every, keep_last=c.keep_last,
            save_best=c.save_best and self.cfg.eval.every > 0, meta=self.checkpoint_meta)
        self.run = Run(self.run_dir, self.cfg.to_dict(), self.ckpt, is_main=self.is_main, callbacks=callbacks)
        self.callbacks = self.run.callbacks
        self.log_cadence = LogCadence(self.cfg.logging)
        self.flops_per_step: int | None = None
        self.peak_flops = device_peak_flops(self.device, t.precision)
        self.logger: MetricsLogger | None = None
        self.scaler_skip = False  # the last step was skipped by the fp16 GradScaler

    def load_initial_weights(self, model: nn.Module) -> None:
        """`trainer.init_from`: load weights (manifest verified) into the model before training."""
        from torchgraft.checkpoint.artifact import read_artifact_checkpoint, resolve
        from torchgraft.checkpoint.model import adapter_layers_in, model_from_checkpoint
        from torchgraft.tools.transfer import load_state

        path = self.cfg.trainer.init_from
        a = resolve(path)  # what the path is, as for every command
        if not (a.is_checkpoint or a.kind == "safetensors"):
            raise CheckpointError(f"trainer.init_from: {a.what}; it loads torchgraft weights (a run, checkpoint "
                                  f"or merged folder, a .safetensors file): fine-tune from it with "
                                  f"finetune.source={path} instead")
        if a.kind == "safetensors":
            state, _ = load_state(a.path)
        else:
            ck = read_artifact_checkpoint(a)  # newest good checkpoint, manifest verified
            state = ck.model_state  # a LoRA/DoRA fine-tune: start from its merged weights
            if adapter_layers_in(state):
                state = model_from_checkpoint(ck).state_dict()
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"trainer.init_from={path}: weights do not fit the model "
                                  f"({str(e).splitlines()[0]}); use torchgraft.transfer for partial loads") from None

    # ---- one optimizer step
    def train_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        """Forward/backward over the micro-batches, guard, clip, update.

        Each micro-batch's loss is `task.loss_sum / (units of the whole step on all ranks / world)`:
        DDP/FSDP average gradients over ranks, so the sum is the gradient of the global mean."""
        t, engine = self.cfg.trainer, self.engine
        micro_batches = split_batch(batch, t.grad_accum_steps)
        count = self.task.count(batch)
        total = engine.all_reduce_sum(count.to(torch.float64)) if engine.world_size > 1 else count
        divisor = total.clamp(min=1) / engine.world_size if engine.world_size > 1 else total.clamp(min=1)
        loss_acc = None
        for i, mb in enumerate(micro_batches):
            with engine.no_sync(self.train_model, last=i == len(micro_batches) - 1):
                with autocast(t.precision, self.device):
                    loss = self.loss_sum(self.train_model, mb) / divisor
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            loss_acc = loss.detach() if loss_acc is None else loss_acc + loss.detach()
        if engine.world_size > 1:
            loss_acc = engine.all_reduce_sum(loss_acc) / engine.world_size
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
        return StepOutput(loss_val, norm_val, ok, count)

    # ---- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Task metrics over the validation set: `eval_sums` summed over batches and processes, then
        `metrics`, plus `extra_metrics` computed on the main process (and shared with the others)."""
        if self.data.val is None or len(self.data.val) == 0:
            return {}
        e, t = self.cfg.eval, self.cfg.trainer
        self.model.eval()
        sums: dict[str, torch.Tensor] = {}
        for batch in iter_eval_batches(self.data.val, e.batch_size, self.data.collate_fn, e.max_batches,
                                       num_workers=self.data.num_workers):
            batch = self.engine.shard_eval_batch(_to_device(batch, self.device))
            with autocast(t.precision, self.device):
                for k, v in self.task.eval_sums(self.train_model, batch).items():
                    sums[k] = sums[k] + v.double() if k in sums else v.double()
        self.model.train()
        totals = reduce_sums(sums, self.engine.all_reduce_sum)
        metrics = self.task.metrics(totals)
        if self.is_main:
            write_run_files(self.run_dir, self.task.eval_files(totals))
        extra = self.task.extra_metrics(self.model) if self.is_main else None
        metrics.update(self.engine.broadcast(extra) or {})
        return metrics

    # ---- checkpoints
    def checkpoint_meta(self) -> dict[str, Any]:
        """meta.json of a checkpoint: the model, its metrics, the run config, task and engine."""
        from torchgraft import __version__

        return {"model": model_meta(self.model), "metrics": self.state.last_eval, "run_config": self.run.config,
                "task": self.task.name, "torchgraft_version": __version__, "engine": self.engine.describe()}

    def save_checkpoint(self, last: bool = False, improved: bool = False) -> Path | None:
        """Save this step when the manager's cadence says so (or `last`); every process calls it."""
        s = self.state
        path = self.ckpt.save(s.step, last, best=(self.validator.metric, s.best_value) if improved else None)
        if path is not None and self.is_main:
            self.callbacks.on_checkpoint(self, path)
        return path

    # ---- the loop
    def fit(self, resume: bool = False) -> TrainResult:
        """Train to `trainer.max_steps` (or an early stop); `resume` continues the run in out_dir.
        The main process holds the run directory's lock throughout (`Run.hold`)."""
        with self.run.hold():
            return self._fit(resume)

    def _fit(self, resume: bool) -> TrainResult:
        self._start(resume)
        try:
            while self.state.step < self.cfg.trainer.max_steps and not self.state.should_stop:
                self._after_step(self._step())
            self._finish_interrupted()
        finally:
            self._close()
        return self._result()

    def _start(self, resume: bool) -> None:
        """Run files, FLOP count, resume, logger and progress bar."""
        from torchgraft.train.validate import cadence_warnings, inputs_must_fit

        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.cfg.logging.measure_flops:
            with inputs_must_fit(self.model, {}):  # the first forward: a shape error is the config's
                self._measure_flops()
        resumed = self.run.restore(resume)  # refuses what a run cannot change midway
        s, lg = self.state, self.cfg.logging
        self.run.start(s.step < self.cfg.trainer.max_steps, cadence_warnings(self.run.config),
                       tensorboard=lg.tensorboard, resume_step=s.step)
        self.logger = self.run.logger
        if self.is_main:
            save_run_tokenizer(self.run_dir, self.data.info)
            write_run_files(self.run_dir, self.data.files)
        self.bar = ProgressBar(self.cfg.trainer.max_steps, s.step, enabled=lg.progress and self.is_main,
                               unit=self.task.unit)
        if resumed:
            changes = self.run.resume_changes
            self.bar.print(f"resumed from step {s.step}" + (f"; applied: {', '.join(changes)}" if changes else ""))
        self.callbacks.on_train_start(self)
        self.throughput = Throughput(s, self.task.unit, self.flops_per_step, self.peak_flops)
        self._first_step, self._last = s.step, StepOutput(float("nan"), float("nan"), True, torch.zeros(()))

    def _step(self) -> StepOutput:
        """One optimizer step and its counters (non-finite streaks stop the run)."""
        s, t = self.state, self.cfg.trainer
        batch = _to_device(next(self.loader), self.device)
        lr = self.schedule.apply(self.optimizer, s.step)
        if s.step == self._first_step:  # the first forward: a shape mismatch is the config's fault
            from torchgraft.train.validate import inputs_must_fit

            with inputs_must_fit(self.model, batch):
                out = self.train_step(batch)
        else:
            out = self.train_step(batch)
        out.lr = lr
        s.step += 1
        s.samples_seen += self.task.num_samples(batch)
        if self.task.unit == "tokens":
            s.targets_seen += int(out.count)
        if out.ok:
            s.consecutive_bad = 0
        else:
            s.skipped_steps += 1
            s.consecutive_bad += 0 if self.scaler_skip else 1
            if s.consecutive_bad >= t.max_bad_steps:
                self._stop_non_finite(out.loss, out.grad_norm)
        self._last = out
        return out

    def _after_step(self, out: StepOutput) -> None:
        """The cadence of one step: evaluate, log, callbacks, checkpoint."""
        s = self.state
        final = s.step >= self.cfg.trainer.max_steps
        evaluated = self.validator.due(s.step, final)
        record = self._record(out) if self.log_cadence.due(s.step, evaluated) else {}
        improved = self._validate(record) if evaluated else False
        if record:
            self.logger.log(record)
            self.bar.update(s.step, record)
            if evaluated and "val_loss" in record:
                self.bar.print(eval_line(s.step, record))
        self.callbacks.on_step_end(self, record or {"step": s.step, "loss": out.loss, "lr": out.lr})
        if not s.consecutive_bad:  # never inside a streak of non-finite steps
            self.save_checkpoint(last=final or s.should_stop, improved=improved)

    def _record(self, out: StepOutput) -> dict[str, Any]:
        s = self.state
        return {"step": s.step, "loss": out.loss, "lr": out.lr, "grad_norm": out.grad_norm,
                "epoch": self.loader.epoch, **self.throughput.record(s), "skipped_steps": s.skipped_steps,
                "elapsed_s": self.throughput.elapsed()}

    def _validate(self, record: dict[str, Any]) -> bool:
        """Evaluate into `record`; True on a new best."""
        metrics = self.evaluate()
        self.validator.last_step = self.state.step
        if not metrics:
            return False
        record.update(metrics)
        improved = self.validator.update(self.state, metrics)
        self.callbacks.on_eval_end(self, metrics)
        return improved

    def _finish_interrupted(self) -> None:
        """A run stopped by a callback between evaluations still ends evaluated and checkpointed."""
        s = self.state
        if s.step == self._first_step:
            return
        if self.validator.last_step != s.step:
            record = {"step": s.step, "loss": self._last.loss}
            self._validate(record)
            if len(record) > 2:  # there were metrics
                self.logger.log(record)
        if self.ckpt.last_saved != s.step and s.consecutive_bad == 0:
            self.save_checkpoint(last=True, improved=s.best_step == s.step)

    def _close(self) -> None:
        self.bar.close()
        self.run.close()
        self.engine.barrier()

    def _result(self) -> TrainResult:
        s, t = self.state, self.cfg.trainer
        ckpts = list_checkpoints(self.ckpt.root)
        best_name = self.ckpt.best_name()
        result = TrainResult(
            run_dir=self.run_dir, step=s.step, metrics=dict(s.last_eval),
            best={"metric": self.validator.metric, "value": s.best_value, "step": s.best_step},
            last_checkpoint=ckpts[-1] if ckpts else None,
            best_checkpoint=(self.ckpt.root / best_name) if best_name else None,
            stop_reason=s.stop_reason or ("max_steps" if s.step >= t.max_steps else ""),
            model=self.engine.finish(self.model), elapsed_s=self.throughput.elapsed())
        self.run.write_result(result.to_dict())
        self.callbacks.on_train_end(self, result)
        return result

    def _measure_flops(self) -> None:
        """FLOPs of one optimizer step of this process (fwd + bwd), counted on a side batch."""
        t = self.cfg.trainer
        micro = t.batch_size // t.grad_accum_steps
        batch = _to_device(next(iter_eval_batches(self.data.train, micro, self.data.collate_fn)), self.device)
        flops = step_flops(self.model, lambda m: self.task.loss_sum(m, batch), t.precision, self.device)
        self.flops_per_step = flops * t.grad_accum_steps // self.engine.world_size

    def _stop_non_finite(self, loss: float, gnorm: float) -> None:
        s = self.state
        ckpts = list_checkpoints(self.ckpt.root)
        kept = f"last good checkpoint: {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
        self.logger.log({"step": s.step, "loss": loss, "grad_norm": gnorm, "skipped_steps": s.skipped_steps})
        raise NonFiniteError(
            f"stopped at step {s.step}: {s.consecutive_bad} consecutive steps had a non-finite loss or "
            f"gradient (loss={loss}, grad_norm={gnorm}); {kept}. Lower optim.lr, set trainer.grad_clip, "
            f"or use precision=bf16 instead of fp16")

