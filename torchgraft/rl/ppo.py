"""PPO (clipped surrogate objective, GAE, value loss, entropy bonus, KL early stop) on Gymnasium vector envs.

Not a supervised loop, so it has its own algorithm (`collect`, `learn_from`, GAE, the loss), but
its run directory is the trainer's `torchgraft.train.run.Run`: one writer per `--out` (the lock),
the trainer's resume rules (with PPO's fixed keys), config.yaml written only for what runs,
metrics.jsonl + TensorBoard (so `torchgraft plot` draws episode return, length, KL, clip fraction
and explained variance), result.json, and a `CheckpointManager` whose entries are the policy,
the optimizer, the counters (`PPOState`), the RNG and the observation normaliser. `step` in logs
and checkpoint names is the number of environment steps.

Exact resume. Gymnasium environments cannot be saved, so the run makes its environment state a
function of the update number instead: at every checkpoint boundary (update % checkpoint.every == 0,
and at update 0) all environments are reset with seeds derived from (seed, update, env index).
A checkpoint is written at such a boundary and holds weights, optimizer moments, RNG state (actions
and minibatch order are drawn from the global torch generator), observation-normaliser statistics
and counters; so N updates in one go and N/2 + kill + resume + N/2 produce identical weights. The
price is that episodes running at a boundary are cut there (their last value is bootstrapped, so
the advantage estimate stays unbiased).

Starting from a cloned policy (`init_from`), `value_warmup_updates` first trains only the critic on
the cloned actor's own rollouts: a fresh critic's random advantages would otherwise push a good
actor away from what it learned before the critic knows anything.
"""
from __future__ import annotations

import collections
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torchgraft.config import apply_overrides, from_dict, load_yaml, to_dict
from torchgraft.errors import ConfigError
from torchgraft.io import atomic_write_text
from torchgraft.rl.envs import SpaceInfo, check_policy_fits, env_space_info, make_vector_env, to_env_action
from torchgraft.rl.evaluate import evaluate
from torchgraft.rl.experts import PolicyExpert
from torchgraft.rl.normalize import Identity, RunningNorm
from torchgraft.checkpoint.layout import SingleFileLayout
from torchgraft.checkpoint.manager import CheckpointManager, RNGState
from torchgraft.train.cadence import every
from torchgraft.train.run import ResumeRules, Run


# ------------------------------------------------------------------------------------ config

@dataclass
class EnvConfig:
    id: str = "CartPole-v1"
    kwargs: dict[str, Any] = field(default_factory=dict)   # passed to gym.make, e.g. enable_wind: true
    num_envs: int = 8


@dataclass
class PPOConfig:
    total_steps: int = 100_000          # environment steps (all envs together)
    rollout_steps: int = 128            # steps per env per update
    epochs: int = 4                     # passes over each rollout
    minibatches: int = 4                # per epoch
    lr: float = 2.5e-4
    anneal_lr: bool = True              # linear decay to 0 over the run
    gamma: float = 0.99
    reward_scale: float = 1.0           # rewards are multiplied by this for learning (LunarLander: 0.01)
    gae_lambda: float = 0.95
    clip: float = 0.2                   # policy ratio clip
    clip_value: float | None = None     # clip the value update around the old values (None = off)
    value_coef: float = 0.5
    entropy_coef: float = 0.0
    max_grad_norm: float = 0.5
    target_kl: float | None = None      # stop an update's epochs once approx KL > 1.5 * target_kl
    normalize_advantages: bool = True
    normalize_obs: bool = False         # running mean/std of observations, saved in the checkpoint
    value_warmup_updates: int = 0       # train only the critic for this many updates (after BC)
    init_from: str | None = None        # a run dir / checkpoint of a policy (e.g. behaviour cloning)
    seed: int = 0
    device: str = "cpu"


