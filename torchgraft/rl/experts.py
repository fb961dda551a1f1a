"""Experts: anything that maps a batch of observations (N, obs_dim) to a batch of actions.

An expert is a callable `expert(obs: np.ndarray) -> np.ndarray`. Built in:
- `"lunarlander-heuristic"`: Gymnasium's hand-written LunarLander controller
  (`gymnasium.envs.box2d.lunar_lander.heuristic`, scores ~ +200 to +250 on the calm lander);
- `"cartpole-pd"`: a PD controller on pole angle and angular velocity (plus a small cart term),
  which balances CartPole-v1 for the full 500 steps;
- `PolicyExpert(policy, normalizer)`: a trained policy (greedy by default);
- `per_observation(fn)`: any function of ONE observation becomes an expert.
`get_expert(spec, env_id)` turns a name, a run directory / checkpoint or a callable into one.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchgraft.errors import ConfigError, did_you_mean

Expert = Callable[[np.ndarray], np.ndarray]


def per_observation(fn: Callable[[np.ndarray], Any]) -> Expert:
    """Lift `fn(obs) -> action` (one observation) to a batched expert."""
    def expert(obs: np.ndarray) -> np.ndarray:
        return np.stack([np.asarray(fn(o)) for o in obs])
    expert.__name__ = getattr(fn, "__name__", "expert")
    return expert


def cartpole_pd(obs: np.ndarray) -> np.ndarray:
    """Push right when the pole falls right: sign(angle + 0.5 angular velocity + small cart terms)."""
    # obs: (N, 4) = cart position, cart velocity, pole angle, pole angular velocity
    u = obs[:, 2] + 0.5 * obs[:, 3] + 0.01 * obs[:, 0] + 0.1 * obs[:, 1]
    return (u > 0).astype(np.int64)


def lunarlander_heuristic(continuous: bool = False) -> Expert:
    """Gymnasium's LunarLander heuristic (it reads `env.unwrapped.continuous` only)."""
    from types import SimpleNamespace

    from gymnasium.envs.box2d.lunar_lander import heuristic

    fake_env = SimpleNamespace(unwrapped=SimpleNamespace(continuous=continuous))
    return per_observation(lambda s: heuristic(fake_env, s))


class PolicyExpert:
    """A trained policy as an expert: normalise, act (argmax / mean unless `deterministic=False`)."""

    def __init__(self, policy: torch.nn.Module, normalizer: Callable[[np.ndarray], np.ndarray] | None = None,
                 deterministic: bool = True):
        self.policy, self.deterministic = policy, deterministic
        self.normalizer = normalizer or (lambda o: np.asarray(o, dtype=np.float32))

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        device = next(self.policy.parameters()).device
        x = torch.as_tensor(self.normalizer(obs), device=device)
        was_training = self.policy.training
        self.policy.eval()
        action, _, _ = self.policy.act(x, deterministic=self.deterministic)
        self.policy.train(was_training)
        return action.cpu().numpy()


BUILTIN: dict[str, tuple[Callable[[], Expert], tuple[str, ...]]] = {
    # name: (factory, environment-id prefixes it is made for)
    "cartpole-pd": (lambda: cartpole_pd, ("CartPole",)),
    "lunarlander-heuristic": (lambda: lunarlander_heuristic(False), ("LunarLander",)),
    "lunarlander-continuous-heuristic": (lambda: lunarlander_heuristic(True), ("LunarLander",)),
}


def get_expert(spec: str | Path | Expert, env_id: str) -> Expert:
    """A built-in expert name, a policy run directory / checkpoint, or a callable."""
    if callable(spec):
        return spec
    name = str(spec)
    if name in BUILTIN:
        factory, envs = BUILTIN[name]
        if not env_id.startswith(envs):
            raise ConfigError(f"expert {name!r} is made for {'/'.join(envs)} environments, not {env_id!r}")
        return factory()
    if Path(name).exists():
        from torchgraft.rl.runs import load_policy_run

        run = load_policy_run(name)
        return PolicyExpert(run.policy, run.normalizer)
    raise ConfigError(f"unknown expert {name!r}" + did_you_mean(name, BUILTIN)
                      + f"; give one of {', '.join(BUILTIN)} or a trained policy's run directory")
