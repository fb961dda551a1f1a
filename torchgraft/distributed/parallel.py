"""`parallelize(model, ...)`: DDP or FSDP2 and activation checkpointing, applied after building.

Models never know how they are parallelised (torchtitan style). The steps, in order:
1. find the repeated blocks (children of a ModuleList named `blocks` / `layers` / `h`, ResNet-style
   stages `layer1..N`, given module classes, or a name pattern);
2. activation checkpointing on every block or every k-th block, or "selective" (every block, but
   matmul and attention outputs are kept: only the cheap pointwise ops are recomputed);
   names in `state_dict()` unchanged;
3. DDP (replicate + all-reduce) or FSDP2 (`fully_shard` on each block, then on the root);
4. if the model was built on the meta device, materialise it *after* sharding, so each rank only
   ever allocates its own shard, then run the model's `reset_parameters` / `init_weights`.
"""
from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from torchgraft.activation_checkpointing import parse_ac
from torchgraft.errors import ConfigError, did_you_mean
from torchgraft.models.parts import parts_of
from torchgraft.precision import check_fp32_master, precision

Strategy = Literal["none", "ddp", "fsdp"]
STRATEGIES = ("none", "ddp", "fsdp")
BLOCK_LIST_NAMES = ("blocks", "layers", "h")
_STAGE_NAME = re.compile(r"^layer\d+$")

# --------------------------------------------------------------------------------------------
# finding blocks
# --------------------------------------------------------------------------------------------

def find_blocks(model: nn.Module, block_types: Sequence[type] | None = None,
                pattern: str | None = None) -> list[tuple[str, nn.Module]]:
    """The repeated blocks of `model` as `(qualified_name, module)`, in forward order.

    - `block_types`: every outermost submodule that is an instance of one of these classes;
    - `pattern`: every outermost submodule whose qualified name fully matches the regex
      (e.g. `"blocks\\.\\d+"` or `"layer[1-4]"`);
    - otherwise the blocks the model declares (`parts_of(model).blocks`: zoo models);
    - for a model that declares nothing: the children of each ModuleList named `blocks`, `layers`
      or `h`, or else the top-level ResNet-style stages `layer1`, `layer2`, ...

    Returns [] when the model has no recognisable blocks (then only the root is wrapped).
    """
    if block_types is not None and pattern is not None:
        raise ConfigError("give either block_types or a block pattern, not both")
    if block_types is not None:
        types = tuple(block_types)
        return _outermost(model, lambda name, m: name != "" and isinstance(m, types))
    if pattern is not None:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"block pattern {pattern!r} is not a valid regex: {e}") from None
        found = _outermost(model, lambda name, m: name != "" and rx.fullmatch(name) is not None)
        if not found:
            names = [n for n, _ in model.named_modules() if n]
            raise ConfigError(f"block pattern {pattern!r} matches no submodule"
                              + did_you_mean(pattern, names) + " (module names look like "
                              + ", ".join(repr(n) for n in names[:3]) + ")")
        return found
    parts = parts_of(model)
    if parts is not None:
        return [(b, model.get_submodule(b)) for b in parts.blocks]
    out: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LIST_NAMES:
            if any(name.startswith(o + ".") for o, _ in out):
                continue  # nested inside a block already found
            out.extend((f"{name}.{i}", child) for i, child in enumerate(m))
    if out:
        return out
    return [(n, m) for n, m in model.named_children() if _STAGE_NAME.match(n)]


def _outermost(model: nn.Module, pred) -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if pred(name, m) and not any(name.startswith(o + ".") for o, _ in out):
            out.append((name, m))
    return out


# --------------------------------------------------------------------------------------------
# activation checkpointing
# --------------------------------------------------------------------------------------------

def _saved_ops() -> set:
    """Ops whose outputs selective checkpointing keeps: matmuls and attention (expensive to redo)."""
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu")
    return {getattr(aten, n).default for n in names if hasattr(aten, n)}