@dataclass
class PPOEvalConfig:
    every: int = 10                     # updates; 0 = only at the end
    episodes: int = 10
    seed: int = 10_000                  # evaluation episodes use seeds seed, seed+1, ...
    target_return: float | None = None  # stop once the evaluation mean return reaches this (confirmed
    #                                     on the held-out seeds when there are some)
    heldout_seeds: list[int] = field(default_factory=list)  # after training: `episodes` episodes from
    #                                     each seed (seed, seed+1, ...), none of them an evaluation seed


@dataclass
class PPOCheckpointConfig:
    every: int = 10                     # updates; also where environments are re-seeded
    keep_last: int = 2


@dataclass
class PPOLoggingConfig:
    every: int = 1                      # updates
    tensorboard: bool = True
    progress: bool = True


@dataclass
class PPORunConfig:
    model: dict[str, Any] = field(default_factory=lambda: {"name": "policy-mlp"})
    env: EnvConfig = field(default_factory=EnvConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: PPOEvalConfig = field(default_factory=PPOEvalConfig)
    checkpoint: PPOCheckpointConfig = field(default_factory=PPOCheckpointConfig)
    logging: PPOLoggingConfig = field(default_factory=PPOLoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def load_ppo_config(source: str | Path | dict[str, Any] | PPORunConfig,
                    overrides: list[str] | dict[str, Any] | None = None) -> PPORunConfig:
    """A validated PPORunConfig from YAML / mapping / config plus dotted `key=value` overrides."""
    tree = source.to_dict() if isinstance(source, PPORunConfig) else (
        dict(source) if isinstance(source, dict) else load_yaml(source))
    if overrides:
        tree = apply_overrides(tree, overrides)
    cfg = from_dict(PPORunConfig, tree)
    p = cfg.ppo
    for key in ("total_steps", "rollout_steps", "epochs", "minibatches"):
        if getattr(p, key) < 1:
            raise ConfigError(f"ppo.{key} must be >= 1, got {getattr(p, key)}")
    for key, value in (("env.num_envs", cfg.env.num_envs), ("eval.episodes", cfg.eval.episodes)):
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if (cfg.env.num_envs * p.rollout_steps) % p.minibatches:
        raise ConfigError(f"env.num_envs * ppo.rollout_steps = {cfg.env.num_envs * p.rollout_steps} must be "
                          f"divisible by ppo.minibatches={p.minibatches}")
    for key, value, ok, need in (("gamma", p.gamma, 0 < p.gamma <= 1, "in (0, 1] (e.g. 0.99)"),
                                 ("gae_lambda", p.gae_lambda, 0 <= p.gae_lambda <= 1, "in [0, 1] (e.g. 0.95)"),
                                 ("clip", p.clip, p.clip > 0, "> 0 (e.g. 0.2)"),
                                 ("lr", p.lr, math.isfinite(p.lr) and p.lr > 0, "a finite number > 0 (e.g. 3e-4)")):
        if not ok:
            raise ConfigError(f"ppo.{key}={value:g} is invalid: it must be {need}")
    e = cfg.eval
    own = range(e.seed, e.seed + e.episodes)
    for s in e.heldout_seeds:
        if any(x in own for x in range(s, s + e.episodes)):
            raise ConfigError(f"eval.heldout_seeds: seed {s} ({e.episodes} episodes: {s}..{s + e.episodes - 1}) "
                              f"overlaps the evaluation seeds {e.seed}..{e.seed + e.episodes - 1}; choose seeds "
                              "the run never evaluates on")
    if cfg.checkpoint.every < 0 or cfg.eval.every < 0 or cfg.logging.every < 1:
        raise ConfigError("checkpoint.every and eval.every must be >= 0, logging.every >= 1")
    return cfg


# ------------------------------------------------------------------------------------ GAE / loss

def compute_gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, last_value: torch.Tensor,
                gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over a rollout.

    rewards, values, dones: (T, N); `dones[t]` = the episode ended at step t (its next value is
    not used; truncations should already have gamma * V(final obs) added to rewards[t]);
    last_value: (N,) value of the observation after the last step. Returns (advantages, returns),
    both (T, N), with returns = advantages + values (the value targets).
    """
    T = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(last_value)
    next_value = last_value
    for t in reversed(range(T)):
        keep = 1.0 - dones[t].float()
        delta = rewards[t] + gamma * next_value * keep - values[t]
        next_adv = delta + gamma * lam * keep * next_adv
        adv[t] = next_adv
        next_value = values[t]
    return adv, adv + values


def ppo_loss(policy: nn.Module, batch: dict[str, torch.Tensor], *, clip: float, value_coef: float,
             entropy_coef: float, clip_value: float | None = None, value_only: bool = False
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate + value loss - entropy bonus on one minibatch; (loss, detached stats).

    batch: obs (B, D), actions (B,) or (B, A), logprobs (B,), advantages (B,), returns (B,), values (B,).
    `value_only=True` is the critic warm-up: the loss is the value term alone.
    """
    logp, entropy, value = policy.evaluate(batch["obs"], batch["actions"])
    log_ratio = logp - batch["logprobs"]
    ratio = log_ratio.exp()
    adv = batch["advantages"]
    pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)).mean()
    if clip_value is None:
        v_loss = 0.5 * (value - batch["returns"]).pow(2).mean()
    else:
        v_clipped = batch["values"] + (value - batch["values"]).clamp(-clip_value, clip_value)
        v_loss = 0.5 * torch.max((value - batch["returns"]).pow(2), (v_clipped - batch["returns"]).pow(2)).mean()
    ent = entropy.mean()
    loss = value_coef * v_loss if value_only else pg + value_coef * v_loss - entropy_coef * ent
    with torch.no_grad():
        stats = {"policy_loss": pg.detach(), "value_loss": v_loss.detach(), "entropy": ent.detach(),
                 "approx_kl": ((ratio - 1) - log_ratio).mean(),  # the low-variance k3 estimator
                 "clip_fraction": ((ratio - 1).abs() > clip).float().mean()}
    return loss, stats


