"""`DistributedTrainer`: the training engine on several processes (DDP / FSDP2), same loop.

It overrides only the trainer's seams (`setup_model`, `make_sampler`, `micro_batch_context`,
`global_count`, `reduce_loss`, `make_logger`, `save_checkpoint`, `restore`):
- the model is parallelised by `parallelize` (FSDP: built on the meta device, sharded, then
  initialised, unless `trainer.init_from` gives weights);
- each rank reads its slice of every global batch (`trainer.batch_size` stays the global batch);
- DDP skips the all-reduce on all but the last micro-batch;
- the loss is normalised by the targets of the whole global step (DDP/FSDP average gradients
  over ranks, so each rank divides by the global count / world size);
- only rank 0 logs, shows progress and writes run files;
- FSDP checkpoints hold the DCP shards of model + optimizer (`dcp/`) next to the usual files
  (a full `model.safetensors` gathered on rank 0, meta, trainer state, RNG, sha256 manifest),
  so they resume with any number of processes; DDP / single-process checkpoints are the usual
  ones, written by rank 0.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from torchgraft.distributed.checkpoint import full_state_dict, is_sharded_checkpoint, load_sharded, save_sharded
from torchgraft.distributed.env import DistInfo, barrier, init_distributed
from torchgraft.distributed.parallel import find_blocks, grad_sync, parallelize, strategy_of, unwrap
from torchgraft.errors import CheckpointError, ConfigError
from torchgraft.train.checkpoint import (FORMAT_VERSION, _fsync_dir, _json_bytes, _state_dict_tensors,
                                         _write_bytes, capture_rng, list_checkpoints, load_latest, publish_dir,
                                         load_optimizer_state, read_verified, restore_rng)
from torchgraft.train.config import RunConfig, load_run_config
from torchgraft.train.trainer import Trainer, TrainState, build_model_for, model_meta, resolve_device


def wants_distributed(cfg: RunConfig, out_dir: str | Path | None = None, resume: bool = False) -> bool:
    """True when the run must use `DistributedTrainer`: a `distributed:` option is set, torchrun
    started us, or we resume a checkpoint written by a distributed run (sharded / other world size)."""
    from torchgraft.distributed.config import DistributedConfig
    from torchgraft.distributed.env import launched_by_torchrun

    if cfg.distributed != DistributedConfig():  # any option set (e.g. activation checkpointing alone)
        return True
    if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        return True
    if resume and out_dir is not None:
        ckpts = list_checkpoints(Path(out_dir) / "checkpoints")
        if ckpts:
            try:
                ts = json.loads((ckpts[-1] / "trainer_state.json").read_text())
            except (OSError, ValueError):
                return False
            return "world_size" in ts or ts.get("loader", {}).get("world_size", 1) != 1
    return False


class _NullLogger:
    """What ranks other than 0 log to."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class DistributedTrainer(Trainer):
    def __init__(self, cfg: RunConfig | dict | str | Path, out_dir: str | Path, **kwargs: Any):
        cfg = cfg if isinstance(cfg, RunConfig) else load_run_config(cfg)
        d, t = cfg.distributed, cfg.trainer
        device = resolve_device(t.device)
        self.info: DistInfo = init_distributed(device.type, force=d.strategy == "fsdp")
        self.world = self.info.world_size
        self.strategy = d.strategy if d.strategy != "none" or self.world == 1 else "ddp"
        if t.batch_size % (self.world * t.grad_accum_steps):
            raise ConfigError(f"trainer.batch_size={t.batch_size} (the global batch) must be a multiple of "
                              f"processes x grad_accum_steps = {self.world} x {t.grad_accum_steps}")
        self.is_main = self.info.is_main
        self._model_given = kwargs.get("model") is not None
        if kwargs.get("data") is None and self.world > 1:
            # Rank 0 prepares the data first (tokenizer, token caches), the others then read its
            # caches: the work is done once and only rank 0 shows its progress.
            from torchgraft.data.registry import build_data

            if self.is_main:
                kwargs["data"] = build_data(cfg.data, t.seed)
            barrier()
            if not self.is_main:
                kwargs["data"] = build_data(cfg.data, t.seed)
        super().__init__(cfg, out_dir, **kwargs)

    # ---- model
    def setup_model(self, model: nn.Module | None) -> tuple[nn.Module, nn.Module]:
        d, t = self.cfg.distributed, self.cfg.trainer
        on_meta = model is None and self.strategy == "fsdp" and not t.init_from
        if model is None:
            model = build_model_for(self.cfg.model, self.data.info, device="meta" if on_meta else None)
        self.model = model
        if t.init_from:
            self.load_initial_weights(t.init_from)
        if not on_meta:
            model.to(self.device)
        model.train()
        # A model handed in by a recipe is used again after training (adapters, merging, reports):
        # keep a free meta-device copy of it to return unsharded (see `fit`).
        self._skeleton = _meta_copy(model) if self._model_given and self.strategy == "fsdp" else None
        wrapped = parallelize(model, self.strategy, device=self.device,
                              mixed_precision=d.mixed_precision,
                              cpu_offload=d.cpu_offload, activation_checkpointing=d.activation_checkpointing,
                              block_pattern=d.block_pattern)
        if t.compile:
            if self.strategy == "fsdp":
                for _, block in find_blocks(model, pattern=d.block_pattern):
                    block.compile()
            else:
                wrapped = torch.compile(wrapped)
        return unwrap(model), wrapped

    def make_sampler(self, dataset: Any):
        from torchgraft.data.loader import StatefulSampler

        t = self.cfg.trainer
        return StatefulSampler(len(dataset), t.batch_size // self.world, shuffle=True, seed=t.seed,
                               rank=self.info.rank, world_size=self.world)

    def _measure_flops(self) -> None:
        """FLOPs per step and rank: the engine measures one global micro-batch, a rank runs 1/world."""
        super()._measure_flops()
        if self.flops_per_step:
            self.flops_per_step //= self.world

    # ---- the step
    def micro_batch_context(self, last: bool):
        return grad_sync(self.train_model, sync=last)

    def global_count(self, count: torch.Tensor) -> torch.Tensor:
        """The global target count divided by the world size: DDP and FSDP average gradients over
        ranks, so dividing each rank's loss sum by this gives the gradient of the global mean."""
        if self.world == 1:
            return count
        total = count.detach().to(torch.float64).clone()
        dist.all_reduce(total)
        return (total / self.world).to(torch.float32)

    def reduce_loss(self, loss: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return loss
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        return loss / self.world

    def make_logger(self, resume_step: int | None):
        return super().make_logger(resume_step) if self.is_main else _NullLogger()

    # ---- checkpoints
    def _trainer_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        rng_json, rng_tensors = capture_rng()
        state = {"state": dataclasses.asdict(self.state), "loader": self.loader.state_dict(),
                 "rng": rng_json, "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                 "world_size": self.world, "strategy": self.strategy}
        return state, rng_tensors

    def save_checkpoint(self, best: bool = False) -> Path:
        if self.strategy != "fsdp":
            path = super().save_checkpoint(best) if self.is_main else self.ckpt.path_for(self.state.step)
            barrier()
            return path
        s = self.state
        trainer_state, rng_tensors = self._trainer_state()
        meta = {"model": model_meta(self.model), "step": s.step, "metrics": s.last_eval,
                "run_config": self.cfg.to_dict(), "task": self.task, "sharded": True}
        from torchgraft import __version__
        meta["torchgraft_version"] = __version__
        path = write_sharded_checkpoint(self.ckpt.path_for(s.step), self.model, self.optimizer, meta=meta,
                                        trainer_state=trainer_state, rng_tensors=rng_tensors)
        if self.is_main:
            if best:
                self.ckpt.mark_best(s.step, self.cfg.trainer.best_metric, s.best_value)
            self.ckpt.prune()
            self.callbacks.on_checkpoint(self, path)
        barrier()
        return path

    def restore(self) -> bool:
        root = self.run_dir / "checkpoints"
        if self.is_main:
            self.ckpt.clean_temp()
        barrier()
        chosen = _choose_checkpoint(root) if self.is_main else None
        if self.world > 1:
            box = [None if chosen is None else str(chosen)]
            dist.broadcast_object_list(box, src=0)
            chosen = None if box[0] is None else Path(box[0])
        if chosen is None:
            return False
        if is_sharded_checkpoint(chosen / "dcp"):
            load_sharded(chosen / "dcp", self.model, self.optimizer)
            trainer_state = json.loads((chosen / "trainer_state.json").read_text())
            from safetensors.torch import load_file

            rng_tensors = load_file(str(chosen / "rng.safetensors"))
        else:
            ck = load_latest(chosen)
            if ck.optimizer_state is None or ck.trainer_state is None or ck.rng_tensors is None:
                raise CheckpointError(f"{ck.path} holds weights only; it cannot resume a run")
            if strategy_of(self.train_model) == "fsdp":
                _load_full_into_fsdp(self.model, self.optimizer, ck.model_state, ck.optimizer_state)
            else:
                self.model.load_state_dict(ck.model_state)
                load_optimizer_state(self.optimizer, ck.optimizer_state)
            trainer_state, rng_tensors = ck.trainer_state, ck.rng_tensors
        self.loader.load_state_dict(_rescale_loader_state(trainer_state["loader"], self.loader.state_dict()))
        if self.scaler is not None and trainer_state.get("scaler"):
            self.scaler.load_state_dict(trainer_state["scaler"])
        self.state = TrainState(**trainer_state["state"])
        self.state.should_stop, self.state.stop_reason = False, ""
        restore_rng(trainer_state["rng"], rng_tensors)
        return True

    def fit(self, resume: bool = False):
        """Train; a model handed in and trained under FSDP comes back as a plain, full model on
        every rank (`result.model`), so recipes can save adapters or merge weights."""
        try:
            result = super().fit(resume=resume)
        finally:
            barrier()
        if self._skeleton is not None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
            plain = self._skeleton.to_empty(device=self.device)
            plain.load_state_dict(full)
            plain.train(self.model.training)
            result.model = plain
        return result


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters and buffers are on the meta device (no memory):
    same classes, submodules, ties and attributes, as it was before sharding."""
    import copy

    memo: dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in memo:
            meta = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _choose_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint whose manifest verifies (falling back like `load_latest`)."""
    ckpts = list_checkpoints(root)
    return _newest_verified(ckpts) if ckpts else None


def _newest_verified(ckpts: list[Path]) -> Path:
    import warnings

    from torchgraft.train.checkpoint import CheckpointFallbackWarning

    errors = []
    for cand in reversed(ckpts):
        try:
            read_verified(cand)
            return cand
        except CheckpointError as e:
            errors.append(str(e))
            warnings.warn(f"{e}; falling back to the previous checkpoint", CheckpointFallbackWarning, stacklevel=2)
    raise CheckpointError("no good checkpoint: " + "; ".join(errors))


def _rescale_loader_state(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
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


def _load_full_into_fsdp(model: nn.Module, optimizer: torch.optim.Optimizer,
                         model_state: dict[str, torch.Tensor], optim_state: dict[str, Any]) -> None:
    """Load a single-file (unsharded) checkpoint into an FSDP-sharded model and its optimizer.

    Every rank has read the whole file, so each cuts its own shards locally (no communication).
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    def local_piece(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if isinstance(like, DTensor):
            return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)
        return full.to(dtype=like.dtype, device=like.device)

    expected = set(model.state_dict())
    if set(model_state) != expected:
        missing, extra = sorted(expected - set(model_state)), sorted(set(model_state) - expected)
        raise CheckpointError(f"checkpoint weights do not fit the model (missing {missing[:3]}, "
                              f"unexpected {extra[:3]}); resume with the same model config")
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            piece = local_piece(model_state[name], t)
            (t.to_local() if isinstance(t, DTensor) else t).copy_(
                piece.to_local() if isinstance(piece, DTensor) else piece)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for pid, st in optim_state["state"].items():
        p = params[int(pid)]
        state[pid] = {k: local_piece(v, p) if isinstance(v, torch.Tensor) and v.shape == p.shape else v
                      for k, v in st.items()}
    load_optimizer_state(optimizer, {"state": state, "param_groups": optim_state["param_groups"]})


def write_sharded_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                             meta: dict[str, Any], trainer_state: dict[str, Any],
                             rng_tensors: dict[str, torch.Tensor]) -> Path:
    """A run checkpoint folder with the DCP shards in `dcp/`; every rank must call it.

    Same guarantees as the single-file checkpoints: written under a temporary name, every file
    fsynced and listed with its sha256 in `manifest.json` (written last), then renamed into place.
    `model.safetensors` holds the full weights (gathered on rank 0) so inference tools read it as
    usual.
    """
    path = Path(path)
    main = not dist.is_initialized() or dist.get_rank() == 0
    tmp = path.with_name(f".tmp-{path.name}-sharded")
    if main:
        path.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    save_sharded(tmp / "dcp", model, optimizer, extra={"step": meta.get("step")})
    full = full_state_dict(model)
    if main:
        from safetensors.torch import save as st_save

        small = {"model.safetensors": st_save(_state_dict_tensors(full), metadata={"format": "pt"}),
                 "rng.safetensors": st_save({k: v.contiguous() for k, v in rng_tensors.items()}),
                 "trainer_state.json": _json_bytes(trainer_state), "meta.json": _json_bytes(meta)}
        for name, data in small.items():
            _write_bytes(tmp / name, data)
        entries = {}
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                data = f.read_bytes()
                entries[str(f.relative_to(tmp))] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        _write_bytes(tmp / "manifest.json", _json_bytes(
            {"format_version": FORMAT_VERSION, "step": meta.get("step"), "files": entries}))
        _fsync_dir(tmp / "dcp")
        publish_dir(tmp, path)
    barrier()
    return path
