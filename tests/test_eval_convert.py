"""Benchmark converters give lm-evaluation-harness' own prompts, choices and gold index for rows in
each benchmark's format (rows made here, no download): HellaSwag through lm-eval's `process_docs`,
ARC and PIQA through a ConfigurableTask with their YAML's `doc_to_*` templates."""
import json
import os
from pathlib import Path

import pytest
import yaml

from torchgraft.errors import ConfigError
from torchgraft.recipes.eval_convert import arc, convert_jsonl, hellaswag, piqa
from torchgraft.recipes.eval_tasks import load_task_file

HELLASWAG = [
    {"activity_label": "Home and Garden", "ctx_a": "[header] How to water a cactus [title] Check the soil.",
     "ctx_b": "then", "endings": ["water it  weekly [step] slowly.", "paint it.", "sell it [substeps] now.",
                                   "ignore it."], "label": "0"},
    {"activity_label": "Baking", "ctx_a": "A man mixes flour in a bowl.", "ctx_b": "he",
     "endings": ["adds eggs.", "throws the bowl.", "sings.", "leaves."], "label": 2},
]
ARC = [{"question": "Which gas do plants take in?", "choices": {"text": ["oxygen", "carbon dioxide", "helium"],
                                                                 "label": ["A", "B", "C"]}, "answerKey": "B"}]
PIQA = [{"goal": "Open a jar.", "sol1": "Twist the lid.", "sol2": "Shake the jar.", "label": 0}]


def _lm_eval_task(tmp_path: Path, name: str, rows: list[dict]):
    """lm-eval's own task YAML for `name`, pointed at `rows` in a local JSONL (offline)."""
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.task import ConfigurableTask

    f = tmp_path / f"{name}.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = {"arc": "arc/arc_easy.yaml", "piqa": "piqa/piqa.yaml"}[name]
    cfg = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / src).read_text())
    keep = {k: cfg[k] for k in ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice")}
    return ConfigurableTask(config={"task": name, "dataset_path": "json", "test_split": "test",
                                    "dataset_kwargs": {"data_files": {"test": str(f)}}, **keep})


def test_hellaswag_equals_lm_eval_process_docs():
    datasets = pytest.importorskip("datasets")
    from lm_eval.tasks.hellaswag.utils import process_docs

    rows = [{**r, "label": str(r["label"])} for r in HELLASWAG]
    ref = process_docs(datasets.Dataset.from_list(rows))
    for doc, r in zip(rows, ref):
        ours = hellaswag(doc)
        assert ours == {"context": r["query"], "choices": r["choices"], "gold": r["gold"]}
    assert "[" not in hellaswag(rows[0])["context"]


@pytest.mark.parametrize("name, rows, convert", [("arc", ARC, arc), ("piqa", PIQA, piqa)])
def test_arc_and_piqa_equal_lm_eval_templates(tmp_path, name, rows, convert):
    task = _lm_eval_task(tmp_path, name, rows)
    for doc in task.test_docs():
        ours = convert(dict(doc))
        assert ours["context"] == task.doc_to_text(doc)
        assert ours["choices"] == task.doc_to_choice(doc)
        assert ours["gold"] == task.doc_to_target(doc)


def test_convert_jsonl_writes_a_task_file_and_names_bad_lines(tmp_path):
    src = tmp_path / "hs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in HELLASWAG))
    assert convert_jsonl(src, tmp_path / "tasks" / "hellaswag.jsonl", "hellaswag") == 2
    task = load_task_file(tmp_path / "tasks" / "hellaswag.jsonl")
    assert task.kind == "multiple_choice" and [e.gold for e in task.examples] == [0, 2]
    src.write_text(json.dumps({"ctx_a": "x"}) + "\n")
    with pytest.raises(ConfigError, match=f"{src}:1: not a hellaswag row"):
        convert_jsonl(src, tmp_path / "bad.jsonl", "hellaswag")
    with pytest.raises(ConfigError, match="unknown benchmark 'hellaswg'.*hellaswag"):
        convert_jsonl(src, tmp_path / "bad.jsonl", "hellaswg")
