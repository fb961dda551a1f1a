"""Shared helpers of the serve tests: tiny artifacts on disk and a server on a free loopback port."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

import torchgraft
from torchgraft.data.tokenizers import char_tokenizer

CHARS = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?:#\n0123456789"


def tiny_lm_dir(d: Path, family: str = "llama-tiny", block_size: int = 96, seed: int = 0, **fields) -> Path:
    """A random tiny decoder LM in the Hugging Face layout with a char tokenizer (saved by torchgraft).
    init_std 0.2 spreads the logits, so greedy text varies and near-ties are rare."""
    torch.manual_seed(seed)
    tok = char_tokenizer([CHARS])
    opts = dict(n_layer=2, n_embd=64, n_head=4, block_size=block_size, vocab_size=tok.vocab_size, init_std=0.2)
    model = torchgraft.build(family, **{**opts, **fields}).eval()
    torchgraft.save_hf(model, d)
    tok.save(d)
    return d


@contextlib.contextmanager
def served(path, **settings):
    """(url, app, artifact) of `path` served in this process on 127.0.0.1:<free port>."""
    from torchgraft.serve.app import create_app
    from torchgraft.serve.artifact import load_artifact
    from torchgraft.serve.server import BackgroundServer
    from torchgraft.serve.settings import ServeSettings

    name = settings.pop("name", None)
    artifact = load_artifact(path, name=name, context=settings.pop("context", None))
    app = create_app(artifact, ServeSettings(**settings))
    with BackgroundServer(app) as url:
        yield url, app, artifact


def client(url: str, key: str = "unused"):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)
