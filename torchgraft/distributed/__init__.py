"""torchgraft.distributed: scale out on torch.distributed (torchrun, DDP, FSDP2, DCP).

    info = init_distributed()                        # reads torchrun's env; no-op in one process
    model = build("gpt2", device="meta")             # nothing allocated yet
    model = parallelize(model, "fsdp", mixed_precision="bf16", activation_checkpointing="full")
    ...                                              # train; only info.is_main logs
    save_sharded(run / "ckpt", model, optimizer)     # every rank writes its shards
    export_safetensors(model, run / "model.safetensors")   # full weights, rank 0

See docs/distributed.md.
"""
from torchgraft.distributed.checkpoint import (
    export_safetensors, full_state_dict, is_sharded_checkpoint, load_sharded, read_extra, save_sharded)
from torchgraft.distributed.config import DistributedConfig, distributed_config
from torchgraft.distributed.env import (
    DistInfo, all_reduce_mean, backend_for, barrier, cleanup, get_info, init_distributed,
    is_main_process, launched_by_torchrun, relaunch_with_torchrun, torchrun_command)
from torchgraft.distributed.parallel import (
    STRATEGIES, apply_activation_checkpointing, clip_grad_norm_, find_blocks, grad_sync, local_numel,
    parallelize, strategy_of, unwrap)
from torchgraft.distributed.sampler import DistributedStatefulSampler

__all__ = [
    "DistInfo", "DistributedConfig", "distributed_config", "DistributedStatefulSampler", "STRATEGIES", "all_reduce_mean",
    "apply_activation_checkpointing", "backend_for", "barrier", "cleanup", "clip_grad_norm_",
    "export_safetensors", "find_blocks", "full_state_dict", "get_info", "grad_sync",
    "init_distributed", "is_main_process", "is_sharded_checkpoint", "launched_by_torchrun",
    "load_sharded", "local_numel", "parallelize", "read_extra", "relaunch_with_torchrun",
    "save_sharded", "strategy_of", "torchrun_command", "unwrap",
]
