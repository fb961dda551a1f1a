"""Built-in image data: scikit-learn's 8x8 handwritten digits as normalised 1x32x32 tensors.

The 8x8 images (values 0..16) are upscaled bilinearly to 28x28 and zero-padded to 32x32 (the
MNIST/LeNet layout), then normalised with the mean/std of all 1,797 images. The train/val split
is stratified by label and fixed by `split_seed` (not the run seed), so every run and every
label subset sees the same validation images.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from torchgraft.config import from_dict
from torchgraft.data.loader import DictTensorDataset
from torchgraft.data.registry import DataBundle, register_dataset
from torchgraft.errors import ConfigError


@dataclass
class DigitsConfig:
    labels: list[int] | None = None     # keep only these digits, relabelled 0..K-1 in this order
    per_class: int | None = None        # take only N training images per class (val is untouched)
    val_fraction: float = 0.2
    split_seed: int = 0


def load_digits_arrays():
    """(images (1797, 8, 8), labels) of `sklearn.datasets.load_digits`.

    Reads the CSV that ships inside scikit-learn directly (located without importing sklearn, which
    saves ~2 s per process); falls back to `load_digits()` if the file is not where expected.
    """
    import importlib.util
    from pathlib import Path

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        csv = Path(loc) / "datasets" / "data" / "digits.csv.gz"
        if csv.is_file():
            data = np.loadtxt(csv, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


@lru_cache(maxsize=1)
def _all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(images (1797, 1, 32, 32) float32 normalised, labels (1797,) long)."""
    images, target = load_digits_arrays()
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)  # (N, 1, 28, 28)
    x = F.pad(x, (2, 2, 2, 2))  # (N, 1, 32, 32)
    x = (x - x.mean()) / x.std()
    return x.contiguous(), torch.tensor(target, dtype=torch.long)


def digits_split(cfg: DigitsConfig) -> tuple[DictTensorDataset, DictTensorDataset, list[int]]:
    """Return (train, val, labels kept) for `cfg`."""
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {cfg.val_fraction}")
    labels = list(range(10)) if cfg.labels is None else list(cfg.labels)
    bad = [lab for lab in labels if not 0 <= lab <= 9]
    if bad or len(set(labels)) != len(labels) or not labels:
        raise ConfigError(f"data.labels must be distinct digits 0-9, got {cfg.labels}")
    if cfg.per_class is not None and cfg.per_class < 1:
        raise ConfigError(f"data.per_class must be >= 1, got {cfg.per_class}")
    x, y = _all_digits()
    train_idx, val_idx = [], []
    for new_label, digit in enumerate(labels):
        idx = (y == digit).nonzero().squeeze(1)
        g = torch.Generator().manual_seed(cfg.split_seed * 100 + digit)  # per digit: subsets agree
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = round(len(idx) * cfg.val_fraction)
        tr = idx[n_val:]
        if cfg.per_class is not None:
            if cfg.per_class > len(tr):
                raise ConfigError(f"data.per_class={cfg.per_class} but digit {digit} has only "
                                  f"{len(tr)} training images")
            tr = tr[: cfg.per_class]
        train_idx.append(tr)
        val_idx.append(idx[:n_val])
    remap = torch.full((10,), -1, dtype=torch.long)
    remap[torch.tensor(labels)] = torch.arange(len(labels))
    tr, va = torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values
    train = DictTensorDataset(inputs=x[tr], labels=remap[y[tr]])
    val = DictTensorDataset(inputs=x[va], labels=remap[y[va]])
    return train, val, labels


def build_digits(options: dict, seed: int = 0) -> DataBundle:
    """Dataset builder for `data: {name: digits, labels: [...], per_class: N, ...}`."""
    cfg = from_dict(DigitsConfig, options, prefix="data")
    train, val, labels = digits_split(cfg)
    return DataBundle(train=train, val=val, task="classification",
                      info={"num_classes": len(labels), "digits": labels,
                            "input_shape": (1, 32, 32)})


register_dataset("digits", build_digits)
