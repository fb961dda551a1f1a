"""Demonstrations: run an expert for N seeded episodes into one file, and read it back as a dataset.

File contents (safetensors, or .npz read without pickle):
    observations (S, obs_dim) float32   the observation each action was taken in
    actions      (S,) int64 | (S, A) float32
    rewards      (S,) float32
    episode_starts (E + 1,) int64       episode e is rows [episode_starts[e], episode_starts[e+1])
    episode_returns (E,) float64
metadata: format, env id, env kwargs (JSON), expert name, episodes, seed, expert mean/std return.

The `demonstrations` dataset (`data: {name: demonstrations, path: demos.safetensors}`) splits by
whole episodes (the last `val_fraction` of them are validation) and feeds the `bc` task.
"""
from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchgraft.config import from_dict
from torchgraft.data.loader import DictTensorDataset
from torchgraft.data.registry import DataBundle, register_dataset
from torchgraft.errors import ConfigError
from torchgraft.rl.envs import env_space_info, make_vector_env, to_env_action
from torchgraft.rl.experts import Expert

FORMAT = "torchgraft-demonstrations/1"
_ARRAYS = ("observations", "actions", "rewards", "episode_starts", "episode_returns")


@dataclass
class Demonstrations:
    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    episode_starts: np.ndarray
    episode_returns: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def env_id(self) -> str:
        return self.metadata["env"]

    @property
    def env_kwargs(self) -> dict[str, Any]:
        return dict(self.metadata.get("env_kwargs") or {})

    @property
    def episodes(self) -> int:
        return len(self.episode_returns)

    def check_env(self, env_id: str, where: str = "this run") -> None:
        """ConfigError when the file was recorded on another environment."""
        if env_id != self.env_id:
            raise ConfigError(f"the demonstrations were recorded on {self.env_id!r}, but {where} uses "
                              f"{env_id!r}; collect demonstrations for {env_id!r} (torchgraft rl collect)")


def collect(expert: Expert, env_id: str, *, episodes: int, seed: int = 0,
            env_kwargs: dict[str, Any] | None = None, expert_name: str = "expert",
            num_envs: int = 8) -> Demonstrations:
    """Run `expert` for `episodes` episodes (seeds seed, seed+1, ...) and keep every transition."""
    if episodes < 1:
        raise ConfigError(f"episodes must be >= 1, got {episodes}")
    info = env_space_info(env_id, env_kwargs)
    per_episode: list[tuple[list, list, list]] = []
    for start in range(0, episodes, num_envs):
        n = min(num_envs, episodes - start)
        envs = make_vector_env(env_id, n, env_kwargs)
        try:
            obs, _ = envs.reset(seed=[seed + start + i for i in range(n)])
            eps: list[tuple[list, list, list]] = [([], [], []) for _ in range(n)]
            running = np.ones(n, dtype=bool)
            while running.any():
                action = np.asarray(expert(obs))
                next_obs, reward, term, trunc, _ = envs.step(to_env_action(action, info))
                for i in np.nonzero(running)[0]:
                    eps[i][0].append(obs[i])
                    eps[i][1].append(action[i])
                    eps[i][2].append(reward[i])
                running &= ~(term | trunc)
                obs = next_obs
        finally:
            envs.close()
        per_episode += eps
    lengths = [len(e[0]) for e in per_episode]
    returns = np.array([float(np.sum(e[2], dtype=np.float64)) for e in per_episode])
    act_dtype = np.int64 if info.discrete else np.float32
    demos = Demonstrations(
        observations=np.concatenate([np.asarray(e[0], dtype=np.float32).reshape(len(e[0]), -1) for e in per_episode]),
        actions=np.concatenate([np.asarray(e[1], dtype=act_dtype) for e in per_episode]),
        rewards=np.concatenate([np.asarray(e[2], dtype=np.float32) for e in per_episode]),
        episode_starts=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        episode_returns=returns,
        metadata={"format": FORMAT, "env": env_id, "env_kwargs": dict(env_kwargs or {}), "expert": expert_name,
                  "episodes": episodes, "seed": seed, "expert_mean_return": float(returns.mean()),
                  "expert_std_return": float(returns.std()), "obs_dim": info.obs_dim,
                  "action_dim": info.action_dim, "discrete": info.discrete})
    return demos


