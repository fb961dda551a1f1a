"""The onnxruntime scripts in docs/export.md run as written against files exported by torchgraft."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import torchgraft  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs" / "export.md"


def _scripts() -> dict[str, str]:
    """{onnx file the script opens: code} for the python blocks that run an exported model."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    out = {}
    for code in blocks:
        m = re.search(r'InferenceSession\("([\w.-]+)"', code)
        if m:
            out[m.group(1)] = code
    return out


@pytest.mark.slow
def test_docs_scripts_run(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    scripts = _scripts()
    assert set(scripts) == {"lenet.onnx", "bert.onnx", "gpt.onnx", "gpt-step.onnx"}
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["a fine film", "dull", "a dull film"], trainers.WordLevelTrainer(
        special_tokens=["[PAD]", "[UNK]"]))
    tok.save(str(tok_dir / "tokenizer.json"))
    torchgraft.export(torchgraft.build("lenet"), format="onnx", path=tmp_path / "lenet.onnx",
                      metadata={"labels": [f"digit {i}" for i in range(10)]})
    torchgraft.export(torchgraft.build("bert-tiny", vocab_size=64, task="sequence_classification"),
                      format="onnx", path=tmp_path / "bert.onnx", metadata={"tokenizer": str(tok_dir)})
    gpt = torchgraft.build("gpt-tiny")
    torchgraft.export(gpt, format="onnx", path=tmp_path / "gpt.onnx")
    torchgraft.export(gpt, format="onnx", path=tmp_path / "gpt-step.onnx", kv_cache=True)
    outputs = {}
    for name, code in scripts.items():
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{name}: {r.stderr[-2000:]}"
        outputs[name] = r.stdout.strip()
    assert outputs["lenet.onnx"].startswith("['digit ")
    from torchgraft.generation import generate

    ref = generate(gpt, [[5, 6, 7, 8]], max_new_tokens=10).tokens[0]
    assert outputs["gpt-step.onnx"] == str(ref) == outputs["gpt.onnx"]
