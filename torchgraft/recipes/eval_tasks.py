"""`torchgraft eval RUN --tasks FILE.jsonl|DIR`: multiple-choice and generation tasks from local JSONL,
scored the way lm-evaluation-harness (0.4) scores them.

A task is one JSONL file (a directory: every `*.jsonl` in it except `*.fewshot.jsonl`), one example
per line, all of one kind:
- multiple choice: `{"context": str, "choices": [str, ...], "gold": int}`;
- generation: `{"context": str, "answer": str | [str, ...], "until": [str, ...]}` (`until` optional,
  default `["\\n\\n"]`).

Multiple choice, as lm-eval's `output_type: multiple_choice` with `target_delimiter=" "`: each choice
is the continuation `" " + choice` of the context; its log-likelihood is the sum of the model's
log-probabilities of the continuation's tokens. Tokenization follows lm-eval's causal-LM rule:
trailing spaces of the context move to the continuation, `context + continuation` is encoded as one
string and the continuation's tokens are those past the context's own encoding (so a BPE merge across
the boundary is kept); an empty context is the bos (else eos) token; the input is left-truncated to
the model's block_size. `acc`: the gold choice has the largest log-likelihood (first on ties);
`acc_norm`: the same after dividing each by its choice's length in characters. `*_stderr`: the sample
standard error of the mean, as lm-eval reports.

Generation: greedy decoding from the prompt (left-truncated to leave room for `max_new_tokens`),
cut at the first `until` string; `exact_match`: the stripped output equals a stripped answer.

Few-shot (`num_fewshot=k`): lm-eval's `first_n` sampler: the first k examples of `NAME.fewshot.jsonl`
next to the task file when it exists, else of the task file itself without the example being scored;
each is `context + " " + answer + "\\n\\n"`, before the example's context.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchgraft.data.tokenizers import Tokenizer
from torchgraft.errors import ConfigError

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
DEFAULT_UNTIL = ("\n\n",)


@dataclass(frozen=True)
class Example:
    """One line of a task file: `choices` + `gold` (multiple choice) or `answers` + `until` (generation)."""
    context: str
    choices: tuple[str, ...] = ()
    gold: int = -1
    answers: tuple[str, ...] = ()
    until: tuple[str, ...] = DEFAULT_UNTIL

    @property
    def target(self) -> str:
        """The answer text shown in a few-shot example."""
        return self.choices[self.gold] if self.choices else self.answers[0]


@dataclass
class TaskFile:
    name: str
    kind: str  # "multiple_choice" | "generation"
    examples: list[Example]
    fewshot: list[Example] | None = None  # from NAME.fewshot.jsonl; None: the task's own examples
    path: Path = field(default_factory=Path)


# ---- reading task files -----------------------------------------------------------------------------
def _example(obj: Any, where: str) -> Example:
    if not isinstance(obj, dict) or not isinstance(obj.get("context"), str):
        raise ConfigError(f"{where}: each line must be a JSON object with a string \"context\"")
    if "choices" in obj:
        choices, gold = obj["choices"], obj.get("gold")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise ConfigError(f"{where}: \"choices\" must be a list of at least two non-empty strings")
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise ConfigError(f"{where}: \"gold\" must be the index (0..{len(choices) - 1}) of the right choice, "
                              f"got {gold!r}")
        return Example(obj["context"], tuple(choices), gold)
    if "answer" in obj:
        answers = obj["answer"] if isinstance(obj["answer"], list) else [obj["answer"]]
        until = obj.get("until", list(DEFAULT_UNTIL))
        if not answers or not all(isinstance(a, str) for a in answers):
            raise ConfigError(f"{where}: \"answer\" must be a string or a list of strings")
        if not isinstance(until, list) or not all(isinstance(u, str) and u for u in until):
            raise ConfigError(f"{where}: \"until\" must be a list of non-empty stop strings")
        return Example(obj["context"], answers=tuple(answers), until=tuple(until))
    raise ConfigError(f"{where}: needs \"choices\" + \"gold\" (multiple choice) or \"answer\" (generation)")


def read_examples(path: Path) -> list[Example]:
    """The examples of one JSONL file (blank lines skipped), each line checked."""
    out = []
    from torchgraft.outputs import read_input_text

    text = read_input_text(path, "task file", "JSONL, one example per line")
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        out.append(_example(obj, f"{path}:{i}"))
    if not out:
        raise ConfigError(f"{path} holds no examples")
    return out


def load_task_file(path: str | Path) -> TaskFile:
    """A task from its JSONL file, with `NAME.fewshot.jsonl` beside it when present."""
    p = Path(path)
    examples = read_examples(p)
    kinds = {"multiple_choice" if e.choices else "generation" for e in examples}
    if len(kinds) > 1:
        raise ConfigError(f"{p} mixes multiple-choice and generation examples; put each kind in its own file")
    shots = p.with_name(p.name[:-len(".jsonl")] + ".fewshot.jsonl")
    fewshot = read_examples(shots) if shots.is_file() else None
    return TaskFile(p.name[:-len(".jsonl")], kinds.pop(), examples, fewshot, p)


def find_task_files(path: str | Path) -> list[Path]:
    """`path` itself (a .jsonl file) or the task files of a directory, sorted by name."""
    p = Path(path)
    if p.is_file():
        if p.suffix != ".jsonl":
            raise ConfigError(f"--tasks {p}: expected a .jsonl task file or a directory of them")
        return [p]
    if not p.is_dir():
        raise ConfigError(f"--tasks {p} not found (give a .jsonl task file or a directory of them)")
    files = sorted(f for f in p.glob("*.jsonl") if not f.name.endswith(".fewshot.jsonl"))
    if not files:
        raise ConfigError(f"--tasks {p}: no *.jsonl task files in this directory")
    return files


# ---- prompts ----------------------------------------------------------------------------------------
def fewshot_prefix(task: TaskFile, example: Example, k: int) -> str:
    """The first k few-shot examples (never the scored one) as `context answer\\n\\n` blocks."""
    if k <= 0:
        return ""
    pool = task.fewshot if task.fewshot is not None else [e for e in task.examples if e != example]
    if len(pool) < k:
        raise ConfigError(f"task {task.name}: {k} few-shot examples asked for but only {len(pool)} available")
    return "".join(f"{e.context}{TARGET_DELIMITER}{e.target}{FEWSHOT_DELIMITER}" for e in pool[:k])


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str, add_bos: bool = False
                ) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) by lm-eval's causal-LM rule (see the module docstring)."""
    if context == "":
        prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if prefix is None:
            raise ConfigError("an example with an empty context needs a tokenizer with a bos or eos token")
        cont = tokenizer.encode(continuation)
        return ([prefix], cont) if cont[0] != prefix else (cont[:1], cont[1:])  # lm-eval's rule
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_bos=add_bos)
    ctx = tokenizer.encode(context, add_bos=add_bos)
    return ctx, whole[len(ctx):]