def save_demonstrations(demos: Demonstrations, path: str | Path) -> Path:
    """Write `.safetensors` or `.npz` atomically (temp file + fsync + rename)."""
    from torchgraft.io import atomic_write_bytes

    path = Path(path)
    arrays = {k: np.ascontiguousarray(getattr(demos, k)) for k in _ARRAYS}
    if path.suffix == ".safetensors":
        from safetensors.numpy import save

        meta = {k: json.dumps(v) for k, v in demos.metadata.items()}
        data = save(arrays, metadata=meta)
    elif path.suffix == ".npz":
        buf = io.BytesIO()
        np.savez(buf, **arrays, metadata=np.array(json.dumps(demos.metadata)))
        data = buf.getvalue()
    else:
        raise ConfigError(f"demonstrations file must end in .safetensors or .npz, got {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return path


def load_demonstrations(path: str | Path) -> Demonstrations:
    """Read a file written by `save_demonstrations` (no pickle: npz is opened with allow_pickle=False)."""
    from torchgraft.outputs import check_input_file

    path = check_input_file(path, "demonstrations file", "write one with torchgraft rl collect")
    if path.suffix == ".npz" and not zipfile.is_zipfile(path):  # np.load would try to unpickle it
        raise ConfigError(f"cannot read demonstrations {path}: it is not an .npz archive (an .npz file is a zip "
                          "of arrays); give a demonstrations file written by torchgraft rl collect")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                raw_meta = f.metadata() or {}
                arrays = {k: f.get_tensor(k) for k in f.keys()}
            meta = {k: json.loads(v) for k, v in raw_meta.items()}
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files if k != "metadata"}
                meta = json.loads(str(z["metadata"])) if "metadata" in z.files else {}
        else:
            raise ConfigError(f"demonstrations file must end in .safetensors or .npz, got {path.name}")
    except ConfigError:
        raise
    except Exception as e:  # a truncated / foreign file: one line, no traceback
        raise ConfigError(f"cannot read demonstrations {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    missing = [k for k in _ARRAYS if k not in arrays]
    if meta.get("format") != FORMAT or missing:
        raise ConfigError(f"{path} is not a torchgraft demonstrations file"
                          + (f" (missing {', '.join(missing)})" if missing else ""))
    return Demonstrations(**{k: arrays[k] for k in _ARRAYS}, metadata=meta)


# ------------------------------------------------------------------------------------ dataset

@dataclass
class DemonstrationsConfig:
    path: str = ""
    val_fraction: float = 0.1          # share of whole episodes held out (at least one when > 0)
    env: str | None = None             # when set, the file must have been recorded on this env


def build_demonstrations(options: dict[str, Any], seed: int = 0) -> DataBundle:
    """`data: {name: demonstrations, path: ...}` -> batches {"obs": (B, D), "actions": (B,) | (B, A)}."""
    cfg = from_dict(DemonstrationsConfig, options, prefix="data")
    if not cfg.path:
        raise ConfigError("data.path is required: the demonstrations file (torchgraft rl collect --out ...)")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
    demos = load_demonstrations(cfg.path)
    if cfg.env is not None:
        demos.check_env(cfg.env, "data.env")
    n_val = 0 if cfg.val_fraction == 0 else max(1, round(demos.episodes * cfg.val_fraction))
    if n_val >= demos.episodes:
        raise ConfigError(f"{cfg.path} has {demos.episodes} episode(s): too few to hold out "
                          f"{n_val} for validation; collect more or set data.val_fraction=0")
    cut = int(demos.episode_starts[demos.episodes - n_val])
    obs = torch.from_numpy(demos.observations)
    actions = torch.from_numpy(demos.actions)
    train = DictTensorDataset(obs=obs[:cut], actions=actions[:cut])
    val = DictTensorDataset(obs=obs[cut:], actions=actions[cut:]) if n_val else None
    m = demos.metadata
    return DataBundle(train=train, val=val, task="bc",
                      info={"env": demos.env_id, "env_kwargs": demos.env_kwargs, "obs_dim": m["obs_dim"],
                            "action_dim": m["action_dim"], "discrete": m["discrete"],
                            "expert_mean_return": m["expert_mean_return"], "episodes": demos.episodes})


register_dataset("demonstrations", build_demonstrations)
