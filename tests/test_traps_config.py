"""Issue 27 items 5 and 7: sizes taken from the data, and combinations of settings that each pass
but together train nothing useful (refused with one line, exit code 2, or said as a warning)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import torchgraft
from conftest import invoke_cli
from torchgraft.errors import ConfigError

QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.measure_flops=false"]
LENET = ["configs/lenet-digits.yaml", "trainer.batch_size=8", "eval.every=0", "eval.max_batches=1",
         "model.conv_channels=[4,8]", "model.hidden=16", "schedule.warmup_steps=0", *QUIET]


def rgb_tree(root, size=32, per_class=8):
    """Two classes of RGB PNGs (red-ish and blue-ish squares)."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(["red", "blue"]):
        d = root / name
        d.mkdir(parents=True)
        for i in range(per_class):
            x = (rng.random((size, size, 3)) * 60).astype(np.uint8)
            x[..., 0 if c == 0 else 2] += 150
            Image.fromarray(x, "RGB").save(d / f"{i}.png")
    return root


def one_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- item 5: in_chans and image_size from the data

def test_lenet_takes_in_chans_from_rgb_images(tmp_path, capsys):
    root = rgb_tree(tmp_path / "rgb")
    code, out, err, _ = invoke_cli(["train", *LENET, "data.name=images", f"data.root={root}", "data.channels=3",
                                    "data.image_size=32", "data.val_fraction=0.25", "trainer.max_steps=2",
                                    "--out", tmp_path / "run"], capsys)
    assert code == 0, err
    meta = torchgraft.train.load_checkpoint(tmp_path / "run")[1]["model"]["config"]
    assert meta["in_chans"] == 3 and meta["image_size"] == 32 and meta["num_classes"] == 2


def test_vit_takes_image_size_from_the_data(tmp_path, capsys):
    root = rgb_tree(tmp_path / "rgb", size=16)
    code, _, err, _ = invoke_cli(["train", "configs/vit-digits.yaml", *QUIET, "data.name=images", f"data.root={root}",
                                  "data.channels=3", "data.image_size=16", "data.val_fraction=0.25",
                                  "trainer.max_steps=2", "trainer.batch_size=4", "schedule.warmup_steps=0",
                                  "eval.every=0", "model.n_layer=1", "--out", tmp_path / "run"], capsys)
    assert code == 0, err
    meta = torchgraft.train.load_checkpoint(tmp_path / "run")[1]["model"]["config"]
    assert meta["in_chans"] == 3 and meta["image_size"] == 16


@pytest.mark.parametrize("override, said", [("model.in_chans=1", "model.in_chans=1 does not fit the data "
                                             "(3-channel images); remove model.in_chans"),
                                            ("model.image_size=28", "model.image_size=28 does not fit the data "
                                             "(32x32 images); remove model.image_size")])
def test_a_stated_size_that_does_not_fit_says_so(tmp_path, capsys, override, said):
    root = rgb_tree(tmp_path / "rgb")
    code, _, err, _ = invoke_cli(["train", *LENET, "data.name=images", f"data.root={root}", "data.channels=3",
                                  "data.image_size=32", "trainer.max_steps=2", override, "--out", tmp_path / "r"],
                                 capsys)
    assert code == 2 and said in one_error(err)


def test_shape_error_message_has_no_empty_parenthesis():
    from torchgraft.train.validate import inputs_must_fit

    model = torchgraft.build("lenet", conv_channels=(4, 8), hidden=16)
    with pytest.raises(ConfigError) as e:
        with inputs_must_fit(model, {}):
            model(torch.zeros(1, 3, 32, 32))
    assert "(;" not in str(e.value) and "(model.image_size=32, model.in_chans=1)" in str(e.value)


# ---- item 7: combinations that train nothing useful