# ---- log-likelihoods ----------------------------------------------------------------------------------
@torch.inference_mode()
def loglikelihoods(model: nn.Module, pairs: list[tuple[list[int], list[int]]], max_len: int,
                   batch_size: int = 16) -> list[tuple[float, bool]]:
    """(summed log-probability of the continuation, whether greedy decoding gives it) per
    (context ids, continuation ids) pair; the input is `(context + continuation)[-(max_len+1):][:-1]`."""
    device = next(model.parameters()).device
    too_long = next((len(c) for _, c in pairs if len(c) > max_len), None)
    if too_long is not None:
        raise ConfigError(f"a continuation has {too_long} tokens, more than the model's {max_len} positions; "
                          "shorten the choice or use a model with a longer block_size")
    out: list[tuple[float, bool]] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        rows = [(ctx + cont)[-(max_len + 1):][:-1] for ctx, cont in chunk]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)  # right-padded (causal: harmless)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, device=device)
        logits = model(ids)  # (B, T, V)
        for i, ((_, cont), r) in enumerate(zip(chunk, rows)):
            cont_t = torch.tensor(cont, device=device)
            # (n_cont, V): only the positions predicting the continuation, in float32
            lp = F.log_softmax(logits[i, len(r) - len(cont):len(r)].float(), dim=-1)
            out.append((float(lp.gather(1, cont_t[:, None]).sum()), bool((lp.argmax(-1) == cont_t).all())))
    return out


def _mean_stderr(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    mu = sum(xs) / n
    if n < 2:
        return mu, float("nan")
    return mu, math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1) / n)


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # the first of equal maxima, like np.argmax


