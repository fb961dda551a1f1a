"""A policy run on disk: its checkpoint's weights, environment and observation normaliser.

PPO checkpoints carry `meta["rl"] = {"env", "env_kwargs", "obs_norm", "algo"}`. Behaviour-cloning
runs are written by the ordinary trainer; their environment is the `env` option of the run's
`task:` section (set by `torchgraft rl bc` from the demonstrations file).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchgraft.errors import CheckpointError
from torchgraft.rl.normalize import Identity, RunningNorm, normalizer_from_state


@dataclass
class PolicyRun:
    policy: nn.Module
    env_id: str | None
    env_kwargs: dict[str, Any]
    normalizer: RunningNorm | Identity
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)


def rl_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """`{"env", "env_kwargs", "obs_norm"}` of a checkpoint's meta (PPO or behaviour cloning)."""
    if "rl" in meta:
        return meta["rl"]
    task = (meta.get("run_config") or {}).get("task")
    if isinstance(task, dict) and task.get("env"):
        return {"env": task["env"], "env_kwargs": task.get("env_kwargs") or {}, "obs_norm": None}
    return {"env": None, "env_kwargs": {}, "obs_norm": None}


def load_policy_run(path: str | Path, device: str | torch.device = "cpu") -> PolicyRun:
    """Rebuild the policy of a run directory or checkpoint folder (manifest verified)."""
    from torchgraft.checkpoint.artifact import read_artifact_checkpoint, resolve
    from torchgraft.checkpoint.model import model_from_checkpoint

    a = resolve(path)  # what the path is, as for every command
    if a.kind not in ("run", "checkpoint"):
        raise CheckpointError(f"{a.what}; rl commands need the run directory or checkpoint of a policy "
                              "(rl bc / rl ppo)")
    ck = read_artifact_checkpoint(a)
    m = ck.meta.get("model") or {}
    if m.get("family") != "policy":
        raise CheckpointError(f"{a.what} of a {m.get('name') or m.get('family') or 'unregistered'} model, not "
                              "a registered policy; rl commands need a policy run (rl bc / rl ppo), or load "
                              "your own ActorCritic and pass it in Python")
    policy = model_from_checkpoint(ck, device)
    rl = rl_meta(ck.meta)
    return PolicyRun(policy, rl.get("env"), dict(rl.get("env_kwargs") or {}),
                     normalizer_from_state(rl.get("obs_norm")), ck.path, ck.meta)
