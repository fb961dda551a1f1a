"""Image folders: a class-per-folder tree (or a CSV of `path,label`) decoded with Pillow.

    data: {name: images, root: photos/, image_size: 64, channels: 3, augment: true, num_workers: 2}

Sources:
- `root: DIR` with one sub-folder per class (`DIR/<label>/*.png|jpg|...`); class names are the
  folder names, sorted, and class `i` is the i-th name;
- `root: FILE.csv` with rows `path,label` (header optional; paths relative to the CSV's folder);
- `val_root:` the same for a separate validation tree/CSV, else a seeded split of `root` by
  `val_fraction`, stratified per class (fixed by `split_seed`, not the run seed).

Each image is decoded, converted to `channels` (1 = grey "L", 3 = "RGB"; palettes, alpha and
16-bit greys are converted by Pillow), then
- training with `augment: true`: random resized crop (area `crop_scale`, aspect 3/4..4/3) to
  `image_size` and a horizontal flip with probability 1/2, drawn from a generator seeded by
  (run seed, epoch, index): the same epoch and index always give the same pixels, in any worker
  process, so resume is exact;
- otherwise (validation, prediction, `augment: false`): resize the shorter side to `image_size`
  and centre-crop;
- scaled to [0, 1] and normalised with `mean` / `std` (one value per channel; default 0.5 / 0.5).

Files that Pillow cannot decode are found once when the dataset is built (every file is opened and
decoded), counted, left out and named in one warning (the first few), so an epoch never crashes on
them. Batches: {"inputs": (B, C, H, W) float32, "labels": (B,) long}. The class names are written
to `labels.json` in the run directory; `torchgraft predict` reads them with the run's `data:`
section to preprocess new images the same way.
"""
from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from torchgraft.config import from_dict
from torchgraft.data.registry import LABELS_FILE, DataBundle, register_dataset, register_encoder
from torchgraft.errors import ConfigError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_SHOW_BAD = 3  # bad files named in the warning