def explained_variance(pred: torch.Tensor, target: torch.Tensor) -> float:
    """1 - Var[target - pred] / Var[target] (1 = perfect value function, 0 = no better than a constant)."""
    var = target.var()
    return float("nan") if var == 0 else float(1 - (target - pred).var() / var)


def value_parameters(policy: nn.Module) -> list[nn.Parameter]:
    """Parameters only the value estimate uses (trained during the critic warm-up)."""
    names = ("value_trunk.", "value_head.", "critic.")
    return [p for n, p in policy.named_parameters() if n.startswith(names)]


# ------------------------------------------------------------------------------------ result

@dataclass
class PPOResult:
    run_dir: Path
    updates: int
    env_steps: int
    metrics: dict[str, float]               # last evaluation
    steps_to_target: int | None             # env steps when eval mean return first reached the target
    best: dict[str, Any]
    elapsed_s: float
    policy: nn.Module = field(repr=False)
    heldout: dict[str, Any] = field(default_factory=dict)  # the final policy on eval.heldout_seeds

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "updates": self.updates, "env_steps": self.env_steps,
                "metrics": self.metrics, "steps_to_target": self.steps_to_target, "best": self.best,
                "heldout": self.heldout, "elapsed_s": self.elapsed_s}


def check_policy_section(section: dict[str, Any]) -> None:
    """`model:` of a PPO run must be a policy (its sizes come from the environment)."""
    from torchgraft.models.registry import get_preset

    name, family = section.get("name"), section.get("family")
    fam = family if family is not None else (get_preset(name).family if name is not None else None)
    if fam not in (None, "policy"):
        raise ConfigError(f"model {'name' if family is None else 'family'}={name or family!r} is a {fam} model; "
                          "rl ppo trains a policy: use model.name=policy-mlp (`torchgraft models` lists "
                          "the policy presets)")