def selective_checkpoint_context():
    """`context_fn` for `torch.utils.checkpoint`: keep matmul / attention outputs, recompute the
    rest of the block (norms, activations, residual adds, RoPE) during backward. Saves the
    pointwise activations' memory for little recompute (torchtitan's "op" selective AC)."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saved = _saved_ops()

    def policy(ctx, op, *args, **kwargs):  # noqa: ANN001, ANN202
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE
    return create_selective_checkpoint_contexts(policy)


def apply_activation_checkpointing(model: nn.Module, activation_checkpointing: str | int | bool = "full",
                                   blocks: list[tuple[str, nn.Module]] | None = None) -> list[str]:
    """Recompute the activations of every (or every k-th) block in backward instead of storing them.

    Uses PyTorch's composable `checkpoint` (non-reentrant `torch.utils.checkpoint` driven by
    forward hooks), so module and parameter names are unchanged and it composes with FSDP2 and
    DDP. Returns the names of the checkpointed blocks.
    """
    mode = parse_ac(activation_checkpointing)
    if not mode.enabled:
        return []
    if blocks is None:
        blocks = find_blocks(model)
    if not blocks:
        raise ConfigError(f"activation checkpointing needs repeated blocks, but none were found in "
                          f"{type(model).__name__}; pass block_types=... or block_pattern=...")
    from torch.distributed._composable import checkpoint

    done = []
    for i in mode.checkpointed(len(blocks)):
        name, block = blocks[i]
        if mode.selective:
            checkpoint(block, context_fn=selective_checkpoint_context)
        else:
            checkpoint(block)
        done.append(name)
    return done


# --------------------------------------------------------------------------------------------
# parallelize
# --------------------------------------------------------------------------------------------

def _mp_dtype(mixed_precision: str | bool | torch.dtype | None) -> torch.dtype | None:
    """FSDP's compute dtype for a `torchgraft.precision` name (None: no mixed precision)."""
    if mixed_precision is None or mixed_precision is False:
        return None
    if mixed_precision is True:
        return torch.bfloat16
    if isinstance(mixed_precision, torch.dtype):
        return mixed_precision
    prec = precision(check_fp32_master(mixed_precision, "mixed_precision"))
    return prec.compute if prec.mixed else None


def _is_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