@dataclass
class ImagesConfig:
    """Options of the "images" dataset (`data:` section)."""
    root: str = ""                        # class-per-folder directory, or a CSV of path,label
    val_root: str | None = None           # separate validation directory / CSV
    val_fraction: float = 0.2             # held out of `root` when there is no val_root
    split_seed: int = 0
    image_size: int | list[int] = 32      # side, or [height, width]
    channels: int = 3                     # 1 (grey) or 3 (RGB)
    mean: list[float] | None = None       # per channel (or one value); default 0.5
    std: list[float] | None = None        # per channel (or one value); default 0.5
    augment: bool = True                  # random resized crop + horizontal flip when training
    crop_scale: list[float] | None = None  # area range of the random crop; default [0.35, 1.0]
    hflip: bool = True                    # the flip part of augmentation
    num_workers: int = 0                  # DataLoader worker processes decoding images


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a tensor (everything predict needs besides the weights)."""
    size: tuple[int, int]                 # (H, W)
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_config(cls, cfg: ImagesConfig) -> Preprocess:
        if cfg.channels not in (1, 3):
            raise ConfigError(f"data.channels must be 1 (grey) or 3 (RGB), got {cfg.channels}")
        size = cfg.image_size
        hw = (size, size) if isinstance(size, int) else tuple(size)
        if len(hw) != 2 or min(hw) < 1:
            raise ConfigError(f"data.image_size must be a positive side or [height, width], got {size}")

        def per_channel(v: list[float] | None, name: str) -> tuple[float, ...]:
            v = [0.5] if v is None else list(v)
            if len(v) == 1:
                v = v * cfg.channels
            if len(v) != cfg.channels:
                raise ConfigError(f"data.{name} needs 1 or {cfg.channels} values, got {v}")
            return tuple(float(x) for x in v)

        std = per_channel(cfg.std, "std")
        if min(std) <= 0:
            raise ConfigError(f"data.std values must be > 0, got {list(std)}")
        return cls((int(hw[0]), int(hw[1])), cfg.channels, per_channel(cfg.mean, "mean"), std)

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    def open(self, path: str | Path):
        """Decode `path` into a Pillow image of this mode (raises OSError / ValueError if unreadable)."""
        from PIL import Image

        with Image.open(path) as im:
            im.draft(self.mode, (self.size[1], self.size[0]))  # JPEG: decode at a reduced size
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")
            return im.convert(self.mode)

    def to_tensor(self, im) -> torch.Tensor:
        """A Pillow image of `size` -> normalised (C, H, W) float32."""
        a = np.asarray(im, dtype=np.uint8)
        a = a[:, :, None] if a.ndim == 2 else a  # (H, W, C)
        x = torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(255.0)  # (C, H, W)
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return (x - mean) / std

    def center(self, im):
        """Resize the shorter side to fit `size`, then centre-crop to `size`."""
        from PIL import Image

        h, w = self.size
        scale = max(h / im.height, w / im.width)
        nw, nh = max(w, round(im.width * scale)), max(h, round(im.height * scale))
        im = im.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = (nw - w) // 2, (nh - h) // 2
        return im.crop((left, top, left + w, top + h))

    def random_crop(self, im, rng: np.random.Generator, scale: tuple[float, float], flip: bool):
        """Random resized crop (area in `scale`, aspect 3/4..4/3) to `size`, then maybe a flip."""
        from PIL import Image

        W, H = im.width, im.height
        area = W * H
        box = None
        for _ in range(10):
            target = area * rng.uniform(scale[0], scale[1])
            aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
            cw, ch = round((target * aspect) ** 0.5), round((target / aspect) ** 0.5)
            if 0 < cw <= W and 0 < ch <= H:
                x0, y0 = int(rng.integers(0, W - cw + 1)), int(rng.integers(0, H - ch + 1))
                box = (x0, y0, x0 + cw, y0 + ch)
                break
        if box is None:  # fall back to the largest centred square-ish crop
            c = min(W, H)
            box = ((W - c) // 2, (H - c) // 2, (W - c) // 2 + c, (H - c) // 2 + c)
        im = im.resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR, box=box)
        if flip and rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return im


class ImageFolderDataset(Dataset):
    """`(path, label)` items decoded on access. Keys are `i` (deterministic centre crop) or, when
    training with augmentation, `(epoch, i)` (see `StatefulLoader`): augmentation is drawn from a
    generator seeded by (seed, epoch, i)."""

    def __init__(self, items: list[tuple[str, int]], pre: Preprocess, *, augment: bool = False,
                 seed: int = 0, crop_scale: tuple[float, float] = (0.35, 1.0), hflip: bool = True):
        self.items, self.pre = items, pre
        self.augment, self.seed = augment, seed
        self.crop_scale, self.hflip = crop_scale, hflip
        self.epoch_keys = augment  # the loader passes (epoch, index) keys

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        path, label = self.items[i]
        im = self.pre.open(path)
        if self.augment:
            rng = np.random.default_rng([self.seed, epoch, i])
            im = self.pre.random_crop(im, rng, self.crop_scale, self.hflip)
        else:
            im = self.pre.center(im)
        return {"inputs": self.pre.to_tensor(im), "labels": torch.tensor(label, dtype=torch.long)}


# ---- scanning ---------------------------------------------------------------------------------------
def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def scan_folder(root: Path) -> list[tuple[Path, str]]:
    """(file, class name) for every image under `root/<class>/` (recursively), sorted."""
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    out, empty = [], []
    for d in classes:
        found = [(f, d.name) for f in sorted(d.rglob("*")) if _is_image(f)]
        out += found
        if not found:
            empty.append(d.name)
    if empty and out:
        warn_left_out(empty, root, "hold no images")
    return out


def warn_left_out(classes: list[str], root: Any, why: str) -> None:
    """A class folder that yields no usable image is not a class: say so, naming it."""
    names = ", ".join(repr(c) for c in classes[:_SHOW_BAD]) + (", ..." if len(classes) > _SHOW_BAD else "")
    warnings.warn(f"{root}: class folder(s) {names} {why} and are left out of the classes (and labels.json)",
                  stacklevel=4)


def scan_csv(path: Path) -> list[tuple[Path, str]]:
    """(file, label) rows of a `path,label` CSV (a first row `path,label` is a header)."""
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a UTF-8 CSV of path,label rows") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    out = []
    for n, r in enumerate(rows, 1):
        if len(r) < 2 or not r[0].strip() or not r[1].strip():
            raise ConfigError(f"{path}: row {n} is not `path,label`: {r}")
        f = Path(r[0].strip())
        out.append((f if f.is_absolute() else path.parent / f, r[1].strip()))
    return out


def scan_source(source: str, what: str) -> list[tuple[Path, str]]:
    """Scan a directory or CSV given as `data.<what>`; a clear error when it is unusable."""
    if not source:
        raise ConfigError(f"data.{what} is required: a folder with one sub-folder per class, or a "
                          "CSV of path,label")
    p = Path(source).expanduser()
    if not p.exists():
        raise ConfigError(f"data.{what}: {p} does not exist (give a folder with one sub-folder per "
                          "class, or a CSV of path,label)")
    try:
        found = scan_csv(p) if p.is_file() else scan_folder(p)
    except PermissionError as e:
        raise ConfigError(f"data.{what}: cannot read {e.filename or p} (permission denied)") from None
    if not found:
        raise ConfigError(f"data.{what}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {p}; "
                          "expected ROOT/<class name>/<image files>")
    return found


def drop_unreadable(files: list[tuple[Path, str]], pre: Preprocess, what: str) -> tuple[list[tuple[Path, str]], list[Path]]:
    """Decode every file once; return (readable files, unreadable ones) and warn about the latter."""
    from PIL import Image

    good, bad = [], []
    for f, label in files:
        try:
            pre.open(f)
            good.append((f, label))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            bad.append(f)
    if bad:
        names = ", ".join(str(b) for b in bad[:_SHOW_BAD]) + (", ..." if len(bad) > _SHOW_BAD else "")
        warnings.warn(f"data.{what}: skipped {len(bad)} unreadable image file(s) of {len(files)}: {names}",
                      stacklevel=3)
    return good, bad


def _split(items: list[tuple[Path, str]], fraction: float, seed: int) -> tuple[list, list]:
    """Per-class seeded split: round(n * fraction) of each class (at least one if it has 2+) to val."""
    by_class: dict[str, list[tuple[Path, str]]] = {}
    for it in items:
        by_class.setdefault(it[1], []).append(it)
    train, val = [], []
    for k, (name, group) in enumerate(sorted(by_class.items())):
        g = torch.Generator().manual_seed(seed * 1_000_003 + k)
        order = torch.randperm(len(group), generator=g).tolist()
        n_val = round(len(group) * fraction)
        if fraction > 0 and n_val == 0 and len(group) > 1:
            n_val = 1
        n_val = min(n_val, len(group) - 1)
        val += [group[i] for i in sorted(order[:n_val])]
        train += [group[i] for i in sorted(order[n_val:])]
    return train, val


def build_images(options: dict[str, Any], seed: int = 0) -> DataBundle:
    """Builder of the "images" dataset (see the module docstring)."""
    cfg = from_dict(ImagesConfig, options, prefix="data")
    pre = Preprocess.from_config(cfg)
    scale = tuple(cfg.crop_scale or (0.35, 1.0))
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"data.crop_scale must be [low, high] with 0 < low <= high <= 1, got {cfg.crop_scale}")
    if cfg.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {cfg.num_workers}")
    scanned = scan_source(cfg.root, "root")
    train_files, _ = drop_unreadable(scanned, pre, "root")
    lost = sorted({c for _, c in scanned} - {c for _, c in train_files})
    if lost and train_files:
        warn_left_out(lost, cfg.root, "hold only unreadable images")
    if cfg.val_root:
        val_files, _ = drop_unreadable(scan_source(cfg.val_root, "val_root"), pre, "val_root")
    else:
        if not 0.0 <= cfg.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
        train_files, val_files = _split(train_files, cfg.val_fraction, cfg.split_seed)
    names = sorted({label for _, label in train_files})
    if not names:
        raise ConfigError(f"data.root: none of the images in {cfg.root} can be read")
    if len(names) < 2:
        raise ConfigError(f"data.root: classification needs at least 2 classes, found only {names[0]!r} "
                          f"in {cfg.root}; put each class's images in its own sub-folder")
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({label for _, label in val_files} - set(names))
    if unknown:
        raise ConfigError(f"data.val_root has class(es) {unknown} that the training data lacks "
                          f"(training classes: {names}); add training images or remove them")
    train = ImageFolderDataset([(str(f), index[c]) for f, c in train_files], pre, augment=cfg.augment,
                               seed=seed, crop_scale=scale, hflip=cfg.hflip)
    val = ImageFolderDataset([(str(f), index[c]) for f, c in val_files], pre) if val_files else None
    info = {"num_classes": len(names), "labels": names, "input_shape": (pre.channels, *pre.size),
            "n_train": len(train), "n_val": len(val) if val is not None else 0}
    task = {"name": "image_classification", "label_names": names}
    return DataBundle(train=train, val=val, task=task, info=info, num_workers=cfg.num_workers,
                      files={LABELS_FILE: json.dumps(names, indent=1) + "\n"})


def image_encoder(options: dict[str, Any], run_dir: Any):
    """For predict: image paths -> {"inputs": (N, C, H, W)} preprocessed like the run's validation data."""
    opts = {k: v for k, v in options.items() if k in ImagesConfig.__dataclass_fields__}
    pre = Preprocess.from_config(from_dict(ImagesConfig, opts, prefix="data"))

    def encode(inputs: list[str]) -> dict[str, torch.Tensor]:
        xs = []
        for s in inputs:
            try:
                xs.append(pre.to_tensor(pre.center(pre.open(s))))
            except FileNotFoundError:
                raise ConfigError(f"image not found: {s}") from None
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot read image {s}: {e}") from None
        return {"inputs": torch.stack(xs)}

    return encode


register_dataset("images", build_images)
register_encoder("images", image_encoder, task="image_classification")