# what a PPO resume cannot change: the policy, the environment (and how many copies run: num_envs
# sets the rollout's shape and the reset seeds), the seed and what each rollout holds
PPO_FIXED_PREFIXES = ("model.", "env.")
PPO_FIXED_KEYS = ("ppo.seed", "ppo.rollout_steps", "ppo.normalize_obs", "ppo.init_from")
PPO_RESUME_RULES = ResumeRules(PPO_FIXED_PREFIXES, PPO_FIXED_KEYS, init_key="ppo.init_from")


@dataclass
class PPOState:
    """PPO's counters (the `counters` entry of its checkpoints)."""

    update: int = 0
    env_steps: int = 0
    recent_returns: collections.deque = field(default_factory=lambda: collections.deque(maxlen=20))
    recent_lengths: collections.deque = field(default_factory=lambda: collections.deque(maxlen=20))
    best_value: float | None = None
    best_step: int | None = None
    steps_to_target: int | None = None  # env steps when the eval mean return first reached the target
    last_eval: dict[str, float] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {"update": self.update, "env_steps": self.env_steps, "recent_returns": list(self.recent_returns),
                "recent_lengths": list(self.recent_lengths), "best_value": self.best_value,
                "best_step": self.best_step, "steps_to_target": self.steps_to_target, "last_eval": self.last_eval}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.update, self.env_steps = int(state["update"]), int(state["env_steps"])
        self.recent_returns.clear()
        self.recent_returns.extend(state["recent_returns"])
        self.recent_lengths.clear()
        self.recent_lengths.extend(state["recent_lengths"])
        self.best_value, self.best_step = state["best_value"], state["best_step"]
        self.steps_to_target, self.last_eval = state["steps_to_target"], dict(state["last_eval"])


def upgrade_flat_state(ck: Any) -> dict[str, Any] | None:
    """The entries of a PPO checkpoint of an earlier version, whose trainer_state.json held the
    counters and the RNG's JSON part side by side and the normaliser only in meta.json."""
    ts = ck.trainer_state or {}
    if "counters" in ts or "update" not in ts:
        return None
    counters = {k: ts[k] for k in PPOState().state_dict()}
    return {"counters": counters, "rng": ts["rng"], "obs_norm": (ck.meta.get("rl") or {}).get("obs_norm") or {}}


def _env_seeds(seed: int, update: int, n: int) -> list[int]:
    """Reset seeds of the n environments at a boundary `update` (distinct per run seed and update)."""
    base = (seed * 1_000_003 + update * 7_919) % (2**31 - n)
    return [base + i for i in range(n)]


# ------------------------------------------------------------------------------------ trainer

