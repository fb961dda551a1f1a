"""The `torchgraft` command line (typer).

Each command is a thin wrapper over the library; user errors (`TorchgraftError`) are printed as
one line on stderr with exit code 2, never as a traceback.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    name="torchgraft",
    help="Build models from PyTorch modules, train them from scratch, fine-tune them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """torchgraft: build, inspect, train and fine-tune PyTorch models."""


def _echo_err(msg: str) -> None:
    import os

    if os.environ.get("WORLD_SIZE", "1") not in ("", "1") and "RANK" in os.environ:  # under torchrun
        msg = f"[rank {os.environ['RANK']}] {msg}"
    typer.echo(f"error: {msg}", err=True)


def _require(ok: bool, msg: str) -> None:
    """Option checks done before any heavy import: one ConfigError line naming the option and fix."""
    if not ok:
        from torchgraft.errors import ConfigError

        raise ConfigError(msg)


def _at_least(option: str, value: Optional[float], low: float, hint: str = "") -> None:
    import math

    if value is None:
        return
    _require(math.isfinite(value) and value >= low,
             f"{option} must be a finite number >= {low:g}, got {value}" + (f"; {hint}" if hint else ""))


PLOT_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".eps", ".ps")


@app.command("models")
def models_cmd() -> None:
    """List registered model presets with their parameter counts (built on the meta device)."""
    from torchgraft.models.registry import build, get_preset, list_models

    for name in list_models():
        p = get_preset(name)
        n = sum(t.numel() for t in build(name, device="meta").parameters())
        typer.echo(f"{name:20s} {p.family:8s} {n:>15,}  {p.description}")


# --- commands added by later issues go below (keep each a thin wrapper) ---

# -- inspection: summary, FLOPs, memory (torchgraft/tools/summary.py, flops.py, memory.py)
@app.command("inspect")
def inspect_cmd(
    model: str = typer.Argument(..., help="preset name (see `torchgraft models`), model YAML, or a run / "
                                "checkpoint / Hugging Face directory"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value config overrides, e.g. n_layer=4"),
    batch: int = typer.Option(1, "--batch", help="per-device micro-batch for the memory estimate"),
    seq: Optional[int] = typer.Option(None, "--seq", help="sequence length (default: block_size)"),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 (=bf16-mixed), bf16-true, fp16, fp16-true"),
    optimizer: str = typer.Option("adamw", "--optimizer", help="adamw, adam, sgd, sgd-nomomentum"),
    shards: int = typer.Option(1, "--shards", help="FSDP world size the weights are sharded over"),
    checkpointing: bool = typer.Option(False, "--checkpointing", help="activation checkpointing per block"),
    selective: bool = typer.Option(False, "--selective-checkpointing",
                                   help="op-level selective checkpointing (keep matmul/attention outputs)"),
    chunked_ce: Optional[int] = typer.Option(None, "--chunked-ce", help="LM loss in chunks of N token rows"),
    depth: int = typer.Option(2, "--depth", help="module levels in the summary table"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    finetune: Optional[str] = typer.Option(None, "--finetune", help="fine-tune memory plan: full, lora or qlora"),
    optim: str = typer.Option("adamw", "--optim", help="with --finetune: adamw, adamw8bit, adamw4bit, sgd"),
    fit: Optional[str] = typer.Option(None, "--fit", help="with --finetune: the cheapest settings that fit, e.g. 24GiB"),
    rank: int = typer.Option(8, "--rank", help="with --finetune: LoRA rank (all linear layers targeted)"),
) -> None:
    """Summary, parameters, FLOPs per token/sample and training memory of a model, built on meta."""
    import json

    from torchgraft.config import parse_overrides
    from torchgraft.tools.summary import inspect_model

    ov = {k.removeprefix("model."): v for k, v in parse_overrides(overrides or []).items()}
    if finetune is not None:  # torchgraft/tools/finetune_memory.py
        from torchgraft.tools.finetune_memory import format_finetune, inspect_finetune

        plan = inspect_finetune(model, ov, finetune, optim, batch, seq, fit, rank, checkpointing, chunked_ce)
        typer.echo(json.dumps(plan) if as_json else format_finetune(plan))
        return
    target = _finetuned_on_meta(model, ov)  # a fine-tune config: trainable set as the method leaves it
    target = target if target is not None else _artifact_spec(model)  # a run / checkpoint / HF dir ...
    report = inspect_model(target if target is not None else model, ov, batch=batch, seq_len=seq,
                           precision=precision, optimizer=optimizer, sharding=shards,
                           activation_checkpointing="selective" if selective else checkpointing,
                           depth=depth, chunked_ce=chunked_ce)
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    else:
        report.print()


def _artifact_spec(spec: str) -> object:
    """For a path that is not a YAML config (run dir, checkpoint, HF or adapter directory, ...), the
    model spec its files describe (`interop.artifacts.model_spec`); else None (a preset name)."""
    if spec.endswith((".yaml", ".yml")) or not Path(spec).exists():
        return None
    from torchgraft.interop.artifacts import model_spec

    return model_spec(spec)


def _finetuned_on_meta(spec: str, overrides: dict) -> object:
    """For a YAML with a `finetune:` section (lora / dora / freeze), the meta-device model with that
    method applied, so the memory estimate counts only what trains; else None."""
    if not spec.endswith((".yaml", ".yml")):
        return None
    from torchgraft.config import load_yaml

    tree = load_yaml(spec)
    if not isinstance(tree.get("finetune"), dict):
        return None
    from torchgraft.models.registry import build
    from torchgraft.recipes.finetune import apply_method, split_config

    ft, rest = split_config(tree)
    model = build(rest.get("model") or {}, device="meta", **overrides)
    apply_method(model, ft)
    return model


# -- training engine, plots, quickstart (torchgraft/train, torchgraft/recipes/quickstart.py)
@app.command("train", context_settings={"allow_extra_args": False})
def train_cmd(
    config: Path = typer.Argument(..., help="run config YAML (sections model, data, optim, schedule, trainer)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="dotted key=value overrides, e.g. trainer.max_steps=100"),
    out: Optional[Path] = typer.Option(None, "--out", help="run directory (default runs/<config name>)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest good checkpoint in --out"),
    nproc: int = typer.Option(1, "--nproc", help="processes on this machine (re-launches under torchrun; "
                              "see distributed.strategy)"),
) -> None:
    """Train a model from a YAML config; `--resume` (or resume=true) continues the run exactly."""
    from torchgraft.config import parse_overrides

    _at_least("--nproc", nproc, 1)
    from torchgraft.train.config import load_run_config

    ov = parse_overrides(overrides or [])
    resume = bool(ov.pop("resume", False)) or resume  # `resume=true` works like --resume
    cfg = load_run_config(config, ov)  # the one parse: every key and value checked before torch is imported
    from torchgraft.distributed.env import launched_by_torchrun, relaunch_with_torchrun
    from torchgraft.recipes.training import train_from_cli

    if nproc != 1 and not launched_by_torchrun():  # a bad config failed above once, not on every rank
        args = ["train", str(config), *(overrides or []), *(["--out", str(out)] if out else []),
                *(["--resume"] if resume else [])]
        code = relaunch_with_torchrun(nproc, args)
        if code != 0:
            _echo_err(f"{nproc}-process run failed (exit code {code}); each rank's error is printed above")
            sys.exit(code)
        return
    train_from_cli(cfg, out or Path("runs") / config.stem, resume)


@app.command("plot")
def plot_cmd(
    run_dirs: list[Path] = typer.Argument(..., help="one or more run directories (overlaid)"),
    out: Optional[Path] = typer.Option(None, "--out", help="PNG path (default RUN_DIR/curves.png, or ./curves.png for several runs)"),
) -> None:
    """Write PNG curves of loss, validation metrics and learning rate for one or more runs."""
    target = out or (run_dirs[0] / "curves.png" if len(run_dirs) == 1 else Path("curves.png"))
    _require(target.suffix.lower() in PLOT_FORMATS, f"--out {target}: unsupported image type "
             f"{target.suffix or '(none)'!r}; use one of {', '.join(PLOT_FORMATS)}")
    _require(not target.is_dir(), f"--out {target} is a directory; give a file name such as curves.png")
    for d in run_dirs:
        _require((d / "metrics.jsonl").is_file(), f"{d} has no metrics.jsonl (is it a torchgraft run directory?)")
    from torchgraft.outputs import check_output_dir

    check_output_dir(target.parent, overwrite=True, what="--out folder")
    from torchgraft.train.plot import plot_runs

    typer.echo(f"wrote {plot_runs(run_dirs, target)}")


@app.command("quickstart")
def quickstart_cmd(
    out: Path = typer.Option(Path("runs/quickstart"), "--out", help="output directory"),
    fast: bool = typer.Option(False, "--fast", help="shorter runs (well under a minute on 2 CPU cores)"),
) -> None:
    """Train lenet on digits 0-4, transfer it to digits 5-9, fine-tune on 10 images/class vs scratch."""
    from torchgraft.recipes.quickstart import run_quickstart

    run_quickstart(out, fast=fast)


@app.command("convert")
def convert_cmd(
    src: Path = typer.Argument(..., help="Hugging Face model dir, or torchgraft checkpoint/run dir"),
    dst: Path = typer.Argument(..., help="output directory"),
    to: Optional[str] = typer.Option(None, "--to", help="hf or torchgraft (default: the other layout)"),
    dtype: Optional[str] = typer.Option(None, help="cast weights: float32, bfloat16, float16"),
    max_shard_size: str = typer.Option("5GB", help="shard Hugging Face output above this size"),
    strict: bool = typer.Option(True, help="--no-strict ignores HF tensors with no torchgraft name"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace DST if it is a non-empty directory"),
) -> None:
    """Convert Hugging Face GPT-2 / Llama / BERT <-> torchgraft checkpoints (torchgraft/interop)."""
    from torchgraft.interop.convert import convert

    res = convert(src, dst, to, dtype=dtype, max_shard_size=max_shard_size, strict=strict,
                  overwrite=overwrite)
    typer.echo(f"{res.src} -> {res.dst} ({res.to}): {res.summary}")


# -- language models: tokenizer train, generate, eval (torchgraft/data/tokenizers.py,
#    torchgraft/generation.py, torchgraft/recipes/lm.py)
tokenizer_app = typer.Typer(help="Train and inspect tokenizers.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")


@tokenizer_app.command("train")
def tokenizer_train_cmd(
    files: list[Path] = typer.Argument(..., help="text / JSONL files or directories to train on"),
    vocab_size: int = typer.Option(8192, "--vocab-size", help="total ids incl. 256 bytes + specials"),
    out: Path = typer.Option(..., "--out", help="directory for tokenizer.json"),
    min_frequency: int = typer.Option(2, "--min-frequency", help="minimum pair count to merge"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT if it is a non-empty directory"),
) -> None:
    """Train a byte-level BPE tokenizer and write OUT/tokenizer.json."""
    _at_least("--min-frequency", min_frequency, 1)
    for f in files:
        _require(f.exists(), f"training file not found: {f}")
    from torchgraft.outputs import check_output_dir, staged_dir

    check_output_dir(out, overwrite=overwrite, what="--out")
    from torchgraft.data.tokenizers import train_bpe_files

    with staged_dir(out, overwrite=overwrite, what="--out") as tmp:  # OUT appears only when complete
        tok = train_bpe_files([str(f) for f in files], vocab_size, tmp, min_frequency=min_frequency)
    typer.echo(f"wrote {out / 'tokenizer.json'} ({tok.vocab_size} ids, eos {tok.eos_token!r}, "
               f"pad {tok.pad_token!r})")


@app.command("generate")
def generate_cmd(
    path: Path = typer.Argument(..., help="run dir, checkpoint folder or Hugging Face model dir"),
    prompt: list[str] = typer.Option([""], "--prompt", "-p", help="prompt text (repeat for a batch)"),
    max_new_tokens: int = typer.Option(200, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="0 = greedy"),
    top_k: Optional[int] = typer.Option(200, "--top-k"),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty"),
    stop: list[str] = typer.Option([], "--stop", help="stop string (repeatable)"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    device: str = typer.Option("cpu", "--device"),
    no_cache: bool = typer.Option(False, "--no-cache", help="recompute the full sequence each step"),
    compile_decode: bool = typer.Option(False, "--compile", help="compile the static-cache decode step "
                                        "(torch.compile): a one-off compile of seconds to a minute, then "
                                        "faster decoding; decodes eagerly when compiling is unavailable"),
    chat: bool = typer.Option(False, "--chat", help="wrap each prompt as a user turn in the model's chat "
                              "template (the one its SFT run saved) and print only the answer"),
    system: Optional[str] = typer.Option(None, "--system", help="system message (with --chat)"),
) -> None:
    """Generate text from a trained LM; one prompt streams as it is produced."""
    _at_least("--max-new-tokens/-n", max_new_tokens, 1)
    _at_least("--temperature/-t", temperature, 0, "0 = greedy")
    _at_least("--top-k", top_k, 0, "0 = off")
    _at_least("--repetition-penalty", repetition_penalty, 1e-6, "1 = off")
    _require(top_p is None or 0 < top_p <= 1, f"--top-p must be in (0, 1], got {top_p}")
    _require(not (compile_decode and no_cache), "--compile compiles the cached decode step; drop --no-cache")
    _require(system is None or chat, "--system is the system message of a chat prompt; add --chat (or drop "
             "--system)")
    _require(path.exists(), f"model path not found: {path} (give a run directory, a checkpoint folder "
             "or a Hugging Face model directory)")
    from torchgraft.devices import check_device
    from torchgraft.errors import ConfigError
    from torchgraft.generation import cap_new_tokens, generate, stream
    from torchgraft.recipes.lm import load_lm

    check_device(device, allow_auto=False)
    lm = load_lm(path, device=device)
    if lm.tokenizer is None:
        raise ConfigError(f"no tokenizer.json found for {path}; put one next to the weights")
    opts = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                repetition_penalty=repetition_penalty, stop=stop, seed=seed, use_cache=not no_cache,
                compile=compile_decode)
    if chat:
        from torchgraft.data.chat_template import chat_prompt
        from torchgraft.recipes.lm import lm_chat_template

        tok = lm.tokenizer
        template = lm_chat_template(lm)
        if template.name == "built-in":
            typer.echo(f"note: {path} has no chat template (its run saved none); --chat falls back to "
                       "torchgraft's built-in template", err=True)
        texts = [chat_prompt(template, p, system) for p in prompt]
        opts["add_bos"] = False  # the template places bos itself
        opts["max_new_tokens"] = _capped(cap_new_tokens(lm.model, tok, texts, max_new_tokens, add_bos=False))
        if len(prompt) == 1:
            for piece in stream(lm.model, texts[0], tok, **opts):
                typer.echo(piece, nl=False)
            typer.echo()
            return
        for p, text in zip(prompt, generate(lm.model, texts, tok, **opts).texts or []):
            typer.echo(f"--- {p!r}\n{text}")
        return
    opts["max_new_tokens"] = _capped(cap_new_tokens(lm.model, lm.tokenizer, prompt, max_new_tokens))
    if len(prompt) == 1:
        typer.echo(prompt[0], nl=False)
        for piece in stream(lm.model, prompt[0], lm.tokenizer, **opts):
            typer.echo(piece, nl=False)
        typer.echo()
        return
    result = generate(lm.model, prompt, lm.tokenizer, **opts)
    for p, text in zip(prompt, result.texts or []):
        typer.echo(f"--- {p!r}\n{p}{text}")


def _capped(cap: tuple[int, str | None]) -> int:
    """The -n to use; its note (why it was lowered) goes to stderr, so stdout stays the text."""
    n, note = cap
    if note:
        typer.echo(f"note: {note}", err=True)
    return n


@app.command("eval")
def eval_cmd(
    path: Path = typer.Argument(..., help="run dir, checkpoint folder or Hugging Face model dir"),
    data: Optional[str] = typer.Option(None, "--data", help="text/JSONL file, dir or 'builtin' "
                                       "(default: the run's validation split)"),
    field: str = typer.Option("text", "--field", help="JSONL field holding the text"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len"),
    batch_size: int = typer.Option(16, "--batch-size"),
    max_batches: Optional[int] = typer.Option(None, "--max-batches"),
    device: str = typer.Option("cpu", "--device"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
    tasks: Optional[Path] = typer.Option(None, "--tasks", help="JSONL task file or directory: score "
                                         "multiple-choice / generation tasks instead (docs/evaluation.md)"),
    num_fewshot: int = typer.Option(0, "--num-fewshot", help="few-shot examples before each (with --tasks)"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="generation tasks: tokens to generate"),
    add_bos: bool = typer.Option(False, "--add-bos", help="prepend bos to every prompt (lm-eval's add_bos_token)"),
) -> None:
    """Perplexity (mean next-token NLL and its exp) of an LM on held-out text, or with --tasks its
    lm-evaluation-harness-style accuracy on multiple-choice and generation tasks."""
    _at_least("--batch-size", batch_size, 1)
    _at_least("--seq-len", seq_len, 1)
    _at_least("--max-batches", max_batches, 1, "omit it to evaluate the whole split")
    _require(path.exists(), f"model path not found: {path} (give a run directory, a checkpoint folder "
             "or a Hugging Face model directory)")
    from torchgraft.devices import check_device
    from torchgraft.recipes.lm import eval_lm, format_eval, to_json

    check_device(device, allow_auto=False)
    _require(tasks is not None or (num_fewshot == 0 and max_new_tokens == 32 and not add_bos),
             "--num-fewshot, --max-new-tokens and --add-bos apply to --tasks; add --tasks FILE_OR_DIR")
    if tasks is not None:
        _at_least("--num-fewshot", num_fewshot, 0)
        _at_least("--max-new-tokens", max_new_tokens, 1)
        _require(data is None, "--tasks and --data are exclusive (tasks score choices, --data perplexity)")
        from torchgraft.recipes.eval_tasks import eval_tasks, format_task_results, summary_json

        out = eval_tasks(path, tasks, num_fewshot=num_fewshot, batch_size=batch_size,
                         max_new_tokens=max_new_tokens, add_bos=add_bos, device=device)
        typer.echo(summary_json(out) if as_json else format_task_results(out))
        return
    result = eval_lm(path, data, field=field, seq_len=seq_len, batch_size=batch_size,
                     max_batches=max_batches, device=device)
    typer.echo(to_json(result) if as_json else format_eval(result))


# -- fine-tuning: transfer + freeze / LoRA / DoRA + trainer (torchgraft/recipes/finetune.py)
@app.command("finetune")
def finetune_cmd(
    config: Path = typer.Argument(..., help="YAML with a `finetune:` section plus model/data/optim/schedule/trainer"),
    overrides: Optional[list[str]] = typer.Argument(None, help="dotted key=value overrides, e.g. finetune.method=lora"),
    out: Optional[Path] = typer.Option(None, "--out", help="run directory (default runs/<config name>)"),
    merge: bool = typer.Option(False, "--merge", help="also write merged weights (adapters folded in) to OUT/merged"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted fine-tune from its newest good checkpoint"),
) -> None:
    """Fine-tune a pretrained checkpoint: transfer weights, apply full/freeze/lora/dora, train."""
    import json

    from torchgraft.recipes.finetune import load_finetune_config, run_finetune

    cfg = load_finetune_config(config, overrides or [])  # the one parse, checked before torch is imported
    summary = run_finetune(cfg, out or Path("runs") / config.stem, merge=merge or None, resume=resume)
    from torchgraft.distributed.env import cleanup, is_main_process

    main = is_main_process()
    cleanup()  # the process group of a distributed run, if any
    if not main:
        return
    keys = ("method", "trainable", "total", "fraction", "transfer", "metrics", "adapter", "merged")
    typer.echo(json.dumps({k: summary[k] for k in keys if k in summary}, default=str))


# -- export: torch.export / ONNX (torchgraft/interop/export.py, docs/export.md)
@app.command("export")
def export_cmd(
    source: Path = typer.Argument(..., help="run dir, checkpoint folder, merged/ folder or Hugging Face model dir"),
    fmt: str = typer.Option("onnx", "--format", help="onnx or pt2 (torch.export program)"),
    out: Path = typer.Option(..., "--out", help="output file (.onnx or .pt2)"),
    dynamic: str = typer.Option("batch,seq", "--dynamic", help="dynamic axes: batch, seq, 'batch,seq' or none"),
    kv_cache: bool = typer.Option(False, "--kv-cache", help="decoder LMs: export the decode step with the "
                                  "KV cache as inputs/outputs (for torchgraft.interop.onnx_generate)"),
    check: bool = typer.Option(False, "--check", help="run the file (onnxruntime / torch.export.load) and "
                               "print the max abs difference against eager PyTorch"),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="int8: also write OUT.int8.onnx "
                                           "(onnxruntime dynamic quantisation)"),
    batch: int = typer.Option(2, "--batch", help="batch size of the example the model is traced with"),
    seq: int = typer.Option(8, "--seq", help="sequence length of the example (token models)"),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset (default: torchgraft's, see docs/export.md)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing OUT file"),
    spec: Optional[str] = typer.Option(None, "--spec", help="input kind: image, tokens, text-pair, tensors, "
                                       "decode-step or a registered one (default: chosen from the model)"),
) -> None:
    """Export a trained model to ONNX or a torch.export program, optionally checked and int8-quantised."""
    _require(fmt in ("onnx", "pt2"), f"unknown export format {fmt!r}; use onnx or pt2")
    from torchgraft.interop.export import ONNX_OPSET, example_inputs, export, quantized_path
    from torchgraft.outputs import check_output_file

    for target in (out, *([quantized_path(out)] if quantize else [])):  # before loading anything
        check_output_file(target, overwrite=overwrite, suffixes=(f".{fmt}",), kind=f"--format {fmt}")
    from torchgraft.interop.export_source import load_export_source

    src = load_export_source(source)
    for note in src.notes:
        typer.echo(f"note: {note}")
    example = None if kv_cache else example_inputs(src.model, batch, seq)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the LoRA note is printed from result.notes
        res = export(src.model, example, format=fmt, path=out, dynamic=dynamic, kv_cache=kv_cache,
                     opset=opset or ONNX_OPSET, metadata=src.metadata, check=check, quantize=quantize,
                     overwrite=overwrite, spec=spec)
    for note in res.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"wrote {res.summary()}")
    if res.quantized_path is not None:
        typer.echo(f"wrote {res.quantized_path} (int8 dynamic quantisation)")
    if check:
        shapes = ", ".join(str(s[0]) for s in res.checked_shapes)
        runner = "onnxruntime" if fmt == "onnx" else "torch.export.load"
        typer.echo(f"check ({runner}, inputs {shapes}): max abs diff vs eager PyTorch {res.max_abs_diff:.3g}")
        if res.quantized_max_abs_diff is not None:
            typer.echo(f"check int8: max abs diff vs eager PyTorch {res.quantized_max_abs_diff:.3g}")
        if res.max_abs_diff is None or res.max_abs_diff > 1e-3:
            from torchgraft.errors import ExportError

            raise ExportError(f"check failed: the exported model differs from eager PyTorch by "
                              f"{res.max_abs_diff:.3g} (> 1e-3)")
# -- game agents: collect / bc / ppo / eval (torchgraft/cli_rl.py; imports inside the commands)
from torchgraft.cli_rl import rl_app  # noqa: E402

app.add_typer(rl_app, name="rl")
# -- your own data: predict with a classification run (torchgraft/recipes/predict.py)
@app.command("predict")
def predict_cmd(
    run_dir: Path = typer.Argument(..., help="run directory of a classification run (images or textclass data)"),
    inputs: Optional[list[str]] = typer.Argument(None, help="image paths or texts (pairs as 'first<TAB>second')"),
    file: Optional[Path] = typer.Option(None, "--file", help="a file with one input per line"),
    top_k: int = typer.Option(3, "--top-k", help="probabilities of the K most likely labels"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per input"),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Label new images or texts with a trained classifier: label and top-k probabilities per input."""
    import json

    from torchgraft.recipes.predict import format_prediction, load_classifier, read_inputs

    items = read_inputs(inputs or [], file)
    for p in load_classifier(run_dir, device=device).predict(items, top_k=top_k):
        typer.echo(json.dumps(p) if as_json else format_prediction(p))