def score_multiple_choice(model: nn.Module, tokenizer: Tokenizer, task: TaskFile, *, num_fewshot: int = 0,
                          max_len: int, batch_size: int = 16, add_bos: bool = False) -> dict[str, Any]:
    """acc / acc_norm (with standard errors) and the per-example log-likelihoods of a multiple-choice task."""
    pairs, owners = [], []
    for j, ex in enumerate(task.examples):
        ctx = fewshot_prefix(task, ex, num_fewshot) + ex.context
        for choice in ex.choices:
            pairs.append(encode_pair(tokenizer, ctx, TARGET_DELIMITER + choice, add_bos))
            owners.append(j)
    lls = loglikelihoods(model, pairs, max_len, batch_size)
    per_example: list[list[float]] = [[] for _ in task.examples]
    for j, (ll, _) in zip(owners, lls):
        per_example[j].append(ll)
    acc = [float(_argmax(ll) == ex.gold) for ll, ex in zip(per_example, task.examples)]
    acc_norm = [float(_argmax([v / len(c) for v, c in zip(ll, ex.choices)]) == ex.gold)
                for ll, ex in zip(per_example, task.examples)]
    (a, a_se), (an, an_se) = _mean_stderr(acc), _mean_stderr(acc_norm)
    return {"acc": a, "acc_stderr": a_se, "acc_norm": an, "acc_norm_stderr": an_se,
            "n": len(task.examples), "loglikelihoods": per_example}


def score_generation(model: nn.Module, tokenizer: Tokenizer, task: TaskFile, *, num_fewshot: int = 0,
                     max_len: int, max_new_tokens: int = 32, add_bos: bool = False) -> dict[str, Any]:
    """exact_match (with its standard error) and the outputs of a generation task (greedy)."""
    from torchgraft.generation import generate

    if max_new_tokens >= max_len:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} leaves no room for the prompt in the model's "
                          f"{max_len} positions")
    outputs: list[str] = []
    for ex in task.examples:  # one call each: examples may have different stop strings
        prompt = tokenizer.encode(fewshot_prefix(task, ex, num_fewshot) + ex.context, add_bos=add_bos)
        res = generate(model, [prompt[-(max_len - max_new_tokens):]], tokenizer, max_new_tokens=max_new_tokens,
                       temperature=0.0, stop=list(ex.until))
        outputs.append(res.texts[0])
    em = [float(out.strip() in {a.strip() for a in ex.answers}) for out, ex in zip(outputs, task.examples)]
    m, se = _mean_stderr(em)
    return {"exact_match": m, "exact_match_stderr": se, "n": len(task.examples), "outputs": outputs}


# ---- the command ------------------------------------------------------------------------------------
def eval_tasks(path: str | Path, tasks: str | Path, *, num_fewshot: int = 0, batch_size: int = 16,
               max_new_tokens: int = 32, add_bos: bool = False, device: str = "cpu") -> dict[str, Any]:
    """`torchgraft eval PATH --tasks ...`: every task file scored with the LM at `path` (run dir,
    checkpoint folder, LoRA run or HF directory). Returns {"model", "num_fewshot", "tasks": {name: metrics}}."""
    from torchgraft.recipes.lm import check_tokenizer_fits, load_lm

    files = find_task_files(tasks)
    lm = load_lm(path, device=device)
    if lm.tokenizer is None:
        raise ConfigError(f"no tokenizer.json found for {path}; put one next to the weights")
    check_tokenizer_fits(lm)
    max_len = getattr(getattr(lm.model, "config", None), "block_size", None) or 2048
    results: dict[str, Any] = {}
    for f in files:
        task = load_task_file(f)
        opts = dict(num_fewshot=num_fewshot, max_len=max_len, add_bos=add_bos)
        if task.kind == "multiple_choice":
            results[task.name] = score_multiple_choice(lm.model, lm.tokenizer, task, batch_size=batch_size, **opts)
        else:
            results[task.name] = score_generation(lm.model, lm.tokenizer, task, max_new_tokens=max_new_tokens, **opts)
    return {"model": str(lm.path), "num_fewshot": num_fewshot, "tasks": results}


def format_task_results(result: dict[str, Any]) -> str:
    """One line per task: its metrics with standard errors."""
    lines = [f"{result['model']} ({result['num_fewshot']}-shot)"]
    for name, r in result["tasks"].items():
        keys = ("acc", "acc_norm") if "acc" in r else ("exact_match",)
        metrics = "  ".join(f"{k} {r[k]:.4f} ± {r[k + '_stderr']:.4f}" for k in keys)
        lines.append(f"{name}: {metrics}  (n={r['n']})")
    return "\n".join(lines)


def summary_json(result: dict[str, Any]) -> str:
    """The result as JSON, without the per-example lists."""
    tasks = {n: {k: v for k, v in r.items() if k not in ("loglikelihoods", "outputs")}
             for n, r in result["tasks"].items()}
    return json.dumps({**result, "tasks": tasks})