def test_warmup_not_below_max_steps_is_refused(tmp_path, capsys):
    code, _, err, secs = invoke_cli(["train", *LENET, "schedule.warmup_steps=1000000000", "trainer.max_steps=2",
                                     "--out", tmp_path / "r"], capsys)
    line = one_error(err)
    assert code == 2 and "schedule.warmup_steps=1000000000 is not below trainer.max_steps=2" in line
    assert not (tmp_path / "r").exists()
    code, _, err, _ = invoke_cli(["train", *LENET, "schedule.warmup_steps=2", "trainer.max_steps=2",
                                  "--out", tmp_path / "r"], capsys)
    assert code == 2 and "schedule.warmup_steps=2" in one_error(err)


def test_cadence_longer_than_the_run_is_said(tmp_path, capsys, recwarn):
    code, _, err, _ = invoke_cli(["train", *LENET, "trainer.max_steps=2", "eval.every=50", "checkpoint.every=100",
                                  "--out", tmp_path / "r"], capsys)
    assert code == 0, err
    said = [str(w.message) for w in recwarn]
    assert "eval.every=50 is larger than trainer.max_steps=2: the run evaluates only at its end" in said
    assert "checkpoint.every=100 is larger than trainer.max_steps=2: the run saves a checkpoint only at its end" in said


def test_batch_larger_than_the_dataset_is_refused(tmp_path, capsys):
    code, _, err, _ = invoke_cli(["train", *LENET, "data.per_class=2", "trainer.batch_size=64", "trainer.max_steps=2",
                                  "--out", tmp_path / "r"], capsys)
    assert code == 2 and "larger than the training set (20 examples" in one_error(err)


def test_grad_accum_zero_names_the_key_not_a_multiple_of_zero(tmp_path, capsys):
    code, _, err, _ = invoke_cli(["train", *LENET, "trainer.grad_accum_steps=0", "--out", tmp_path / "r"], capsys)
    line = one_error(err)
    assert code == 2 and "trainer.grad_accum_steps=0" in line and "multiple of" not in line


def test_lora_rank_above_the_layer_width_is_refused():
    from torchgraft.peft import apply_lora

    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    with pytest.raises(ConfigError, match=r"LoRA rank 512 is above the width of 2 target layer\(s\), e.g. '2' "
                                          r"\(width 4"):
        apply_lora(model, ["0", "2"], rank=512)
    assert all(p.requires_grad for p in model.parameters())  # refused before anything was frozen
    layers = apply_lora(model, ["0"], rank=16)  # rank == width is a full-rank update: allowed
    assert layers["0"].r == 16


def test_lora_target_that_matches_nothing_is_refused():
    from torchgraft.peft import apply_lora

    model = torchgraft.build("gpt-tiny", n_layer=2, n_embd=32, n_head=2, vocab_size=50, block_size=16)
    with pytest.raises(ConfigError, match="LoRA target 'q_prj' matches no Linear") as e:
        apply_lora(model, ["q_prj"], rank=2)
    assert str(e.value).count("'q_proj'") == 1  # each suggestion once (it was 'fc2' or 'fc2' or 'fc1')


# ---- item 7: the BERT task head is chosen by the builder

def test_bert_forward_does_not_read_config_task():
    """The read-out is fixed when the model is built: changing config.task afterwards changes nothing
    (before, forward branched on config.task at every call)."""
    m = torchgraft.build("bert-tiny", task="token_classification", num_labels=3, vocab_size=100,
                         block_size=16, n_layer=1, dropout=0.0).eval()
    ids = torch.randint(0, 100, (2, 5))
    logits = m(ids)
    assert logits.shape == (2, 5, 3)
    m.config.task = "none"
    assert torch.equal(m(ids), logits)
    s = torchgraft.build("bert-tiny", task="sequence_classification", num_labels=3, vocab_size=100,
                         block_size=16, n_layer=1, dropout=0.0).eval()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    want = s.classifier(s.pool(s.forward_features(ids, mask), mask))  # pooler on [CLS], then the classifier
    torch.testing.assert_close(s(ids, mask), want, rtol=0, atol=0)
    plain = torchgraft.build("bert-tiny", vocab_size=100, block_size=16, n_layer=1, dropout=0.0).eval()
    assert plain(ids).shape == (2, 5, 128) and plain.classifier is None
