"""Behaviour cloning through the normal trainer: the cloned CartPole controller plays far better than chance."""
import json

import pytest

from torchgraft.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bc_on_recorded_cartpole_data_beats_random(tmp_path, capsys):
    from torchgraft.rl import evaluate, get_expert

    demos = tmp_path / "cp.safetensors"
    main(["rl", "collect", "CartPole-v1", "--expert", "cartpole-pd", "--episodes", "6", "--out", str(demos)])
    assert json.loads(capsys.readouterr().out)["expert_mean_return"] == 500.0
    main(["rl", "bc", "configs/bc-cartpole.yaml", "--demos", str(demos), "--out", str(tmp_path / "bc"),
          "trainer.max_steps=200", "eval.every=100", "checkpoint.every=100", "logging.progress=false",
          "logging.tensorboard=false", "task.episodes=3"])
    assert "done: step 200" in capsys.readouterr().out
    recs = [json.loads(line) for line in (tmp_path / "bc" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if "val_return" in r]
    assert [r["step"] for r in evals] == [100, 200] and "val_accuracy" in evals[-1]

    import numpy as np

    random_policy = lambda obs: np.random.default_rng(0).integers(0, 2, len(obs))  # noqa: E731
    chance = evaluate(random_policy, "CartPole-v1", episodes=10, seed=0).mean_return
    main(["rl", "eval", str(tmp_path / "bc"), "--episodes", "10", "--seed", "0", "--json"])
    cloned = json.loads(capsys.readouterr().out)
    assert chance < 40 and cloned["mean_return"] > 4 * chance and cloned["mean_return"] > 150
