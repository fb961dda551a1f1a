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
    model: str = typer.Argument(..., help="preset name (see `torchgraft models`) or model YAML"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value config overrides, e.g. n_layer=4"),
    batch: int = typer.Option(1, "--batch", help="per-device micro-batch for the memory estimate"),
    seq: Optional[int] = typer.Option(None, "--seq", help="sequence length (default: block_size)"),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 (=bf16-mixed), bf16-true, fp16, fp16-true"),
    optimizer: str = typer.Option("adamw", "--optimizer", help="adamw, adam, sgd, sgd-nomomentum"),
    shards: int = typer.Option(1, "--shards", help="FSDP world size the weights are sharded over"),
    checkpointing: bool = typer.Option(False, "--checkpointing", help="activation checkpointing per block"),
    depth: int = typer.Option(2, "--depth", help="module levels in the summary table"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Summary, parameters, FLOPs per token/sample and training memory of a model, built on meta."""
    import json

    from torchgraft.config import parse_overrides
    from torchgraft.tools.summary import inspect_model

    ov = {k.removeprefix("model."): v for k, v in parse_overrides(overrides or []).items()}
    report = inspect_model(model, ov, batch=batch, seq_len=seq, precision=precision, optimizer=optimizer,
                           sharding=shards, activation_checkpointing=checkpointing, depth=depth)
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    else:
        report.print()


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
    from torchgraft.distributed.env import launched_by_torchrun, relaunch_with_torchrun
    from torchgraft.recipes.training import train_from_cli

    if nproc != 1 and not launched_by_torchrun():
        from torchgraft.config import load_yaml, parse_overrides
        from torchgraft.recipes.training import load_checked_config

        ov = parse_overrides(overrides or [])
        ov.pop("resume", None)
        load_checked_config(load_yaml(config), ov)  # a bad config fails here once, not on every rank
        args = ["train", str(config), *(overrides or []), *(["--out", str(out)] if out else []),
                *(["--resume"] if resume else [])]
        code = relaunch_with_torchrun(nproc, args)
        if code != 0:
            _echo_err(f"{nproc}-process run failed (exit code {code}); each rank's error is printed above")
            sys.exit(code)
        return
    train_from_cli(config, overrides or [], out, resume)


@app.command("plot")
def plot_cmd(
    run_dirs: list[Path] = typer.Argument(..., help="one or more run directories (overlaid)"),
    out: Optional[Path] = typer.Option(None, "--out", help="PNG path (default RUN_DIR/curves.png, or ./curves.png for several runs)"),
) -> None:
    """Write PNG curves of loss, validation metrics and learning rate for one or more runs."""
    from torchgraft.train.plot import plot_runs

    target = out or (run_dirs[0] / "curves.png" if len(run_dirs) == 1 else Path("curves.png"))
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
) -> None:
    """Convert Hugging Face GPT-2 / Llama / BERT <-> torchgraft checkpoints (torchgraft/interop)."""
    from torchgraft.interop.convert import convert

    res = convert(src, dst, to, dtype=dtype, max_shard_size=max_shard_size, strict=strict)
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
) -> None:
    """Train a byte-level BPE tokenizer and write OUT/tokenizer.json."""
    from torchgraft.data.tokenizers import train_bpe_files

    tok = train_bpe_files([str(f) for f in files], vocab_size, out, min_frequency=min_frequency)
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
    chat: bool = typer.Option(False, "--chat", help="wrap each prompt as a user turn in the model's chat "
                              "template (the one its SFT run saved) and print only the answer"),
    system: Optional[str] = typer.Option(None, "--system", help="system message (with --chat)"),
) -> None:
    """Generate text from a trained LM; one prompt streams as it is produced."""
    from torchgraft.errors import ConfigError
    from torchgraft.generation import generate, stream
    from torchgraft.recipes.lm import load_lm

    lm = load_lm(path, device=device)
    if lm.tokenizer is None:
        raise ConfigError(f"no tokenizer.json found for {path}; put one next to the weights")
    opts = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                repetition_penalty=repetition_penalty, stop=stop, seed=seed, use_cache=not no_cache)
    if chat:
        from torchgraft.data.chat_template import ChatTemplate, chat_prompt

        tok = lm.tokenizer
        where = lm.path.parent.parent if lm.path.parent.name == "checkpoints" else lm.path
        template = ChatTemplate.for_tokenizer(where, special_tokens={
            "bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token})
        texts = [chat_prompt(template, p, system) for p in prompt]
        opts["add_bos"] = False  # the template places bos itself
        if len(prompt) == 1:
            for piece in stream(lm.model, texts[0], tok, **opts):
                typer.echo(piece, nl=False)
            typer.echo()
            return
        for p, text in zip(prompt, generate(lm.model, texts, tok, **opts).texts or []):
            typer.echo(f"--- {p!r}\n{text}")
        return
    if len(prompt) == 1:
        typer.echo(prompt[0], nl=False)
        for piece in stream(lm.model, prompt[0], lm.tokenizer, **opts):
            typer.echo(piece, nl=False)
        typer.echo()
        return
    result = generate(lm.model, prompt, lm.tokenizer, **opts)
    for p, text in zip(prompt, result.texts or []):
        typer.echo(f"--- {p!r}\n{p}{text}")


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
) -> None:
    """Perplexity (mean next-token NLL and its exp) of an LM on held-out text."""
    from torchgraft.recipes.lm import eval_lm, format_eval, to_json

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
) -> None:
    """Fine-tune a pretrained checkpoint: transfer weights, apply full/freeze/lora/dora, train."""
    import json

    from torchgraft.recipes.finetune import run_finetune

    summary = run_finetune(config, out or Path("runs") / config.stem, overrides or [], merge=merge or None)
    from torchgraft.distributed.env import cleanup, is_main_process

    main = is_main_process()
    cleanup()  # the process group of a distributed run, if any
    if not main:
        return
    keys = ("method", "trainable", "total", "fraction", "transfer", "metrics", "adapter", "merged")
    typer.echo(json.dumps({k: summary[k] for k in keys if k in summary}, default=str))


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


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point: run the app, turning user errors into one clean line."""
    from typer._click import exceptions as click_exc

    from torchgraft.errors import TorchgraftError

    try:
        app(args=argv, standalone_mode=False)
    except TorchgraftError as e:
        _echo_err(str(e))
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
