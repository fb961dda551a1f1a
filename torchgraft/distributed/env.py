"""Process-group set-up from torchrun's environment, and the `--nproc N` re-launch.

torchgraft does not invent a runtime: `torchrun` (or `python -m torch.distributed.run`) starts the
processes and sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; `init_distributed`
reads them and creates the default process group (NCCL on CUDA, gloo on CPU). Without those
variables it is a no-op, so the same code runs as a plain single process.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from torchgraft.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, rank on its node, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on the process that prints progress and writes logs (global rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} must be an integer "
                          "(it is set by torchrun; unset it to run a single process)") from None


def launched_by_torchrun() -> bool:
    """True when this process was started by torchrun (or any launcher setting WORLD_SIZE/RANK)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def backend_for(device: torch.device | str) -> str:
    """The process-group backend for a device type: NCCL for CUDA (gloo for CPU tensors too), gloo otherwise."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def init_distributed(device: str | torch.device | None = None, *, force: bool = False,
                     timeout_s: float | None = None) -> DistInfo:
    """Create the default process group from torchrun's environment variables; return `DistInfo`.

    `device`: "cpu", "cuda" or None (CUDA when available). On CUDA each process uses `cuda:LOCAL_RANK`.
    Without torchrun variables this does nothing (world size 1) unless `force=True`, which makes a
    one-process group, e.g. so FSDP2 / DTensor code paths also run in a plain `python` process.
    Calling it again returns the existing group's info.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"distributed training supports device 'cpu' or 'cuda', got {str(device)!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA device is visible; use device=cpu")

    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"RANK={rank} / WORLD_SIZE={world_size} are inconsistent; launch with torchrun")
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices "
                              "are visible; lower --nproc-per-node")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)

    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)
    if not launched_by_torchrun() and not force:
        return DistInfo(0, 1, 0, dev)

    kwargs = {}
    if timeout_s is not None:
        import datetime

        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    if launched_by_torchrun():
        # torchrun provides MASTER_ADDR / MASTER_PORT: the env:// rendezvous.
        dist.init_process_group(backend_for(dev), rank=rank, world_size=world_size, **kwargs)
    else:
        # A one-process group needs no rendezvous: an in-memory store is enough.
        dist.init_process_group(backend_for(dev), store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def get_info() -> DistInfo:
    """The current process's rank / world size (rank 0 of 1 when no process group exists)."""
    if dist.is_available() and dist.is_initialized():
        local = _env_int("LOCAL_RANK", 0)
        return DistInfo(dist.get_rank(), dist.get_world_size(), local)
    return DistInfo()


def is_main_process() -> bool:
    """True on global rank 0 (and in any non-distributed process)."""
    return get_info().rank == 0


def barrier() -> None:
    """Wait for every rank; no-op without a process group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    """Destroy the default process group if this process created one. All ranks meet at a barrier
    first, so no rank tears down the group (rank 0 hosts its store) while another still uses it."""
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def all_reduce_mean(value: float | torch.Tensor) -> float:
    """Average a scalar over ranks (for logging the global loss); identity without a group."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().clone().reshape(())
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.to("cpu")
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return float(t)


def torchrun_command(nproc: int, module_args: list[str], *, module: str = "torchgraft",
                     nnodes: int = 1) -> list[str]:
    """The command that re-launches `python -m <module> <module_args>` under torchrun on this machine.

    Uses `python -m torch.distributed.run` (what the `torchrun` script runs), standalone rendezvous
    (a free port on localhost) and `nproc` processes.
    """
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    if nnodes != 1:
        raise ConfigError("--nproc launches on one machine; for several nodes run torchrun yourself "
                          "(see docs/distributed.md)")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(nproc), "-m", module, *module_args]


def relaunch_with_torchrun(nproc: int, module_args: list[str]) -> int:
    """Run `torchgraft <module_args>` under torchrun with `nproc` local processes; return its exit code.

    Children inherit stdout/stderr, so every rank's error message reaches the user; the exit code
    is torchrun's (non-zero when any rank failed).
    """
    import subprocess

    cmd = torchrun_command(nproc, module_args)
    env = dict(os.environ)
    # One intra-op thread pool per process would oversubscribe the cores: split them.
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    env.setdefault("PYTHONUNBUFFERED", "1")
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 130
