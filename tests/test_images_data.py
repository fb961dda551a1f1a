"""The `images` dataset: class folders of PNG/JPEG, grey/RGB, corrupt files skipped and counted,
seeded augmentation, worker decoding with exact resume, and the image classification task's metrics."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from torchgraft.data import build_data
from torchgraft.data.loader import StatefulLoader, StatefulSampler
from torchgraft.errors import ConfigError


def make_tree(root, per_class=6, size=(20, 14)):
    """cats: RGB PNGs; dogs: grey JPEGs; owls: mixed (RGBA PNG, palette PNG, grey PNG, RGB JPEG)."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cats", "dogs", "owls"]):
        d = root / name
        d.mkdir(parents=True)
        for i in range(per_class):
            base = (rng.random((size[1], size[0], 3)) * 80 + c * 80).astype(np.uint8)
            im = Image.fromarray(base, "RGB")
            if name == "cats":
                im.save(d / f"{i}.png")
            elif name == "dogs":
                im.convert("L").save(d / f"{i}.jpg", quality=95)
            else:
                kind = i % 4
                if kind == 0:
                    im.convert("RGBA").save(d / f"{i}.png")
                elif kind == 1:
                    im.convert("P").save(d / f"{i}.png")
                elif kind == 2:
                    im.convert("L").save(d / f"{i}.PNG")
                else:
                    im.save(d / f"{i}.jpeg")
    return root


def test_folder_png_jpeg_grey_rgb_and_corrupt_skipped(tmp_path):
    root = make_tree(tmp_path / "pics")
    (root / "cats" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "dogs" / "empty.jpg").write_bytes(b"")
    (root / "dogs" / "notes.txt").write_text("ignored: not an image suffix")
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image file\(s\) of 20: .*broken\.png.*empty\.jpg"):
        b = build_data({"name": "images", "root": str(root), "image_size": 16, "channels": 3,
                        "val_fraction": 0.34, "augment": False})
    assert b.info["labels"] == ["cats", "dogs", "owls"] and b.info["num_classes"] == 3
    assert b.info["n_train"] + b.info["n_val"] == 18 and b.info["n_val"] == 6  # 2 per class
    assert json.loads(b.files["labels.json"]) == ["cats", "dogs", "owls"]
    assert b.task == {"name": "image_classification", "label_names": ["cats", "dogs", "owls"]}
    items = [b.train[i] for i in range(len(b.train))]
    assert all(it["inputs"].shape == (3, 16, 16) and it["inputs"].dtype == torch.float32 for it in items)
    assert sorted({int(it["labels"]) for it in items}) == [0, 1, 2]
    # grey JPEGs become 3 equal channels; default normalisation (x - 0.5) / 0.5 stays in [-1, 1]
    dog = next(it for it in items if int(it["labels"]) == 1)["inputs"]
    assert torch.equal(dog[0], dog[1]) and torch.equal(dog[1], dog[2])  # the same pixels, the same ops
    assert all(it["inputs"].min() >= -1 and it["inputs"].max() <= 1 for it in items)
    # channels=1 with stated mean/std
    g = build_data({"name": "images", "root": str(root), "image_size": [8, 12], "channels": 1,
                    "mean": [0.25], "std": [0.5], "augment": False})
    x = g.train[0]["inputs"]
    assert x.shape == (1, 8, 12)
    pix = np.asarray(Image.open(g.train.items[0][0]).convert("L").resize((12, 8)), dtype=np.float32) / 255
    assert x.min() >= (0 - 0.25) / 0.5 - 1e-6 and abs(float(x.mean()) - float((pix.mean() - 0.25) / 0.5)) < 0.05


def test_separate_val_tree_and_csv(tmp_path):
    make_tree(tmp_path / "train", per_class=3)
    make_tree(tmp_path / "val", per_class=2)
    b = build_data({"name": "images", "root": str(tmp_path / "train"), "val_root": str(tmp_path / "val"),
                    "image_size": 8})
    assert len(b.train) == 9 and len(b.val) == 6
    rows = ["path,label"] + [f"train/{c}/{i}.{ext}" for c, ext in (("cats", "png"), ("dogs", "jpg"))
                             for i in range(3)]
    rows = [rows[0]] + [f"{r},{r.split('/')[1]}" for r in rows[1:]]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    c = build_data({"name": "images", "root": str(tmp_path / "list.csv"), "val_fraction": 0.0, "image_size": 8})
    assert c.info["labels"] == ["cats", "dogs"] and len(c.train) == 6 and c.val is None


def test_augmentation_is_seeded_by_epoch_and_index(tmp_path):
    root = make_tree(tmp_path / "pics", per_class=2, size=(40, 30))
    b = build_data({"name": "images", "root": str(root), "image_size": 16, "val_fraction": 0.0}, seed=3)
    ds = b.train
    assert ds.epoch_keys
    a1, a2 = ds[(0, 1)]["inputs"], ds[(0, 1)]["inputs"]
    assert torch.equal(a1, a2)                                    # same (seed, epoch, index): same pixels
    assert not torch.equal(a1, ds[(1, 1)]["inputs"])              # another epoch: another crop
    other = build_data({"name": "images", "root": str(root), "image_size": 16, "val_fraction": 0.0}, seed=4)
    assert not torch.equal(a1, other.train[(0, 1)]["inputs"])     # another run seed: another crop


def _draw(loader, n):
    return [next(loader) for _ in range(n)]


