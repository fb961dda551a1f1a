"""Gymnasium environments: make one or a vector of them, describe their spaces, check a policy fits.

Every bad input fails with one ConfigError line: an unknown id names the close registered ids, a
space no policy here handles (dicts, tuples, multi-discrete) is named, and a policy whose
observation/action sizes differ from the environment's says which and how to adapt it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from torchgraft.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class SpaceInfo:
    """What a policy must match: flattened observation size, action count/size, action kind."""
    obs_dim: int
    action_dim: int
    discrete: bool
    action_low: np.ndarray | None = None   # continuous only: the action bounds (actions are clipped)
    action_high: np.ndarray | None = None

    def describe(self) -> str:
        kind = f"{self.action_dim} discrete actions" if self.discrete else f"{self.action_dim}-d continuous actions"
        return f"observations of size {self.obs_dim}, {kind}"


def check_env_id(env_id: str) -> None:
    """ConfigError (naming close ids) unless `env_id` is registered with Gymnasium."""
    import gymnasium as gym

    if env_id not in gym.registry:
        raise ConfigError(f"unknown environment {env_id!r}" + did_you_mean(env_id, gym.registry.keys())
                          + "; see gymnasium.pprint_registry() for the list")


def make_env(env_id: str, env_kwargs: dict[str, Any] | None = None, render_mode: str | None = None) -> Any:
    """One Gymnasium environment (`env_kwargs`, e.g. `{"enable_wind": True}`, go to `gym.make`)."""
    import gymnasium as gym

    check_env_id(env_id)
    try:
        return gym.make(env_id, render_mode=render_mode, **(env_kwargs or {}))
    except TypeError as e:  # an option the environment does not take
        raise ConfigError(f"environment {env_id!r} rejected env_kwargs {env_kwargs}: {e}") from None


def make_vector_env(env_id: str, num_envs: int, env_kwargs: dict[str, Any] | None = None) -> Any:
    """`num_envs` copies in one process (SyncVectorEnv; on a few cores the step is cheaper than IPC).

    Autoreset is SAME_STEP: when an episode ends, the returned observation is already the next
    episode's first one and the last one is in `info["final_obs"]` (needed to bootstrap truncations).
    """
    import gymnasium as gym

    if num_envs < 1:
        raise ConfigError(f"num_envs must be >= 1, got {num_envs}")
    check_env_id(env_id)
    kwargs = dict(env_kwargs or {})
    return gym.vector.SyncVectorEnv([lambda: gym.make(env_id, **kwargs) for _ in range(num_envs)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def space_info(observation_space: Any, action_space: Any, env_id: str = "the environment") -> SpaceInfo:
    """SpaceInfo of Box observations and Discrete/Box actions; ConfigError for anything else."""
    from gymnasium import spaces

    if not isinstance(observation_space, spaces.Box):
        raise ConfigError(f"{env_id} has {type(observation_space).__name__} observations; policies here "
                          f"take Box (vector) observations: flatten them with gymnasium.wrappers.FlattenObservation")
    obs_dim = int(np.prod(observation_space.shape))
    if isinstance(action_space, spaces.Discrete):
        return SpaceInfo(obs_dim, int(action_space.n), True)
    if isinstance(action_space, spaces.Box) and len(action_space.shape) == 1:
        return SpaceInfo(obs_dim, int(action_space.shape[0]), False,
                         action_space.low.astype(np.float32), action_space.high.astype(np.float32))
    raise ConfigError(f"{env_id} has a {type(action_space).__name__}{getattr(action_space, 'shape', '')} "
                      f"action space; policies here handle Discrete or 1-d Box actions")


def env_space_info(env_id: str, env_kwargs: dict[str, Any] | None = None) -> SpaceInfo:
    env = make_env(env_id, env_kwargs)
    try:
        return space_info(env.observation_space, env.action_space, env_id)
    finally:
        env.close()


def check_policy_fits(policy: Any, info: SpaceInfo, env_id: str) -> None:
    """ConfigError naming the difference when `policy` cannot act in an environment with `info`."""
    have = f"observations of size {policy.obs_dim}, " + (
        f"{policy.action_dim} discrete actions" if policy.discrete else f"{policy.action_dim}-d continuous actions")
    fits = (policy.obs_dim == info.obs_dim and policy.action_dim == info.action_dim
            and policy.discrete == info.discrete)
    if not fits:
        hint = ("adapt its input layer with torchgraft.rl.transfer_policy (or `--init-from` of a run, which "
                "does it)" if policy.obs_dim != info.obs_dim and policy.action_dim == info.action_dim
                and policy.discrete == info.discrete else "build a policy for this environment")
        raise ConfigError(f"the policy takes {have} but {env_id} has {info.describe()}; {hint}")


def to_env_action(action: np.ndarray, info: SpaceInfo) -> np.ndarray:
    """Policy actions -> what `env.step` takes (ints for Discrete, clipped floats for Box)."""
    if info.discrete:
        return action.astype(np.int64)
    return np.clip(action, info.action_low, info.action_high).astype(np.float32)
