"""Behaviour cloning: a Task for the ordinary trainer, scored by the cloned policy's return in the game.

Batch: {"obs": (B, obs_dim) float, "actions": (B,) long | (B, A) float} (the `demonstrations` dataset).
Loss: the negative log-likelihood of the expert's actions under the policy's action distribution
(cross-entropy for discrete actions; Gaussian NLL, learning the log-std too, for continuous ones).
Evaluation: val_loss, val_accuracy (discrete) or val_action_mse (continuous) on held-out episodes,
and, from `extra_metrics`, `val_return` (mean over `episodes` seeded episodes with greedy actions),
`val_return_std`, `val_return_min` — accuracy alone says little about how the policy plays, since
one wrong action at the wrong time can crash the lander.

Config: `task: {name: bc, env: LunarLander-v3, env_kwargs: {}, episodes: 10, seed: 10000}`
(`torchgraft rl bc` fills `env` from the demonstrations file). The policy must be a
`torchgraft.models.policy.Policy` (a preset, or any module wrapped in `ActorCritic`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchgraft.errors import ConfigError
from torchgraft.train.tasks import Task, register_task


class BehaviourCloningTask(Task):
    name = "bc"
    unit = "samples"
    default_metric = "val_return"

    def __init__(self, env: str | None = None, env_kwargs: dict[str, Any] | None = None,
                 episodes: int = 10, seed: int = 10_000):
        if episodes < 0:
            raise ConfigError(f"task.episodes must be >= 0, got {episodes}")
        if env is not None:
            from torchgraft.rl.envs import check_env_id

            check_env_id(env)
        self.env, self.env_kwargs, self.episodes, self.seed = env, dict(env_kwargs or {}), episodes, seed
        self.default_metric = "val_return" if env and episodes else "val_loss"

    @staticmethod
    def _policy(model: nn.Module) -> Any:
        inner = getattr(model, "_orig_mod", model)  # torch.compile keeps the module here
        if not hasattr(inner, "evaluate") or not hasattr(inner, "dist_from_params"):
            raise ConfigError(f"task 'bc' needs a policy (torchgraft.models.policy.Policy), got "
                              f"{type(inner).__name__}; wrap your module in ActorCritic")
        return inner

    def count(self, batch: dict[str, Any]) -> torch.Tensor:
        return torch.tensor(len(batch["actions"]), device=batch["actions"].device)

    def _dist(self, model: nn.Module, batch: dict[str, Any]) -> Any:
        policy = self._policy(model)
        params, _ = policy.split(model(batch["obs"]))  # (B, P)
        return policy, params, policy.dist_from_params(params.float())

    def loss_sum(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        _, _, dist = self._dist(model, batch)
        return -dist.log_prob(batch["actions"]).sum()

    def eval_sums(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        policy, params, dist = self._dist(model, batch)
        actions = batch["actions"]
        sums = {"loss": -dist.log_prob(actions).double().sum(),
                "count": torch.tensor(len(actions), device=actions.device)}
        if policy.discrete:
            sums["correct"] = (params.argmax(-1) == actions).sum()
        else:
            mean = params.chunk(2, dim=-1)[0]
            sums["sq_err"] = (mean.float() - actions).pow(2).mean(-1).double().sum()
        return sums

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(1.0, sums["count"])
        out = {"val_loss": sums["loss"] / n}
        if "correct" in sums:
            out["val_accuracy"] = sums["correct"] / n
        if "sq_err" in sums:
            out["val_action_mse"] = sums["sq_err"] / n
        return out

    def extra_metrics(self, model: nn.Module) -> dict[str, float]:
        """The cloned policy's return over `episodes` seeded episodes (greedy actions)."""
        if not self.env or not self.episodes:
            return {}
        from torchgraft.rl.evaluate import evaluate
        from torchgraft.rl.experts import PolicyExpert

        res = evaluate(PolicyExpert(self._policy(model)), self.env, episodes=self.episodes, seed=self.seed,
                       env_kwargs=self.env_kwargs)
        return {"val_return": res.mean_return, "val_return_std": res.std_return,
                "val_return_min": res.min_return}

    def higher_is_better(self, metric: str) -> bool:
        return super().higher_is_better(metric) and "mse" not in metric

    def num_samples(self, batch: dict[str, Any]) -> int:
        return len(batch["actions"])


register_task("bc", BehaviourCloningTask)


def run_bc(config: str | Any, out_dir: str | Any, overrides: list[str] | dict[str, Any] | None = None, *,
           demos: str | None = None, resume: bool = False) -> Any:
    """Behaviour cloning through the normal trainer.

    `config` is a run config (YAML path or mapping) whose `data:` is a `demonstrations` dataset;
    `demos` replaces `data.path`. The policy (`model:`, default `policy-mlp`) is sized from the
    demonstrations' spaces and `task:` defaults to `{name: bc, env: <the file's environment>}`;
    a `task.env` that differs from the file's environment is an error.
    """
    from pathlib import Path

    from torchgraft.config import apply_overrides, load_yaml
    from torchgraft.data.registry import build_data
    from torchgraft.models.registry import build
    from torchgraft.rl.demonstrations import load_demonstrations
    from torchgraft.rl.envs import check_policy_fits, env_space_info
    from torchgraft.train.config import load_run_config
    from torchgraft.train.trainer import Trainer

    tree = dict(config) if isinstance(config, dict) else load_yaml(config)
    if overrides:
        tree = apply_overrides(tree, overrides)
    data = dict(tree.get("data") or {"name": "demonstrations"})
    if demos is not None:
        data["path"] = str(demos)
    if data.get("name") != "demonstrations" or not data.get("path"):
        raise ConfigError("behaviour cloning needs `data: {name: demonstrations, path: FILE}` (or --demos FILE)")
    file = load_demonstrations(data["path"])
    task = tree.get("task") or {"name": "bc"}
    task = {"name": task} if isinstance(task, str) else dict(task)
    if task.get("env") is not None:
        file.check_env(task["env"], "task.env")
    task.setdefault("env", file.env_id)
    task.setdefault("env_kwargs", file.env_kwargs)
    tree["data"], tree["task"] = data, task
    tree.setdefault("model", {"name": "policy-mlp"})
    cfg = load_run_config(tree)
    bundle = build_data(cfg.data, cfg.trainer.seed)
    info = env_space_info(task["env"], task["env_kwargs"])
    model = build({**cfg.model, "obs_dim": info.obs_dim, "action_dim": info.action_dim,
                   "discrete": info.discrete})
    check_policy_fits(model, info, task["env"])
    # one process: behaviour cloning's policies are small (rl sits below recipes, which choose engines)
    return Trainer(cfg, Path(out_dir), model=model, data=bundle).fit(resume=resume)