def parallelize(model: nn.Module, strategy: Strategy = "fsdp", *,
                device: str | torch.device | None = None,
                mesh=None,
                mixed_precision: str | bool | torch.dtype | None = None,
                cpu_offload: bool = False,
                activation_checkpointing: str | int | bool | None = "none",
                block_types: Sequence[type] | None = None,
                block_pattern: str | None = None,
                reshard_after_forward: bool = True,
                init_weights: bool = True) -> nn.Module:
    """Apply activation checkpointing and DDP / FSDP2 to `model`; return the module to train.

    - `strategy`: "none" (single process / plain model), "ddp" (returns a
      `DistributedDataParallel` wrapper; use `unwrap(model)` for the inner model) or "fsdp"
      (`fully_shard` per block and at the root; the same object is returned, parameters become
      sharded DTensors).
    - `device`: where parameters live (default: `cuda:LOCAL_RANK` when a process group runs on
      CUDA, else CPU). `mesh`: a 1-D DeviceMesh for FSDP (default: all ranks).
    - `mixed_precision` (FSDP): "bf16" computes in bf16 (params all-gathered in bf16) and reduces
      gradients in fp32, while the sharded master weights stay fp32. With DDP use the trainer's
      autocast instead.
    - `cpu_offload` (FSDP): keep sharded params, grads and optimizer state in CPU memory.
    - `activation_checkpointing`: "none", "full", k (every k-th block) or "selective" (every
      block, keeping matmul / attention outputs and recomputing only pointwise ops).
    - `block_types` / `block_pattern`: how to find the blocks (default: see `find_blocks`).
    - A model on the meta device is sharded first and materialised afterwards on `device`, running
      `reset_parameters()` / `init_weights()` (see `torchgraft.models.registry.materialize`), so the
      full model never exists on any rank. `init_weights=False` only allocates.

    LoRA / frozen weights: FSDP2 shards every parameter on its own (no flat parameter), so frozen
    base weights get no gradient buffers, trainable adapters get sharded gradients, and the
    optimizer only sees trainable parameters.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown distributed strategy {strategy!r}" + did_you_mean(str(strategy), STRATEGIES)
                          + "; use one of " + ", ".join(STRATEGIES))
    mp = _mp_dtype(mixed_precision)
    if strategy != "fsdp" and mp is not None:
        raise ConfigError(f"mixed_precision applies to strategy=fsdp; with {strategy} use the trainer's "
                          "autocast (trainer.precision=bf16)")
    if strategy != "fsdp" and cpu_offload:
        raise ConfigError(f"cpu_offload applies to strategy=fsdp, not {strategy}")
    dev = _default_device(device)
    blocks = find_blocks(model, block_types, block_pattern)
    apply_activation_checkpointing(model, activation_checkpointing, blocks)
    meta = _is_meta(model)

    if strategy == "none":
        if meta:
            _materialize(model, dev, init_weights)
        elif device is not None:
            model.to(dev)
        return model

    if not (dist.is_available() and dist.is_initialized()):
        from torchgraft.distributed.env import init_distributed

        init_distributed(dev.type, force=True)  # a one-process group, so DDP/FSDP still work

    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        if meta:
            _materialize(model, dev, init_weights)  # DDP replicates: each rank holds all weights
        else:
            model.to(dev)
        # DDP broadcasts rank 0's parameters and buffers, so every replica starts identical.
        return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(dev.type, (dist.get_world_size(),))
    if not meta:
        model.to(dev)
    if cpu_offload and dev.type != "cuda":
        warnings.warn("cpu_offload has no effect when training on the CPU; ignoring it", stacklevel=2)
        cpu_offload = False
    kwargs = dict(mesh=mesh,
                  mp_policy=MixedPrecisionPolicy(param_dtype=mp, reduce_dtype=torch.float32 if mp else None),
                  offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    for i, (_, block) in enumerate(blocks):
        # The last block's params are needed again right away in backward: keep them gathered.
        fully_shard(block, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    if meta:
        _materialize(model, torch.device("cpu") if cpu_offload else dev, init_weights, sharded=True)
    return model


def _default_device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            from torchgraft.distributed.env import _env_int

            dev = torch.device("cuda", _env_int("LOCAL_RANK", 0))
        return dev
    if torch.cuda.is_available() and dist.is_available() and dist.is_initialized() \
            and dist.get_backend() != "gloo":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _materialize(model: nn.Module, device: torch.device, init_weights: bool, sharded: bool = False) -> None:
    """Allocate (only this rank's shards of) a meta model on `device` and initialise it.

    On CUDA, DTensor's offset-based RNG gives each shard the values a one-device init would.
    DTensor has no such RNG on the CPU: every rank would draw the *same* values for its shard
    (duplicated rows). There each rank draws from its own seed (derived from the shared RNG
    stream and the rank), so shards are independent draws of the same distribution.
    """
    if not init_weights:
        model.to_empty(device=device)
        return
    from torchgraft.models.registry import materialize

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="DTensor random operators")
        if sharded and device.type == "cpu" and dist.is_initialized() and dist.get_world_size() > 1:
            base = int(torch.randint(0, 2**31 - 1, (1,)).item())  # same on every rank: RNGs stay in step
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(base + 1_000_003 * dist.get_rank())
                materialize(model, device)
        else:
            materialize(model, device)


# --------------------------------------------------------------------------------------------
# helpers for the training loop
# --------------------------------------------------------------------------------------------

def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DDP wrapper (FSDP2 and plain models are returned as they are)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    return model.module if isinstance(model, DDP) else model


def strategy_of(model: nn.Module) -> Strategy:
    """Which strategy `parallelize` applied to `model`."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if isinstance(model, DDP):
        return "ddp"
    if isinstance(model, FSDPModule):
        return "fsdp"
    return "none"


@contextlib.contextmanager
def grad_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Context for one micro-batch's forward+backward under gradient accumulation.

    `sync=False` on every micro-batch but the last skips DDP's all-reduce (`no_sync`), so
    gradients are reduced once per optimizer step. FSDP2 keeps reduce-scattering each micro-batch
    (gradients stay sharded: accumulating unsharded would cost a full gradient copy per rank).
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if not sync and isinstance(model, DDP):
        with model.no_sync():
            yield
    else:
        yield


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm; works on plain, DDP and FSDP2 (DTensor) parameters."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm


def local_numel(model: nn.Module) -> int:
    """Number of parameter elements this rank holds (its shards under FSDP2)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel()
    return total
