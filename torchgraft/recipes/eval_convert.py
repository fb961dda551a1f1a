"""Benchmark files -> `torchgraft eval --tasks` JSONL (`context`, `choices`, `gold`), with the prompt
each benchmark has in lm-evaluation-harness, so 0-shot scores equal lm-eval's task of the same name.

    from torchgraft.recipes.eval_convert import convert_jsonl
    convert_jsonl("hellaswag_val.jsonl", "tasks/hellaswag.jsonl", "hellaswag")
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torchgraft.errors import ConfigError, did_you_mean
from torchgraft.io import atomic_write_text


def _hellaswag_text(text: str) -> str:
    """lm-eval's `tasks/hellaswag/utils.py:preprocess` (WikiHow bracket artifacts removed)."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def hellaswag(doc: dict[str, Any]) -> dict[str, Any]:
    """A HellaSwag row (`activity_label`, `ctx_a`, `ctx_b`, `endings`, `label`) as lm-eval prompts it."""
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {"context": _hellaswag_text(doc["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_text(e) for e in doc["endings"]], "gold": int(doc["label"])}


def arc(doc: dict[str, Any]) -> dict[str, Any]:
    """An AI2 ARC row (`question`, `choices: {text, label}`, `answerKey`) as lm-eval's arc_easy/challenge."""
    return {"context": f"Question: {doc['question']}\nAnswer:", "choices": list(doc["choices"]["text"]),
            "gold": list(doc["choices"]["label"]).index(doc["answerKey"])}


def piqa(doc: dict[str, Any]) -> dict[str, Any]:
    """A PIQA row (`goal`, `sol1`, `sol2`, `label`) as lm-eval's piqa."""
    return {"context": f"Question: {doc['goal']}\nAnswer:", "choices": [doc["sol1"], doc["sol2"]],
            "gold": int(doc["label"])}


CONVERTERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"hellaswag": hellaswag, "arc": arc,
                                                                      "piqa": piqa}


def convert_jsonl(src: str | Path, dst: str | Path, benchmark: str) -> int:
    """Convert every line of `src` (the benchmark's own JSONL) into a task file at `dst`; returns the
    number of examples. A line missing a field is one error naming the line."""
    if benchmark not in CONVERTERS:
        raise ConfigError(f"unknown benchmark {benchmark!r}" + did_you_mean(benchmark, CONVERTERS)
                          + f"; known: {', '.join(sorted(CONVERTERS))}")
    convert, rows = CONVERTERS[benchmark], []
    from torchgraft.outputs import read_input_text

    text = read_input_text(src, f"{benchmark} file", "the benchmark's JSONL, one example per line")
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.dumps(convert(json.loads(line))))
            except (KeyError, ValueError, TypeError, AttributeError) as e:
                raise ConfigError(f"{src}:{i}: not a {benchmark} row ({type(e).__name__}: {e})") from None
    out = Path(dst)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(r + "\n" for r in rows))
    return len(rows)
