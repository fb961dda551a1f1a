"""Actor-critic policies for reinforcement learning (discrete or continuous actions).

`Policy` is the interface PPO, behaviour cloning and evaluation use:
- `forward(obs)` -> (B, P + 1): the action-distribution parameters (P = n logits for a discrete
  action space, or the mean and log-std of each continuous action dimension) and the value in the
  last column, one tensor so summary/export/the model contracts see an ordinary module;
- `distribution(obs)`, `value(obs)`, `act(obs, deterministic)`, `evaluate(obs, actions)`.

Two ways to get one:
- the registered presets (`torchgraft.build("policy-mlp", obs_dim=8, action_dim=4)`): an MLP trunk
  with separate actor/critic trunks (`shared=False`, the usual PPO choice) or one shared trunk with
  a policy head and a value head (`shared=True`);
- `ActorCritic(actor, critic=None, discrete=True)`: any `nn.Module` mapping observations (B, obs_dim)
  to logits (B, n) or action means (B, A) becomes the actor; without a critic an MLP critic is made.

Continuous actions are a Gaussian with a state-independent, learned log-std (SB3/CleanRL style).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.distributions import Categorical, Distribution, Independent, Normal

from torchgraft.models.parts import ModelParts
from torchgraft.models.registry import register_family, register_preset

_ACT = {"tanh": nn.Tanh, "relu": nn.ReLU}


@dataclass
class PolicyConfig:
    obs_dim: int = 4                       # flattened observation size (filled from the environment)
    action_dim: int = 2                    # discrete: number of actions; continuous: action dimensions
    discrete: bool = True                  # Categorical (True) or Gaussian (False) actions
    hidden: tuple[int, ...] = (64, 64)     # trunk widths
    shared: bool = False                   # one trunk for policy and value (True) or two (False)
    activation: Literal["tanh", "relu"] = "tanh"
    log_std_init: float = 0.0              # continuous only: initial log standard deviation


def mlp(sizes: list[int], activation: str) -> nn.Sequential:
    """Linear -> act -> Linear -> act ... over `sizes` (an activation after every layer)."""
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), _ACT[activation]()]
    return nn.Sequential(*layers)


def _orthogonal(layer: nn.Linear, gain: float) -> None:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)


class Policy(nn.Module):
    """Base class: subclasses implement `forward(obs) -> (B, P + 1)` and set `discrete`/`action_dim`."""

    discrete: bool
    action_dim: int
    obs_dim: int

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward output -> (action parameters (B, P), value (B,))."""
        return out[:, :-1], out[:, -1]

    def dist_from_params(self, params: torch.Tensor) -> Distribution:
        # argument validation off: it costs more than the forward of a small policy, and the
        # parameters come from our own forward
        if self.discrete:
            return Categorical(logits=params, validate_args=False)  # params: (B, n)
        mean, log_std = params.chunk(2, dim=-1)  # (B, A) each
        return Independent(Normal(mean, log_std.exp(), validate_args=False), 1, validate_args=False)

    def distribution(self, obs: torch.Tensor) -> Distribution:
        return self.dist_from_params(self.split(self(obs))[0])

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        """State value V(obs), (B,)."""
        return self.split(self(obs))[1]

    def evaluate(self, obs: torch.Tensor, actions: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log-prob of `actions` (B,), entropy (B,), value (B,)) in one forward."""
        params, value = self.split(self(obs))
        dist = self.dist_from_params(params)
        return dist.log_prob(actions), dist.entropy(), value

    @torch.no_grad()
    def act(self, obs: torch.Tensor, deterministic: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(actions, their log-probs, values) for a batch of observations (B, obs_dim)."""
        params, value = self.split(self(obs))
        dist = self.dist_from_params(params)
        if deterministic:
            action = params.argmax(-1) if self.discrete else params.chunk(2, dim=-1)[0]
        else:
            action = dist.sample()
        return action, dist.log_prob(action), value

    def example_obs(self, batch_size: int = 2) -> torch.Tensor:
        device = next(self.parameters()).device
        return torch.randn(batch_size, self.obs_dim, device=device)

    def input_layers(self) -> list[str]:
        """Names of every layer that reads the observation (adapted by `transfer_policy`)."""
        raise NotImplementedError