class PPOTrainer:
    def __init__(self, cfg: PPORunConfig | dict | str | Path, out_dir: str | Path, *,
                 policy: nn.Module | None = None):
        self.cfg = cfg if isinstance(cfg, PPORunConfig) else load_ppo_config(cfg)
        c, p = self.cfg, self.cfg.ppo
        self.run_dir = Path(out_dir)
        self.device = torch.device(p.device)
        torch.manual_seed(p.seed)
        np.random.seed(p.seed % 2**32)
        self.info: SpaceInfo = env_space_info(c.env.id, c.env.kwargs)
        self.init_report = None
        self.policy = policy if policy is not None else self.build_policy()
        check_policy_fits(self.policy, self.info, c.env.id)
        self.policy.to(self.device).train()
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=p.lr, eps=1e-5)
        self.normalizer: RunningNorm | Identity = RunningNorm(self.info.obs_dim) if p.normalize_obs else Identity()
        if self.init_norm_state is not None and p.normalize_obs:
            self.normalizer.load_state_dict(self.init_norm_state)
        self.batch_size = c.env.num_envs * p.rollout_steps
        self.num_updates = max(1, p.total_steps // self.batch_size)
        self.state = PPOState()
        # checkpoints at every `checkpoint.every` updates (named by env steps), where envs are re-seeded
        self.ckpt = CheckpointManager(
            self.run_dir / "checkpoints", {"model": self.policy, "optimizer": self.optimizer, "counters": self.state,
                                           "rng": RNGState(), "obs_norm": self.normalizer},
            SingleFileLayout(), every=c.checkpoint.every * self.batch_size, keep_last=c.checkpoint.keep_last,
            meta=self.meta, upgrade=upgrade_flat_state)
        self.run = Run(self.run_dir, c.to_dict(), self.ckpt, rules=PPO_RESUME_RULES)

    @property
    def update(self) -> int:
        return self.state.update

    @property
    def env_steps(self) -> int:
        return self.state.env_steps

    # ---- model
    init_norm_state: dict[str, Any] | None = None

    def build_policy(self) -> nn.Module:
        """The `model:` preset sized for the environment; `ppo.init_from` weights moved in (input adapted)."""
        from torchgraft.models.registry import build
        from torchgraft.rl.runs import load_policy_run
        from torchgraft.rl.transfer import transfer_policy

        check_policy_section(self.cfg.model)
        spec = {**self.cfg.model, "obs_dim": self.info.obs_dim, "action_dim": self.info.action_dim,
                "discrete": self.info.discrete}
        init = self.cfg.ppo.init_from
        if init:
            src = load_policy_run(init)
            if src.policy.action_dim != self.info.action_dim or src.policy.discrete != self.info.discrete:
                check_policy_fits(src.policy, self.info, self.cfg.env.id)  # observations may differ, actions not
            # keep the source's architecture (hidden sizes, shared trunk); sizes come from this env
            spec = {**(src.meta.get("model") or {}).get("config", {}), **{k: v for k, v in spec.items() if k != "name"}}
            spec = {"family": "policy", **{k: v for k, v in spec.items() if k != "family"}}
            policy = build(spec)
            self.init_report = transfer_policy(src.policy, policy)
            bad = self.init_report.mismatched + self.init_report.missing
            if bad:
                raise ConfigError(f"ppo.init_from={init}: {len(bad)} tensors do not fit ({bad[0]}, ...); "
                                  f"the source policy must have the same hidden sizes")
            if isinstance(src.normalizer, RunningNorm) and src.normalizer.size == self.info.obs_dim:
                self.init_norm_state = src.normalizer.state_dict()
            return policy
        try:
            return build(spec)
        except ConfigError as e:
            raise ConfigError(f"model section: {e}") from None

    # ---- checkpoints
    def meta(self) -> dict[str, Any]:
        """meta.json of a checkpoint: the policy, what it was trained on and how to feed it."""
        from torchgraft import __version__
        from torchgraft.train.trainer import model_meta

        return {"model": model_meta(self.policy), "update": self.state.update, "metrics": self.state.last_eval,
                "run_config": self.cfg.to_dict(), "task": "ppo",
                "rl": {"algo": "ppo", "env": self.cfg.env.id, "env_kwargs": self.cfg.env.kwargs,
                       "obs_norm": self.normalizer.state_dict() or None},
                "torchgraft_version": __version__}

    def restore(self) -> bool:
        """Load the newest good checkpoint of the run (the trainer's resume rules); False when none."""
        return self.run.restore(resume=True)

    # ---- evaluation
    def evaluate(self) -> dict[str, float]:
        e = self.cfg.eval
        res = evaluate(PolicyExpert(self.policy, self.normalizer), self.cfg.env.id, episodes=e.episodes,
                       seed=e.seed, env_kwargs=self.cfg.env.kwargs)
        return {"val_return": res.mean_return, "val_return_std": res.std_return,
                "val_return_min": res.min_return, "val_length": res.mean_length}

    def heldout_evaluation(self) -> dict[str, Any]:
        """The current policy on `eval.heldout_seeds` ({} when none): per seed mean/std/min over
        `eval.episodes` episodes, and the lowest mean (what "holds off its training seeds" means)."""
        e = self.cfg.eval
        if not e.heldout_seeds:
            return {}
        per_seed = {}
        for s in e.heldout_seeds:
            r = evaluate(PolicyExpert(self.policy, self.normalizer), self.cfg.env.id, episodes=e.episodes, seed=s,
                         env_kwargs=self.cfg.env.kwargs)
            per_seed[str(s)] = {"mean_return": r.mean_return, "std_return": r.std_return, "min_return": r.min_return}
        return {"episodes": e.episodes, "per_seed": per_seed,
                "min_mean_return": min(v["mean_return"] for v in per_seed.values())}

    def _target_holds(self) -> bool:
        """The target was reached on the evaluation seeds: stop only if it holds on the held-out seeds
        too (when the config names some); otherwise train on and wait for the next evaluation."""
        if not self.cfg.eval.heldout_seeds:
            return True
        held = self.heldout_evaluation()["min_mean_return"]
        if held >= self.cfg.eval.target_return:
            return True
        if self.cfg.logging.progress:
            print(f"step {self.state.env_steps}: target {self.cfg.eval.target_return:g} reached on the evaluation seeds "
                  f"but not on the held-out seeds ({held:.1f}); training on", flush=True)
        self.state.steps_to_target = None
        return False

    def _after_eval(self, metrics: dict[str, float]) -> bool:
        s = self.state
        s.last_eval = metrics
        value = metrics["val_return"]
        target = self.cfg.eval.target_return
        if target is not None and s.steps_to_target is None and value >= target:
            s.steps_to_target = s.env_steps
        if s.best_value is None or value > s.best_value:
            s.best_value, s.best_step = value, s.env_steps
            return True
        return False

    # ---- one rollout + update
    def collect(self, envs: Any, obs: np.ndarray) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        """`rollout_steps` steps of every env with the current policy; (rollout tensors, next raw obs)."""
        p, n, dev = self.cfg.ppo, self.cfg.env.num_envs, self.device
        T = p.rollout_steps
        buf_obs = torch.zeros(T, n, self.info.obs_dim)
        buf_act = torch.zeros((T, n) if self.info.discrete else (T, n, self.info.action_dim),
                              dtype=torch.long if self.info.discrete else torch.float32)
        buf_logp, buf_val = torch.zeros(T, n), torch.zeros(T, n)
        buf_rew, buf_done = torch.zeros(T, n), torch.zeros(T, n, dtype=torch.bool)
        for t in range(T):
            self.normalizer.update(obs)
            x = torch.as_tensor(self.normalizer(obs), device=dev)            # (N, D)
            action, logp, value = self.policy.act(x)
            a = action.cpu().numpy()
            next_obs, reward, term, trunc, info = envs.step(to_env_action(a, self.info))
            reward = np.asarray(reward, dtype=np.float32)
            done = term | trunc
            self._track_episodes(reward, done)  # the environment's own reward, before scaling/bootstrapping
            reward = reward * np.float32(p.reward_scale)
            if trunc.any():  # bootstrap a time-limit cut: r + gamma * V(final obs)
                idx = np.nonzero(trunc & ~term)[0]
                if len(idx):
                    final = np.stack([info["final_obs"][i] for i in idx])
                    with torch.no_grad():
                        v = self.policy.value(torch.as_tensor(self.normalizer(final), device=dev)).cpu().numpy()
                    reward[idx] += p.gamma * v
            buf_obs[t], buf_act[t], buf_logp[t], buf_val[t] = x.cpu(), action.cpu(), logp.cpu(), value.cpu()
            buf_rew[t], buf_done[t] = torch.as_tensor(reward), torch.as_tensor(done)
            obs = next_obs
        with torch.no_grad():
            last_value = self.policy.value(torch.as_tensor(self.normalizer(obs), device=dev)).cpu()
        adv, ret = compute_gae(buf_rew, buf_val, buf_done, last_value, p.gamma, p.gae_lambda)
        roll = {"obs": buf_obs, "actions": buf_act, "logprobs": buf_logp, "values": buf_val,
                "advantages": adv, "returns": ret}
        return {k: v.reshape(T * n, *v.shape[2:]).to(dev) for k, v in roll.items()}, obs

    def _track_episodes(self, raw_reward: np.ndarray, done: np.ndarray) -> None:
        self._ep_ret += raw_reward
        self._ep_len += 1
        for i in np.nonzero(done)[0]:
            self.state.recent_returns.append(float(self._ep_ret[i]))
            self.state.recent_lengths.append(int(self._ep_len[i]))
            self._ep_ret[i], self._ep_len[i] = 0.0, 0

    def learn_from(self, roll: dict[str, torch.Tensor], value_only: bool) -> dict[str, float]:
        """`epochs` passes of minibatch updates over one rollout; averaged stats."""
        p = self.cfg.ppo
        n = roll["obs"].shape[0]
        mb = n // p.minibatches
        params = list(self.policy.parameters())
        keep = set(map(id, value_parameters(self.policy))) if value_only else None
        sums: dict[str, float] = collections.defaultdict(float)
        count, stopped = 0, False
        for _ in range(p.epochs):
            order = torch.randperm(n)
            for start in range(0, n, mb):
                idx = order[start: start + mb].to(self.device)
                batch = {k: v[idx] for k, v in roll.items()}
                if p.normalize_advantages and mb > 1:
                    a = batch["advantages"]
                    batch["advantages"] = (a - a.mean()) / (a.std() + 1e-8)
                loss, stats = ppo_loss(self.policy, batch, clip=p.clip, value_coef=p.value_coef,
                                       entropy_coef=p.entropy_coef, clip_value=p.clip_value, value_only=value_only)
                if not value_only and p.target_kl is not None and stats["approx_kl"] > 1.5 * p.target_kl:
                    stopped = True
                    break
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if keep is not None:  # warm-up: only the critic's own parameters move
                    for q in params:
                        if id(q) not in keep:
                            q.grad = None
                nn.utils.clip_grad_norm_([q for q in params if q.grad is not None], p.max_grad_norm)
                self.optimizer.step()
                for k, v in stats.items():
                    sums[k] += float(v)
                count += 1
            if stopped:
                break
        out = {k: v / max(1, count) for k, v in sums.items()}
        out["kl_early_stop"] = float(stopped)
        out["explained_variance"] = explained_variance(roll["values"], roll["returns"])
        return out

    # ---- the loop
    def fit(self, resume: bool = False) -> PPOResult:
        """Train (or, with `resume`, continue) the run; one writer per run directory (`Run.hold`)."""
        with self.run.hold():
            return self._fit(resume)

    def _fit(self, resume: bool) -> PPOResult:
        c, s = self.cfg, self.state
        self._start(resume)
        envs = make_vector_env(c.env.id, c.env.num_envs, c.env.kwargs)
        start, obs = time.perf_counter(), None
        try:
            while s.update < self.num_updates:
                obs = self._reset_at_boundary(envs, obs)
                t0, lr = time.perf_counter(), self._set_lr()
                roll, obs = self.collect(envs, obs)
                warm = s.update < self.cfg.ppo.value_warmup_updates
                stats = self.learn_from(roll, value_only=warm)
                s.update += 1
                s.env_steps += self.batch_size
                if self._after_update({"lr": lr, **stats, "value_warmup": float(warm)}, t0, start):
                    break
        finally:
            envs.close()
            self.run.close()
        result = PPOResult(self.run_dir, s.update, s.env_steps, dict(s.last_eval), s.steps_to_target,
                           {"metric": "val_return", "value": s.best_value, "step": s.best_step},
                           time.perf_counter() - start, self.policy, heldout=self.heldout_evaluation())
        self.run.write_result(result.to_dict())
        return result

    def _start(self, resume: bool) -> None:
        """Resume (the trainer's rules), config.yaml, logger; a fresh run evaluates its starting point."""
        from torchgraft.train.validate import cadence_warnings

        c, s = self.cfg, self.state
        resumed = self.run.restore(resume)  # refuses changes a run cannot take midway
        notes = cadence_warnings(c.to_dict(), self.num_updates, f"the run's {self.num_updates} updates")
        self.run.start(s.update < self.num_updates, notes, tensorboard=c.logging.tensorboard,
                       resume_step=s.env_steps)
        if self.init_report is not None and not resumed:
            atomic_write_text(self.run_dir / "init_transfer.json", json.dumps(self.init_report.to_dict(), indent=1))
        if not resumed and c.eval.every:  # the starting point (a cloned policy's return, or random)
            m = self.evaluate()
            self._after_eval(m)
            self.run.logger.log({"step": 0, "update": 0, **m})

    def _reset_at_boundary(self, envs: Any, obs: np.ndarray | None) -> np.ndarray:
        """Re-seed every environment at a checkpoint boundary (and at the start): exact resume."""
        c, update = self.cfg, self.state.update
        if obs is None or every(c.checkpoint.every, update):
            obs, _ = envs.reset(seed=_env_seeds(c.ppo.seed, update, c.env.num_envs))
            self._ep_ret = np.zeros(c.env.num_envs)
            self._ep_len = np.zeros(c.env.num_envs, dtype=np.int64)
        return obs

    def _set_lr(self) -> float:
        p = self.cfg.ppo
        lr = p.lr * (1.0 - self.state.update / self.num_updates) if p.anneal_lr else p.lr
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def _after_update(self, stats: dict[str, float], t0: float, start: float) -> bool:
        """Log, evaluate, checkpoint after one update; True when the target is reached (and holds)."""
        c, s = self.cfg, self.state
        final = s.update >= self.num_updates
        do_eval = final or every(c.eval.every, s.update)
        record: dict[str, Any] = {}
        if do_eval or every(c.logging.every, s.update):
            record = {"step": s.env_steps, "update": s.update, **stats,
                      "steps_per_s": self.batch_size / max(time.perf_counter() - t0, 1e-9),
                      "elapsed_s": time.perf_counter() - start}
            if s.recent_returns:
                record["episode_return"] = float(np.mean(s.recent_returns))
                record["episode_length"] = float(np.mean(s.recent_lengths))
        improved = False
        if do_eval:
            metrics = self.evaluate()
            improved = self._after_eval(metrics)
            record.update(metrics)
            if c.logging.progress:
                print(f"step {s.env_steps}: val_return {metrics['val_return']:.1f} (+- {metrics['val_return_std']:.1f})"
                      f"  episode_return {record.get('episode_return', float('nan')):.1f}", flush=True)
        if record:
            self.run.logger.log(record)
        reached = s.steps_to_target is not None and do_eval and self._target_holds()
        self.ckpt.save(s.env_steps, last=final or reached, best=("val_return", s.best_value) if improved else None)
        return reached


def run_ppo(cfg: PPORunConfig | dict | str | Path, out_dir: str | Path, *, policy: nn.Module | None = None,
            resume: bool = False) -> PPOResult:
    """Train `cfg` with PPO into `out_dir` (`resume=True` continues from its newest good checkpoint)."""
    return PPOTrainer(cfg, out_dir, policy=policy).fit(resume=resume)


__all__ = ["PPORunConfig", "PPOConfig", "PPOTrainer", "PPOResult", "compute_gae", "ppo_loss", "run_ppo",
           "load_ppo_config", "explained_variance"]
