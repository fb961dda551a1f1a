"""PPO: GAE against a hand computation, the clipped loss goes down, exact resume, observation
normalisation saved and restored, policies with different observation sizes."""
import json

import numpy as np
import pytest
import torch

import torchgraft
from torchgraft.rl.normalize import RunningNorm, normalizer_from_state
from torchgraft.rl.ppo import PPOTrainer, compute_gae, load_ppo_config, ppo_loss, run_ppo
from torchgraft.rl.transfer import transfer_policy
from torchgraft.checkpoint.files import load_latest

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"model": {"name": "policy-mlp", "hidden": [16, 16]},
        "env": {"id": "CartPole-v1", "num_envs": 2},
        "ppo": {"total_steps": 128, "rollout_steps": 16, "epochs": 2, "minibatches": 2, "lr": 3e-3, "seed": 3},
        "eval": {"every": 0, "episodes": 2},
        "checkpoint": {"every": 2, "keep_last": 5},
        "logging": {"every": 1, "tensorboard": False, "progress": False}}


def test_gae_matches_a_hand_computation():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[1.0], [0.0], [2.0]])
    values = torch.tensor([[0.5], [1.0], [0.2]])
    dones = torch.tensor([[False], [True], [False]])   # the episode ends after step 1
    last = torch.tensor([0.7])
    adv, ret = compute_gae(rewards, values, dones, last, gamma, lam)
    # step 2: delta = 2 + 0.9 * 0.7 - 0.2 = 2.43; A2 = 2.43
    # step 1 (terminal): delta = 0 - 1.0 = -1.0; A1 = -1.0 (nothing flows back across the end)
    # step 0: delta = 1 + 0.9 * 1.0 - 0.5 = 1.4; A0 = 1.4 + 0.9 * 0.8 * (-1.0) = 0.68
    torch.testing.assert_close(adv[:, 0], torch.tensor([0.68, -1.0, 2.43]))
    torch.testing.assert_close(ret[:, 0], torch.tensor([1.18, 0.0, 2.63]))


def test_one_ppo_update_lowers_the_clipped_loss_on_its_batch():
    torch.manual_seed(0)
    policy = torchgraft.build("policy-mlp", obs_dim=4, action_dim=2, hidden=(16, 16))
    obs = torch.randn(64, 4)
    with torch.no_grad():
        actions, logp, values = policy.act(obs)
    batch = {"obs": obs, "actions": actions, "logprobs": logp, "values": values,
             "advantages": torch.randn(64), "returns": values + torch.randn(64)}
    kw = dict(clip=0.2, value_coef=0.5, entropy_coef=0.01)
    before, stats = ppo_loss(policy, batch, **kw)
    assert stats["clip_fraction"] == 0 and abs(float(stats["approx_kl"])) < 1e-6  # ratio 1 at the start
    opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    opt.zero_grad()
    before.backward()
    opt.step()
    after, _ = ppo_loss(policy, batch, **kw)
    assert float(after.detach()) < float(before.detach()) - 1e-4


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


class _Crash(RuntimeError):
    pass


def test_resume_continues_from_the_same_state(tmp_path):
    full = run_ppo(TINY, tmp_path / "full")  # 4 updates in one go
    assert full.updates == 4

    class CrashAtUpdate3(PPOTrainer):
        def learn_from(self, roll, value_only):
            if self.update == 3:  # after the checkpoint at update 2, before the one at 4
                raise _Crash()
            return super().learn_from(roll, value_only)

    with pytest.raises(_Crash):
        CrashAtUpdate3(TINY, tmp_path / "cut").fit()
    resumed = run_ppo(TINY, tmp_path / "cut", resume=True)
    assert resumed.updates == 4 and resumed.env_steps == full.env_steps
    a, b = _weights(full.policy), _weights(resumed.policy)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    recs = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in recs] == [1, 2, 3, 4]  # the crashed run's update-3 line was dropped
    ref = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["approx_kl"] for r in recs] == [r["approx_kl"] for r in ref]
    assert {"approx_kl", "clip_fraction", "explained_variance", "entropy"} <= set(recs[-1])