# -- serve: an OpenAI-compatible HTTP server (torchgraft/serve/; the `serve` extra)
@app.command("serve")
def serve_cmd(
    artifact: Path = typer.Argument(..., help="LM run dir / checkpoint / HF dir, or a text classification run"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (default: this machine only)"),
    port: int = typer.Option(8000, "--port", help="TCP port (0 = any free port; the URL is printed)"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="TORCHGRAFT_API_KEY",
                                          help="require 'Authorization: Bearer KEY' on /v1 routes"),
    max_batch: int = typer.Option(8, "--max-batch", help="sequences decoded together (KV-cache slots)"),
    max_tokens: int = typer.Option(256, "--max-tokens", help="most completion tokens per choice (and the default)"),
    compile_decode: bool = typer.Option(False, "--compile", help="torch.compile the batched decode step"),
    context: Optional[int] = typer.Option(None, "--context", help="cap on prompt + completion tokens "
                                          "(default: the model's block_size)"),
    max_queue: int = typer.Option(64, "--max-queue", help="choices waiting for a slot before 429"),
    timeout: float = typer.Option(600.0, "--timeout", help="seconds one request may take (504 after)"),
    max_body: int = typer.Option(1 << 20, "--max-body", help="request body cap in bytes (413 above)"),
    name: Optional[str] = typer.Option(None, "--name", help="model id clients use (default: the directory name)"),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Serve a model over HTTP with OpenAI's API: completions, chat, streaming, embeddings, classify."""
    from torchgraft.devices import check_device
    from torchgraft.serve.server import serve
    from torchgraft.serve.settings import ServeSettings

    check_device(device, allow_auto=False)
    settings = ServeSettings(host=host, port=port, api_key=api_key, max_batch=max_batch, max_tokens=max_tokens,
                             max_queue=max_queue, max_body=max_body, timeout=timeout, compile=compile_decode,
                             context=context, name=name, device=device)
    serve(str(artifact), settings, echo=typer.echo)


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point: run the app, turning user errors into one clean line."""
    from typer._click import exceptions as click_exc

    from torchgraft.errors import TorchgraftError

    try:
        app(args=argv, standalone_mode=False)
    except TorchgraftError as e:
        _echo_err(str(e))
        sys.exit(2)
    except OSError as e:
        import errno

        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        _echo_err(f"disk full ({e.filename or 'while writing'}): free some space and run again "
                  "(a run resumes from its last good checkpoint with --resume)")
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except click_exc.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except typer.Abort:
        _echo_err("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        _echo_err("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
