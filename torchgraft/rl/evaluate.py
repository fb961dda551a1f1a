"""Evaluate a policy (or any expert) over N seeded episodes, and film one episode as a GIF/MP4.

Episode i is reset with seed `seed + i`, so the same (policy, seed, N) gives the same returns every
time; all N episodes run side by side in a vector environment (one batched forward per step).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from torchgraft.errors import ConfigError
from torchgraft.rl.envs import env_space_info, make_env, make_vector_env, to_env_action
from torchgraft.rl.experts import Expert


@dataclass
class EvalResult:
    env: str
    episodes: int
    seed: int
    mean_return: float
    std_return: float
    min_return: float
    max_return: float
    mean_length: float
    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(expert: Expert, env_id: str, *, episodes: int = 10, seed: int = 0,
             env_kwargs: dict[str, Any] | None = None, max_parallel: int = 32) -> EvalResult:
    """Run `episodes` episodes (seeds seed, seed+1, ...) and summarise their undiscounted returns."""
    if episodes < 1:
        raise ConfigError(f"episodes must be >= 1, got {episodes}")
    info = env_space_info(env_id, env_kwargs)
    returns: list[float] = []
    lengths: list[int] = []
    for start in range(0, episodes, max_parallel):
        n = min(max_parallel, episodes - start)
        r, ln = _run_episodes(expert, env_id, env_kwargs, info, [seed + start + i for i in range(n)])
        returns += r
        lengths += ln
    arr = np.asarray(returns, dtype=np.float64)
    return EvalResult(env=env_id, episodes=episodes, seed=seed, mean_return=float(arr.mean()),
                      std_return=float(arr.std()), min_return=float(arr.min()), max_return=float(arr.max()),
                      mean_length=float(np.mean(lengths)), returns=[float(x) for x in arr], lengths=lengths)


def _run_episodes(expert: Expert, env_id: str, env_kwargs: dict[str, Any] | None, info: Any,
                  seeds: list[int]) -> tuple[list[float], list[int]]:
    envs = make_vector_env(env_id, len(seeds), env_kwargs)
    try:
        obs, _ = envs.reset(seed=seeds)
        n = len(seeds)
        ret, length = np.zeros(n), np.zeros(n, dtype=np.int64)
        running = np.ones(n, dtype=bool)
        while running.any():
            actions = to_env_action(np.asarray(expert(obs)), info)
            obs, reward, term, trunc, _ = envs.step(actions)
            ret += np.where(running, reward, 0.0)
            length += running
            running &= ~(term | trunc)  # an env that finished keeps stepping (autoreset) but is not counted
        return ret.tolist(), length.tolist()
    finally:
        envs.close()


def heldout_note(run_config: dict[str, Any] | None, seed: int, episodes: int, same_env: bool = True
                 ) -> tuple[bool | None, str]:
    """(held out?, words) for evaluating seeds seed..seed+episodes-1 on a run: held out when none of
    them is one of the run's own evaluation seeds (PPO: `eval.seed`.., `eval.episodes` of them);
    None when the run does not record them (or another environment is evaluated)."""
    ev = (run_config or {}).get("eval") if isinstance(run_config, dict) else None
    if not same_env or not isinstance(ev, dict) or "seed" not in ev or "episodes" not in ev:
        return None, f"seeds {seed}..{seed + episodes - 1}"
    lo, hi = int(ev["seed"]), int(ev["seed"]) + int(ev["episodes"]) - 1
    overlap = max(seed, lo) <= min(seed + episodes - 1, hi)
    if overlap:
        return False, (f"seeds {seed}..{seed + episodes - 1}: NOT held out (they overlap the run's own "
                       f"evaluation seeds {lo}..{hi})")
    return True, f"held-out seeds {seed}..{seed + episodes - 1} (the run evaluated on {lo}..{hi})"


def check_video_path(path: str | Path, overwrite: bool = False) -> Path:
    """A .gif / .mp4 path that may be written: the one output-file check (torchgraft.outputs)."""
    from torchgraft.outputs import check_output_file

    return check_output_file(path, overwrite=overwrite, suffixes=(".gif", ".mp4"), kind="rl eval --gif",
                             what="--gif")


def record_episode(expert: Expert, env_id: str, path: str | Path, *, seed: int = 0,
                   env_kwargs: dict[str, Any] | None = None, fps: int = 30, max_frames: int = 1000,
                   every: int = 1, overwrite: bool = False) -> dict[str, Any]:
    """Play one episode with `rgb_array` rendering and write it as .gif (Pillow) or .mp4 (ffmpeg).

    `every` keeps one frame in `every` (smaller files); returns {path, frames, return, length}.
    An existing file at `path` is refused unless `overwrite` (checked before the episode runs).
    """
    import os

    import imageio.v2 as imageio

    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # render off-screen, no display needed
    os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
    path = check_video_path(path, overwrite)
    if path.suffix.lower() == ".mp4":
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise ConfigError("writing .mp4 needs the imageio-ffmpeg package; write a .gif instead") from None
    env = make_env(env_id, env_kwargs, render_mode="rgb_array")
    info = env_space_info(env_id, env_kwargs)
    frames, total, steps = [], 0.0, 0
    try:
        obs, _ = env.reset(seed=seed)
        frames.append(env.render())
        done = False
        while not done and steps < max_frames:
            action = to_env_action(np.asarray(expert(obs[None]))[0:1], info)[0]
            obs, reward, term, trunc, _ = env.step(action)
            total += float(reward)
            steps += 1
            done = term or trunc
            if steps % every == 0 or done:
                frames.append(env.render())
    finally:
        env.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    if path.suffix.lower() == ".gif":
        imageio.mimsave(tmp, frames, duration=1000.0 * every / fps, loop=0)
    else:
        imageio.mimsave(tmp, frames, fps=max(1, math.ceil(fps / every)))
    tmp.replace(path)
    return {"path": str(path), "frames": len(frames), "return": total, "length": steps}
