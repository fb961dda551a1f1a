"""Game AI with Gymnasium: record an expert, clone it with the normal trainer, fine-tune with PPO,
evaluate and film it, move it to a changed game. See docs/rl.md.

Importing this package registers the `bc` task and the `demonstrations` dataset.
"""
from torchgraft.rl import bc, demonstrations  # noqa: F401  (they register the task and the dataset)
from torchgraft.rl.demonstrations import Demonstrations, collect, load_demonstrations, save_demonstrations
from torchgraft.rl.envs import SpaceInfo, check_policy_fits, env_space_info, make_env, make_vector_env
from torchgraft.rl.evaluate import EvalResult, evaluate, record_episode
from torchgraft.rl.experts import PolicyExpert, get_expert
from torchgraft.rl.normalize import RunningNorm
from torchgraft.rl.ppo import PPORunConfig, PPOTrainer, compute_gae, load_ppo_config, ppo_loss, run_ppo
from torchgraft.rl.runs import load_policy_run
from torchgraft.rl.transfer import transfer_policy

__all__ = ["Demonstrations", "EvalResult", "PPORunConfig", "PPOTrainer", "PolicyExpert", "RunningNorm",
           "SpaceInfo", "check_policy_fits", "collect", "compute_gae", "env_space_info", "evaluate",
           "get_expert", "load_demonstrations", "load_policy_run", "load_ppo_config", "make_env",
           "make_vector_env", "ppo_loss", "record_episode", "run_ppo", "save_demonstrations",
           "transfer_policy"]