class MLPActorCritic(Policy):
    """The registered preset: MLP trunk(s), a policy head and a value head."""

    def __init__(self, config: PolicyConfig):
        super().__init__()
        self.config = config
        self.obs_dim, self.action_dim, self.discrete = config.obs_dim, config.action_dim, config.discrete
        sizes = [config.obs_dim, *config.hidden]
        width = sizes[-1]
        self.trunk = mlp(sizes, config.activation)                       # actor (or shared) trunk
        self.value_trunk = None if config.shared else mlp(sizes, config.activation)
        self.policy_head = nn.Linear(width, config.action_dim)          # logits or action means
        self.value_head = nn.Linear(width, 1)
        self.log_std = None if config.discrete else nn.Parameter(torch.empty(config.action_dim))

    def init_weights(self) -> None:
        """Orthogonal init (gain sqrt 2 in the trunks, 0.01 policy head, 1 value head), as in PPO
        implementations: a near-uniform initial policy and unit-scale value estimates."""
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    _orthogonal(m, math.sqrt(2))
            _orthogonal(self.policy_head, 0.01)
            _orthogonal(self.value_head, 1.0)
            if self.log_std is not None:
                self.log_std.fill_(self.config.log_std_init)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.flatten(1).float()                                       # (B, obs_dim)
        h = self.trunk(x)                                                # (B, H)
        hv = h if self.value_trunk is None else self.value_trunk(x)      # (B, H)
        params = self.policy_head(h)                                     # (B, A)
        if self.log_std is not None:
            params = torch.cat([params, self.log_std.expand_as(params)], -1)  # (B, 2A)
        return torch.cat([params, self.value_head(hv)], -1)              # (B, P + 1)

    def input_layers(self) -> list[str]:
        return ["trunk.0"] + ([] if self.value_trunk is None else ["value_trunk.0"])

    def parts(self) -> ModelParts:
        n = len(self.config.hidden)
        blocks = tuple(f"trunk.{2 * i}" for i in range(n))
        if self.value_trunk is not None:
            blocks += tuple(f"value_trunk.{2 * i}" for i in range(n))
        return ModelParts(blocks=blocks, input_layer="trunk.0", classifier="policy_head",
                          example_inputs=lambda batch_size, seq_len=None: (self.example_obs(batch_size),))


class ActorCritic(Policy):
    """Use any module as the actor: `actor(obs) -> logits (B, n)` (discrete) or means (B, A).

    `critic(obs) -> (B,)` or (B, 1); when None an MLP critic of `critic_hidden` is built (it needs
    `obs_dim`). A continuous actor gets a learned state-independent log-std (`log_std_init`).
    `parts()` forwards the actor's own declaration (names prefixed `actor.`) if it has one.
    """

    def __init__(self, actor: nn.Module, *, obs_dim: int, action_dim: int, discrete: bool = True,
                 critic: nn.Module | None = None, critic_hidden: tuple[int, ...] = (64, 64),
                 log_std_init: float = 0.0):
        super().__init__()
        self.obs_dim, self.action_dim, self.discrete = obs_dim, action_dim, discrete
        self.actor = actor
        if critic is None:
            critic = nn.Sequential(mlp([obs_dim, *critic_hidden], "tanh"), nn.Linear(critic_hidden[-1], 1))
        self.critic = critic
        self.log_std = None if discrete else nn.Parameter(torch.full((action_dim,), float(log_std_init)))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.flatten(1).float()                        # (B, obs_dim)
        params = self.actor(x)                            # (B, A)
        if params.shape[-1] != self.action_dim:
            raise ValueError(f"actor returned {params.shape[-1]} outputs, the action space needs "
                             f"{self.action_dim}")
        if self.log_std is not None:
            params = torch.cat([params, self.log_std.expand_as(params)], -1)
        value = self.critic(x).reshape(-1, 1)             # (B, 1)
        return torch.cat([params, value], -1)

    def input_layers(self) -> list[str]:
        names = []
        for prefix, mod in (("actor", self.actor), ("critic", self.critic)):
            first = next((n for n, m in mod.named_modules() if isinstance(m, nn.Linear)), None)
            if first is not None:
                names.append(f"{prefix}.{first}")
        return names

    def parts(self) -> ModelParts:
        from torchgraft.models.parts import parts_of

        inner = parts_of(self.actor)
        ex = lambda batch_size, seq_len=None: (self.example_obs(batch_size),)  # noqa: E731
        if inner is None:
            layers = self.input_layers()
            return ModelParts(input_layer=layers[0] if layers else None, example_inputs=ex)
        pre = lambda n: None if n is None else f"actor.{n}"  # noqa: E731
        return ModelParts(blocks=tuple(f"actor.{b}" for b in inner.blocks), input_layer=pre(inner.input_layer),
                          classifier=pre(inner.classifier), example_inputs=ex)


register_family("policy", PolicyConfig, MLPActorCritic)
register_preset("policy-mlp", "policy", description="actor-critic MLP 64x64, separate actor/critic trunks")
register_preset("policy-mlp-shared", "policy", shared=True,
                description="actor-critic MLP 64x64, one trunk with policy and value heads")
register_preset("policy-mlp-large", "policy", hidden=(256, 256),
                description="actor-critic MLP 256x256, separate trunks")