def test_workers_resume_is_bitwise_equal(tmp_path):
    root = make_tree(tmp_path / "pics", per_class=5, size=(24, 24))
    b = build_data({"name": "images", "root": str(root), "image_size": 12, "val_fraction": 0.0}, seed=1)

    def loader(workers):
        return StatefulLoader(b.train, StatefulSampler(len(b.train), 4, seed=7), num_workers=workers)

    ref = _draw(loader(0), 9)                        # 3 batches per epoch: crosses two epoch boundaries
    first = loader(2)
    got = _draw(first, 4)
    state = first.state_dict()
    first.close()
    del first                                        # "killed": its prefetched batches are lost
    resumed = loader(2)
    resumed.load_state_dict(state)
    got += _draw(resumed, 5)
    resumed.close()
    for r, g in zip(ref, got, strict=True):
        assert torch.equal(r["inputs"], g["inputs"]) and torch.equal(r["labels"], g["labels"])


def test_bad_image_inputs(tmp_path):
    one = tmp_path / "one"
    make_tree(tmp_path / "full", per_class=2)
    (one / "cats").mkdir(parents=True)
    for f in (tmp_path / "full" / "cats").iterdir():
        (one / "cats" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ConfigError, match="at least 2 classes, found only 'cats'"):
        build_data({"name": "images", "root": str(one)})
    with pytest.raises(ConfigError, match="does not exist"):
        build_data({"name": "images", "root": str(tmp_path / "nope")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images"):
        build_data({"name": "images", "root": str(tmp_path / "empty")})
    with pytest.raises(ConfigError, match="channels must be 1"):
        build_data({"name": "images", "root": str(tmp_path / "full"), "channels": 4})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError, match=r"class\(es\) \['owls'\] that the training data lacks"):
            make_tree(tmp_path / "v", per_class=1)
            import shutil
            shutil.rmtree(tmp_path / "full" / "owls")
            build_data({"name": "images", "root": str(tmp_path / "full"), "val_root": str(tmp_path / "v")})


def test_image_task_macro_f1_and_confusion_png():
    sklearn = pytest.importorskip("sklearn.metrics")
    from torchgraft.train.tasks import build_task

    task = build_task({"name": "image_classification", "label_names": ["a", "b", "c", "d"]})
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    sums: dict = {}
    preds, labels = [], []
    torch.set_grad_enabled(False)
    for _ in range(3):  # summed over batches as the trainer does
        x, y = torch.randn(10, 3, 2, 2), torch.randint(0, 3, (10,))  # class d never occurs as a label
        batch = {"inputs": x, "labels": y}
        s = task.eval_sums(model, batch)
        for k, v in s.items():
            sums[k] = sums[k] + v if k in sums else v
        preds.append(model(x).argmax(-1))
        labels.append(y)
    p, y = torch.cat(preds), torch.cat(labels)
    m = task.metrics({k: (v if k == "confusion" else float(v)) for k, v in sums.items()})
    assert m["val_accuracy"] == pytest.approx(float((p == y).float().mean()))
    assert m["val_macro_f1"] == pytest.approx(sklearn.f1_score(y, p, average="macro"), abs=1e-9)
    assert task.higher_is_better("val_macro_f1") and task.default_metric == "val_accuracy"
    assert sums["confusion"].tolist() == sklearn.confusion_matrix(y, p, labels=[0, 1, 2, 3]).tolist()
    files = task.eval_files(sums)
    assert files["confusion_matrix.png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(files["confusion_matrix.json"])["labels"] == ["a", "b", "c", "d"]
    torch.set_grad_enabled(True)


RESUME_SCRIPT = """
import sys, time
import torch
torch.set_num_threads(1)
from torchgraft.train import Callback, run_training

root, out, resume, delay = sys.argv[1], sys.argv[2], sys.argv[3] == "1", float(sys.argv[4])
cfg = {"model": {"name": "lenet", "in_chans": 3, "image_size": 16},
       "data": {"name": "images", "root": root, "image_size": 16, "val_fraction": 0.25, "num_workers": 2,
                "crop_scale": [0.5, 1.0]},
       "optim": {"name": "adamw", "lr": 2e-3}, "schedule": {"name": "constant"},
       "trainer": {"max_steps": 24, "batch_size": 4, "seed": 5},
       "eval": {"every": 12}, "checkpoint": {"every": 4, "keep_last": 2},
       "logging": {"every": 1, "progress": False, "tensorboard": False, "measure_flops": False}}

class Slow(Callback):
    def on_step_end(self, trainer, record):
        time.sleep(delay)

run_training(cfg, out, resume=resume, callbacks=[Slow()])
"""


@pytest.mark.slow
def test_sigkill_and_resume_with_workers_is_bitwise_equal(tmp_path):
    """A training run decoding with 2 worker processes and random augmentation, killed with SIGKILL
    and resumed, ends with exactly the weights of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    from torchgraft.checkpoint.files import list_checkpoints

    root = make_tree(tmp_path / "pics", per_class=6, size=(20, 20))
    script = tmp_path / "train.py"
    script.write_text(RESUME_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(out, resume, delay):
        return subprocess.Popen([sys.executable, str(script), str(root), str(out), "1" if resume else "0",
                                 str(delay)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    ref = run(tmp_path / "ref", False, 0.0)
    victim = run(tmp_path / "run", False, 0.1)
    ckpts = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and len(list_checkpoints(ckpts)) < 2 and victim.poll() is None:
        time.sleep(0.01)
    time.sleep(0.15)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert list_checkpoints(ckpts)[-1].name < "step_00000024"  # it really was interrupted
    resumed = run(tmp_path / "run", True, 0.0)
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()[-2000:]
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]
    a = load_file(list_checkpoints(tmp_path / "ref" / "checkpoints")[-1] / "model.safetensors")
    b = load_file(list_checkpoints(ckpts)[-1] / "model.safetensors")
    assert list_checkpoints(ckpts)[-1].name == "step_00000024"
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
