"""`torchgraft rl collect|bc|ppo|eval`: game agents (torchgraft/rl). Imports happen inside the commands
so `torchgraft --help` stays fast."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

rl_app = typer.Typer(help="Game agents: record an expert, clone it, fine-tune it with PPO, evaluate it.",
                     no_args_is_help=True)


def _env_kwargs(text: Optional[str]) -> dict:
    from torchgraft.errors import ConfigError

    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ConfigError(f"--env-kwargs must be a JSON object, e.g. '{{\"enable_wind\": true}}', got {text!r}")
    return value


@rl_app.command("collect")
def collect_cmd(
    env: str = typer.Argument(..., help="Gymnasium environment id, e.g. LunarLander-v3"),
    out: Path = typer.Option(..., "--out", help="demonstrations file (.safetensors or .npz)"),
    expert: str = typer.Option(..., "--expert", help="cartpole-pd, lunarlander-heuristic, or a policy run dir"),
    episodes: int = typer.Option(50, "--episodes"),
    seed: int = typer.Option(0, "--seed", help="episode i uses seed SEED + i"),
    env_kwargs: Optional[str] = typer.Option(None, "--env-kwargs", help="JSON options for gym.make"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out file"),
) -> None:
    """Run an expert for N seeded episodes and write its transitions (and mean return) to --out."""
    from torchgraft.outputs import check_output_file

    check_output_file(out, overwrite=overwrite, suffixes=(".safetensors", ".npz"), kind="rl collect")
    import torchgraft.rl as rl

    kwargs = _env_kwargs(env_kwargs)
    rl.envs.check_env_id(env)
    demos = rl.collect(rl.get_expert(expert, env), env, episodes=episodes, seed=seed, env_kwargs=kwargs,
                       expert_name=expert)
    rl.save_demonstrations(demos, out)
    typer.echo(json.dumps({"out": str(out), "env": env, "episodes": demos.episodes,
                           "transitions": int(len(demos.actions)),
                           "expert_mean_return": demos.metadata["expert_mean_return"]}))


@rl_app.command("bc")
def bc_cmd(
    config: Path = typer.Argument(..., help="run config with data: {name: demonstrations, path: ...}"),
    overrides: Optional[list[str]] = typer.Argument(None, help="dotted key=value overrides"),
    out: Path = typer.Option(..., "--out", help="run directory"),
    demos: Optional[Path] = typer.Option(None, "--demos", help="demonstrations file (replaces data.path)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest good checkpoint in --out"),
) -> None:
    """Behaviour cloning through the normal trainer; evaluations report the policy's return in the game."""
    from torchgraft.rl.bc import run_bc

    result = run_bc(config, out, overrides or [], demos=str(demos) if demos else None, resume=resume)
    metrics = "  ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
    typer.echo(f"done: step {result.step} ({result.stop_reason}) {metrics} -> {out}")


@rl_app.command("ppo")
def ppo_cmd(
    config: Path = typer.Argument(..., help="PPO config (model, env, ppo, eval, checkpoint, logging)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="dotted key=value overrides, e.g. ppo.seed=1"),
    out: Path = typer.Option(..., "--out", help="run directory"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest good checkpoint in --out"),
) -> None:
    """Train (or fine-tune, with ppo.init_from) a policy with PPO; `--resume` continues exactly."""
    import warnings

    from torchgraft.errors import warning_line
    from torchgraft.rl.ppo import load_ppo_config, run_ppo

    warnings.formatwarning = warning_line

    result = run_ppo(load_ppo_config(config, overrides or []), out, resume=resume)
    typer.echo(json.dumps(result.to_dict()))


@rl_app.command("eval")
def eval_cmd(
    run_dir: Path = typer.Argument(..., help="policy run directory or checkpoint folder"),
    episodes: int = typer.Option(10, "--episodes"),
    seed: int = typer.Option(0, "--seed", help="episode i uses seed SEED + i"),
    env: Optional[str] = typer.Option(None, "--env", help="another environment (default: the run's)"),
    env_kwargs: Optional[str] = typer.Option(None, "--env-kwargs", help="JSON options for gym.make"),
    gif: Optional[Path] = typer.Option(None, "--gif", help="also film episode SEED to this .gif/.mp4"),
    stochastic: bool = typer.Option(False, "--stochastic", help="sample actions instead of the greedy ones"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --gif file"),
) -> None:
    """Mean/std/min/max return of a policy over N seeded episodes (and optionally a GIF of one); says
    whether those seeds are held out (none of them among the run's own evaluation seeds)."""
    from torchgraft.errors import ConfigError
    from torchgraft.rl.envs import check_policy_fits, env_space_info
    from torchgraft.rl.evaluate import check_video_path, evaluate, heldout_note, record_episode
    from torchgraft.rl.experts import PolicyExpert
    from torchgraft.rl.runs import load_policy_run

    if gif is not None:
        check_video_path(gif, overwrite)  # before any episode runs
    run = load_policy_run(run_dir)
    env_id = env or run.env_id
    if env_id is None:
        raise ConfigError(f"{run_dir} does not record its environment; pass --env")
    kwargs = _env_kwargs(env_kwargs) if env_kwargs is not None else (run.env_kwargs if env is None else {})
    check_policy_fits(run.policy, env_space_info(env_id, kwargs), env_id)
    expert = PolicyExpert(run.policy, run.normalizer, deterministic=not stochastic)
    res = evaluate(expert, env_id, episodes=episodes, seed=seed, env_kwargs=kwargs)
    out = res.to_dict()
    out["heldout"], note = heldout_note(run.meta.get("run_config"), seed, episodes, env is None)
    if gif is not None:
        out["video"] = record_episode(expert, env_id, gif, seed=seed, env_kwargs=kwargs, overwrite=overwrite)
    if as_json:
        typer.echo(json.dumps(out))
    else:
        typer.echo(f"{env_id}: mean return {res.mean_return:.1f} +- {res.std_return:.1f} "
                   f"(min {res.min_return:.1f}, max {res.max_return:.1f}) over {episodes} episodes, {note}"
                   + (f"; video {out['video']['path']}" if gif else ""))
