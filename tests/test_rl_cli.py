"""`torchgraft rl collect|bc|ppo|eval`: demonstrations files, eval JSON, GIF, one-line errors (exit 2)."""
import json

import numpy as np
import pytest

from torchgraft.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

PPO_FAST = ["ppo.total_steps=64", "ppo.rollout_steps=16", "env.num_envs=2", "ppo.epochs=1", "ppo.minibatches=1",
            "eval.every=0", "eval.episodes=2", "logging.tensorboard=false", "logging.progress=false",
            "model.hidden=[16,16]"]


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rl") / "ppo"
    main(["rl", "ppo", "configs/ppo-cartpole.yaml", "--out", str(out), *PPO_FAST])
    return out


def test_collect_writes_demonstrations_with_the_expert_return(tmp_path, capsys):
    from torchgraft.rl import load_demonstrations

    for suffix in ("safetensors", "npz"):
        path = tmp_path / f"demos.{suffix}"
        main(["rl", "collect", "CartPole-v1", "--expert", "cartpole-pd", "--episodes", "3", "--seed", "5",
              "--out", str(path)])
        line = json.loads(capsys.readouterr().out)
        assert line["episodes"] == 3 and line["expert_mean_return"] == 500.0
        d = load_demonstrations(path)
        assert d.env_id == "CartPole-v1" and d.metadata["expert_mean_return"] == 500.0
        assert d.observations.shape == (1500, 4) and d.actions.dtype == np.int64
        assert list(d.episode_starts) == [0, 500, 1000, 1500] and d.rewards.sum() == 1500


def test_eval_prints_one_json_object_and_writes_a_gif(ppo_run, tmp_path, capsys):
    gif = tmp_path / "episode.gif"
    main(["rl", "eval", str(ppo_run), "--episodes", "3", "--seed", "7", "--json", "--gif", str(gif)])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    res = json.loads(out[0])
    assert res["episodes"] == 3 and len(res["returns"]) == 3
    assert res["mean_return"] == pytest.approx(np.mean(res["returns"]))
    assert res["std_return"] == pytest.approx(np.std(res["returns"]))
    assert res["min_return"] <= res["mean_return"] <= res["max_return"]
    import imageio.v2 as imageio

    frames = imageio.mimread(gif)
    assert gif.read_bytes()[:3] == b"GIF" and 5 < len(frames) <= res["video"]["frames"]  # equal frames merge
    assert frames[0].shape[:2] == (400, 600)
    main(["rl", "eval", str(ppo_run), "--episodes", "3", "--seed", "7", "--json"])
    assert json.loads(capsys.readouterr().out)["returns"] == res["returns"]  # seeded: same episodes


def test_ppo_resume_from_cli(ppo_run, capsys):
    main(["rl", "ppo", "configs/ppo-cartpole.yaml", "--out", str(ppo_run), *PPO_FAST, "ppo.total_steps=96",
          "--resume"])
    assert json.loads(capsys.readouterr().out)["updates"] == 3


@pytest.mark.parametrize("argv,message", [
    (["rl", "collect", "CartPol-v1", "--expert", "cartpole-pd", "--out", "x.npz"],
     "unknown environment 'CartPol-v1' (did you mean 'CartPole-v1'"),
    (["rl", "collect", "CartPole-v1", "--expert", "lunarlander-heuristic", "--out", "x.npz"],
     "made for LunarLander environments"),
    (["rl", "ppo", "configs/ppo-cartpole.yaml", "--out", "OUT", "env.id=LunarLandr-v3"],
     "did you mean 'LunarLander-v3'"),
    (["rl", "ppo", "configs/ppo-cartpole.yaml", "--out", "OUT", "env.id=Blackjack-v1"],
     "Blackjack-v1 has Tuple observations"),
    (["rl", "eval", "/no/such/run"], "checkpoint not found"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, message):
    argv = [a.replace("OUT", str(tmp_path / "o")).replace("x.npz", str(tmp_path / "x.npz")) for a in argv]
    code, _, err = run(argv, capsys)
    assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_policy_that_does_not_fit_the_environment(ppo_run, capsys):
    code, _, err = run(["rl", "eval", str(ppo_run), "--env", "LunarLander-v3"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "the policy takes observations of size 4" in err and "LunarLander-v3 has observations of size 8" in err
    assert "build a policy for this environment" in err


def test_init_from_a_policy_with_other_actions(ppo_run, tmp_path, capsys):
    code, _, err = run(["rl", "ppo", "configs/ppo-cartpole.yaml", "--out", str(tmp_path / "p"), "env.id=Pendulum-v1",
                        f"ppo.init_from={ppo_run}"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "2 discrete actions but Pendulum-v1 has observations of size 3, 1-d continuous actions" in err


def test_demonstrations_of_another_environment(tmp_path, capsys):
    path = tmp_path / "cart.npz"
    main(["rl", "collect", "CartPole-v1", "--expert", "cartpole-pd", "--episodes", "2", "--out", str(path)])
    capsys.readouterr()
    code, _, err = run(["rl", "bc", "configs/bc-cartpole.yaml", "--demos", str(path), "--out", str(tmp_path / "bc"),
                        "task.env=LunarLander-v3"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "recorded on 'CartPole-v1', but task.env uses 'LunarLander-v3'" in err
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    code, _, err = run(["rl", "bc", "configs/bc-cartpole.yaml", "--demos", str(bad), "--out", str(tmp_path / "b2")],
                       capsys)
    assert code == 2 and "cannot read demonstrations" in err


def test_plot_shows_the_rl_curves(ppo_run, tmp_path, capsys):
    from torchgraft.train import plot

    main(["plot", str(ppo_run), "--out", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").stat().st_size > 5_000
    recs = [json.loads(line) for line in (ppo_run / "metrics.jsonl").read_text().splitlines()]
    keys = {k for k, _ in plot.PANELS if any(k in r for r in recs)}
    assert {"episode_return", "approx_kl", "clip_fraction", "explained_variance", "val_return"} <= keys
