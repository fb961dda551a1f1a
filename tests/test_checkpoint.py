"""Atomic, verified checkpoints: round trip, no pickles, corruption detection and fallback."""
import json
import warnings

import pytest
import torch

import torchgraft
from torchgraft.errors import CheckpointError
from torchgraft import load_model
from torchgraft.train import CheckpointFallbackWarning, load_checkpoint, run_training
from torchgraft.checkpoint.files import list_checkpoints, load_latest, load_optimizer_state, write_checkpoint
from torchgraft.checkpoint.manager import CheckpointManager

SMALL = {"model": {"name": "lenet", "conv_channels": [4, 8], "hidden": 32}, "data": {"name": "digits"},
         "optim": {"name": "adamw", "lr": 3e-3},
         "trainer": {"max_steps": 20, "batch_size": 32}, "checkpoint": {"every": 5, "keep_last": 3},
         "logging": {"progress": False, "tensorboard": False, "measure_flops": False}}


def _adam_with_state():
    model = torchgraft.build("gpt-tiny")  # tied embeddings: two names, one tensor
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    model(torch.randint(0, 256, (2, 8))).sum().backward()
    opt.step()
    return model, opt


def test_round_trip_model_optimizer_and_no_pickles(tmp_path):
    model, opt = _adam_with_state()
    path = write_checkpoint(tmp_path / "step_00000001", model_state=model.state_dict(),
                            optimizer_state=opt.state_dict(), meta={"step": 1, "note": "x"},
                            trainer_state={"step": 1}, rng_tensors={"torch_cpu": torch.get_rng_state()})
    assert {p.suffix for p in path.iterdir()} == {".safetensors", ".json"}
    assert not any(b"\x80\x02" == p.read_bytes()[:2] for p in path.iterdir())  # no pickle protocol header
    sd, meta = load_checkpoint(path)
    assert meta["note"] == "x"
    ref = model.state_dict()
    assert set(sd) == set(ref)
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    ck = load_latest(path)
    model2, opt2 = _adam_with_state()
    load_optimizer_state(opt2, ck.optimizer_state)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"] and isinstance(b["param_groups"][0]["betas"], tuple)
    for pid in a["state"]:
        for k, v in a["state"][pid].items():
            assert torch.equal(v, b["state"][pid][k])


def test_tied_weights_keep_every_state_dict_name(tmp_path):
    m = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False))
    m[1].weight = m[0].weight  # tied, as in GPT-2
    write_checkpoint(tmp_path / "step_00000001", model_state=m.state_dict(), meta={"step": 1})
    sd, _ = load_checkpoint(tmp_path / "step_00000001")
    assert set(sd) == {"0.weight", "1.weight"} and torch.equal(sd["1.weight"], m[0].weight)


def _run_with_checkpoints(tmp_path):
    run_training(SMALL, tmp_path)
    return list_checkpoints(tmp_path / "checkpoints")


def test_corrupted_newest_falls_back_with_warning(tmp_path):
    ckpts = _run_with_checkpoints(tmp_path)
    assert [p.name for p in ckpts] == ["step_00000010", "step_00000015", "step_00000020"]
    f = ckpts[-1] / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    f.write_bytes(bytes(data))
    with pytest.warns(CheckpointFallbackWarning, match="step_00000020.*corrupted"):
        _, meta = load_checkpoint(tmp_path)
    assert meta["step"] == 15
    # a truncated file and a missing manifest (crash mid-write) are caught the same way
    (ckpts[1] / "optimizer.safetensors").write_bytes(b"")
    with pytest.warns(CheckpointFallbackWarning):
        assert load_checkpoint(tmp_path / "checkpoints")[1]["step"] == 10
    (ckpts[0] / "manifest.json").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="no good checkpoint"):
            load_checkpoint(tmp_path)


def test_resume_after_corruption_uses_previous_and_matches_uninterrupted(tmp_path):
    ref = run_training(SMALL, tmp_path / "ref").model.state_dict()
    ckpts = _run_with_checkpoints(tmp_path / "run")
    (ckpts[-1] / "meta.json").write_text("{}")
    with pytest.warns(CheckpointFallbackWarning):
        res = run_training(SMALL, tmp_path / "run", resume=True)  # redoes steps 16..20
    assert res.step == 20
    assert all(torch.equal(res.model.state_dict()[k], ref[k]) for k in ref)


def test_missing_checkpoint_and_load_model(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a run directory nor a checkpoint"):
        load_checkpoint(tmp_path / "empty")
    _run_with_checkpoints(tmp_path / "run")
    model = load_model(tmp_path / "run")
    assert model.config.hidden == 32 and model.config.num_classes == 10
    sd, _ = load_checkpoint(tmp_path / "run")
    assert torch.equal(model.fc2.weight, sd["fc2.weight"])


def test_leftover_temp_dirs_are_ignored_and_cleaned(tmp_path):
    root = tmp_path / "checkpoints"
    model = torch.nn.Linear(2, 2)
    write_checkpoint(root / "step_00000001", model_state=model.state_dict(), meta={"step": 1})
    (root / ".tmp-step_00000002-999").mkdir()  # a crash mid-write
    (root / ".tmp-step_00000002-999" / "model.safetensors").write_bytes(b"partial")
    assert load_checkpoint(root)[1]["step"] == 1
    mgr = CheckpointManager(root, {"model": model}, keep_last=1)
    mgr.clean_temp()
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]
    mgr.mark_best(1, "val_loss", 0.5)
    mgr.save(2, last=True)
    mgr.save(3, last=True)  # rotation: keeps the last one and the best
    assert [p.name for p in list_checkpoints(root)] == ["step_00000001", "step_00000003"]
    assert json.loads((root / "best.json").read_text())["step"] == 1


def test_fresh_run_refuses_a_directory_with_checkpoints(tmp_path):
    from torchgraft.errors import ConfigError

    small = {**SMALL, "trainer": {**SMALL["trainer"], "max_steps": 5}}
    run_training(small, tmp_path)
    with pytest.raises(ConfigError, match="already holds checkpoints.*--resume"):
        run_training(small, tmp_path)
    other = {**small, "model": {"name": "lenet", "conv_channels": [4, 8], "hidden": 16}}
    with pytest.raises(CheckpointError, match=r"changes what is trained: model.hidden \(32 -> 16\)"):
        run_training(other, tmp_path, resume=True)