def test_a_checkpoint_of_the_earlier_flat_layout_resumes_exactly(tmp_path):
    """Earlier PPO checkpoints held counters and the RNG's JSON side by side in trainer_state.json
    and the normaliser only in meta.json; the manager's upgrade hook reads them into the entries."""
    from torchgraft.checkpoint.files import checkpoint_files, read_checkpoint, write_checkpoint_dir

    cfg = load_ppo_config(TINY, ["ppo.normalize_obs=true"])
    full = run_ppo(cfg, tmp_path / "full")
    mid = read_checkpoint(tmp_path / "full" / "checkpoints" / "step_00000064")  # update 2 of 4
    ts = mid.trainer_state
    assert set(ts) == {"counters", "rng", "obs_norm"} and ts["obs_norm"]["count"] > 60
    flat = {**ts["counters"], "rng": ts["rng"]}
    old = tmp_path / "old" / "checkpoints" / "step_00000064"
    write_checkpoint_dir(old, checkpoint_files(model_state=mid.model_state, meta=mid.meta,
                                               optimizer_state=mid.optimizer_state, trainer_state=flat,
                                               rng_tensors=mid.rng_tensors))
    resumed = run_ppo(cfg, tmp_path / "old", resume=True)
    assert resumed.updates == 4
    a, b = _weights(full.policy), _weights(resumed.policy)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_observation_normalisation_is_saved_and_restored(tmp_path):
    cfg = load_ppo_config(TINY, ["ppo.normalize_obs=true", "ppo.total_steps=64"])
    trainer = PPOTrainer(cfg, tmp_path / "r")
    trainer.fit()
    norm = trainer.normalizer
    assert isinstance(norm, RunningNorm) and norm.count > 60
    ck = load_latest(tmp_path / "r")
    saved = normalizer_from_state(ck.meta["rl"]["obs_norm"])
    np.testing.assert_array_equal(saved.mean, norm.mean)
    np.testing.assert_array_equal(saved.var, norm.var)
    obs = np.random.default_rng(0).normal(size=(5, 4))
    np.testing.assert_array_equal(saved(obs), norm(obs))
    again = PPOTrainer(cfg, tmp_path / "r")
    assert again.restore() and again.normalizer.count == norm.count
    np.testing.assert_array_equal(again.normalizer.mean, norm.mean)
    # the statistics are those of every observation seen: parallel Welford equals numpy on the lot
    data = np.random.default_rng(1).normal(3.0, 2.0, size=(300, 4))
    rn = RunningNorm(4)
    for chunk in np.array_split(data, 7):
        rn.update(chunk)
    np.testing.assert_allclose(rn.mean, data.mean(0), rtol=1e-9)
    np.testing.assert_allclose(rn.var, data.var(0), rtol=1e-6)


def test_transfer_between_policies_with_different_observation_sizes():
    torch.manual_seed(0)
    src = torchgraft.build("policy-mlp", obs_dim=4, action_dim=2, hidden=(16, 16))
    dst = torchgraft.build("policy-mlp", obs_dim=6, action_dim=2, hidden=(16, 16))
    report = transfer_policy(src, dst)
    assert sorted(report.adapted) == ["trunk.0.weight", "value_trunk.0.weight"]
    assert report.ok and "observations 4 -> 6" in next(r.note for r in report.records if r.status == "adapted")
    obs = torch.randn(8, 4)
    extra = torch.cat([obs, torch.randn(8, 2)], 1)  # the new features are not read until trained
    torch.testing.assert_close(dst(extra), src(obs))
    small = torchgraft.build("policy-mlp", obs_dim=3, action_dim=2, hidden=(16, 16))
    assert transfer_policy(src, small).ok  # a dropped feature: its column is not read


def test_continuous_policy_and_user_module_actor():
    from torchgraft.models.policy import ActorCritic

    pol = torchgraft.build("policy-mlp-shared", obs_dim=3, action_dim=2, discrete=False, log_std_init=-0.5)
    obs = torch.randn(5, 3)
    action, logp, value = pol.act(obs)
    assert action.shape == (5, 2) and logp.shape == (5,) and value.shape == (5,)
    lp, ent, v = pol.evaluate(obs, action)
    torch.testing.assert_close(lp, logp)
    assert pol.parts().input_layer == "trunk.0" and pol.parts().classifier == "policy_head"
    actor = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    ac = ActorCritic(actor, obs_dim=3, action_dim=4)
    a, lp, v = ac.act(obs)
    assert a.shape == (5,) and ac.input_layers() == ["actor.0", "critic.0.0"]
    assert ac.parts().input_layer == "actor.0"


def test_ppo_trains_a_user_module_actor(tmp_path):
    from torchgraft.models.policy import ActorCritic

    actor = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    ac = ActorCritic(actor, obs_dim=4, action_dim=2)
    before = actor[0].weight.clone()
    run_ppo(load_ppo_config(TINY, ["ppo.total_steps=32"]), tmp_path / "r", policy=ac)
    assert not torch.equal(before, actor[0].weight)


def test_module_tools_work_on_policies():
    from torchgraft.peft import apply_lora

    pol = torchgraft.build("policy-mlp", obs_dim=4, action_dim=2, hidden=(16, 16))
    torchgraft.freeze(pol, ["trunk", "value_trunk"])
    assert not any(p.requires_grad for p in pol.trunk.parameters())
    apply_lora(pol, ["policy_head"], rank=2)
    out = pol(torch.randn(3, 4))
    assert out.shape == (3, 3)
    trainable = {n for n, p in pol.named_parameters() if p.requires_grad}
    assert any("lora" in n for n in trainable) and not any(n.startswith("trunk.") for n in trainable)
