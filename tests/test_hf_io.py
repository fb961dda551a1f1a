"""torchgraft.interop.safetensors_io: lazy reader and streaming writer against the `safetensors` library."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from torchgraft.errors import CheckpointError
from torchgraft.interop.safetensors_io import (
    CheckpointReader,
    PendingTensor,
    SafetensorsFile,
    parse_size,
    pending,
    write_hf_weights,
)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "w.f32": torch.randn(5, 7, generator=g),
        "w.bf16": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "w.f16": torch.randn(9, generator=g).to(torch.float16),
        "ids": torch.arange(11, dtype=torch.int64).reshape(1, 11),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "flags": torch.tensor([True, False, True]),
        "small": torch.arange(-3, 4, dtype=torch.int8),
    }


def test_reader_matches_safetensors_library(tmp_path):
    ts = _tensors()
    save_file(ts, tmp_path / "model.safetensors", metadata={"format": "pt", "note": "x"})
    r = CheckpointReader(tmp_path)
    assert sorted(r.keys()) == sorted(ts)
    for k, v in ts.items():
        got = r.get(k)
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
    assert r.total_bytes == sum(v.numel() * v.element_size() for v in ts.values())
    assert SafetensorsFile(tmp_path / "model.safetensors").metadata["note"] == "x"


def test_writer_output_is_read_by_safetensors_library(tmp_path):
    ts = _tensors()
    calls = []

    def lazy(k, v):
        def produce():
            calls.append(k)
            return v
        return PendingTensor(k, tuple(v.shape), v.dtype, produce)

    files = write_hf_weights(tmp_path, [lazy(k, v) for k, v in ts.items()])
    assert files == [tmp_path / "model.safetensors"]
    assert calls == list(ts)  # each tensor produced exactly once, in order
    back = load_file(tmp_path / "model.safetensors")
    for k, v in ts.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_sharded_write_and_read(tmp_path):
    ts = {f"layer.{i}.w": torch.full((16, 16), float(i)) for i in range(6)}  # 1 KiB each
    files = write_hf_weights(tmp_path, [pending(k, v) for k, v in ts.items()], max_shard_size=2100)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["metadata"]["total_size"] == 6 * 1024
    assert len(files) == 4
    r = CheckpointReader(tmp_path)
    for k, v in ts.items():
        assert torch.equal(r.get(k), v)
    # rewriting unsharded removes the stale shards and index
    write_hf_weights(tmp_path, [pending(k, v) for k, v in ts.items()])
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert not list(tmp_path.glob("model-*-of-*"))
    assert torch.equal(CheckpointReader(tmp_path).get("layer.5.w"), ts["layer.5.w"])


def test_parse_size():
    assert parse_size("5GB") == 5_000_000_000
    assert parse_size("20KB") == 20_000
    assert parse_size("1MiB") == 1024 * 1024
    assert parse_size(123) == 123
    with pytest.raises(CheckpointError, match="cannot read size"):
        parse_size("lots")


def test_corrupt_files_give_clear_errors(tmp_path):
    save_file({"a": torch.randn(100)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-40])  # truncated
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        CheckpointReader(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="bad header length"):
        CheckpointReader(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 8) + b"not json")
    with pytest.raises(CheckpointError, match="corrupted safetensors header"):
        CheckpointReader(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        CheckpointReader(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="never unpickles"):
        CheckpointReader(tmp_path)


def test_missing_shard_is_reported(tmp_path):
    ts = {f"t{i}": torch.randn(64) for i in range(3)}
    write_hf_weights(tmp_path, [pending(k, v) for k, v in ts.items()], max_shard_size=300)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors .*missing"):
        CheckpointReader(tmp_path)
