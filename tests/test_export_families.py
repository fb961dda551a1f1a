"""Every registered model family exports to ONNX and torch.export (.pt2), and the exported files match
eager PyTorch (within the derived fp32 tolerance, torchgraft.testing) at two batch sizes and, for token models, two sequence
lengths, which proves the axes are dynamic.

The family list comes from the registry: a family added later (e.g. RL policies) is covered through its
smallest preset, or skipped with the reason when that preset is too big for a unit test. A few cases
run by default; the full matrix is `slow` (make test-all).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import torchgraft  # noqa: E402
from torchgraft.interop.export import eager_module, export, max_abs_diff, read_metadata  # noqa: E402
from torchgraft.models.registry import build, get_preset, list_families, list_models  # noqa: E402
from torchgraft.testing import model_tol  # noqa: E402

MAX_AUTO_PARAMS = 30_000_000  # a new family's smallest preset above this is skipped, not built
# small versions of the zoo families (the tests' "tiny presets"); bert also with both task heads
TINY: dict[str, list[tuple[str, str, dict]]] = {
    "lenet": [("lenet", "lenet", {})],
    "resnet": [("resnet18", "resnet18", {"width": 16, "num_classes": 10})],
    "vit": [("vit-digits", "vit-digits", {})],
    "gpt": [("gpt-tiny", "gpt-tiny", {})],
    "llama": [("llama-tiny", "llama-tiny", {})],
    **{fam: [(f"{preset}-tiny", preset, {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_kv_head": 2, "head_dim": 16,
                                         "intermediate_size": 96, "vocab_size": 256, "block_size": 64, **extra})]
       for fam, preset, extra in [
           ("qwen2", "qwen2.5-0.5b", {}), ("qwen3", "qwen3-0.6b", {}), ("mistral", "mistral-7b", {"sliding_window": 4}),
           ("gemma2", "gemma2-2b", {"sliding_window": 4}), ("gemma3", "gemma3-1b", {"sliding_window": 4}),
           ("phi3", "phi-4-mini", {"sliding_window": 4, "rope_scaling": {"type": "default"}}),
           ("olmo2", "olmo2-7b", {}), ("smollm3", "smollm3-3b", {})]},
    "bert": [("bert-tiny", "bert-tiny", {"vocab_size": 512}),
             ("bert-tiny-seqcls", "bert-tiny", {"vocab_size": 512, "task": "sequence_classification",
                                                "num_labels": 3}),
             ("bert-tiny-tokcls", "bert-tiny", {"vocab_size": 512, "task": "token_classification",
                                                "num_labels": 5})],
}
FAST = {("lenet", "onnx"), ("gpt-tiny", "onnx"), ("bert-tiny-seqcls", "onnx")}  # the rest: slow


def _family_cases() -> list[tuple[str, str, str, dict]]:
    """(case id, family, preset, overrides) for every registered family."""
    cases = []
    for fam in list_families():
        if fam in TINY:
            cases += [(cid, fam, preset, ov) for cid, preset, ov in TINY[fam]]
            continue
        presets = [n for n in list_models() if get_preset(n).family == fam]
        sized = sorted((sum(p.numel() for p in build(n, device="meta").parameters()), n) for n in presets)
        if not sized:
            cases.append((fam, fam, "", {"_skip": f"family {fam!r} has no preset to export"}))
        elif sized[0][0] > MAX_AUTO_PARAMS:
            cases.append((fam, fam, sized[0][1], {"_skip": f"family {fam!r}: smallest preset {sized[0][1]} has "
                                                  f"{sized[0][0]:,} parameters; add a tiny case to TINY"}))
        else:
            cases.append((sized[0][1], fam, sized[0][1], {}))
    return cases


def _params():
    out = []
    for cid, fam, preset, ov in _family_cases():
        for fmt in ("onnx", "pt2"):
            marks = [] if (cid, fmt) in FAST else [pytest.mark.slow]
            out.append(pytest.param(fam, preset, ov, fmt, id=f"{cid}-{fmt}", marks=marks))
    return out


def _inputs_like(model, example, batch: int, seq: int | None) -> tuple[torch.Tensor, ...]:
    """Inputs in the exported file's order at another batch size / sequence length."""
    x = example[0]
    g = torch.Generator().manual_seed(batch * 100 + (seq or 0))
    if x.dtype.is_floating_point:
        return (torch.randn((batch, *x.shape[1:]), generator=g),)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, : seq // 3] = 0 if not hasattr(model, "make_kv_cache") else 1  # encoders: a padded row
    return ids, mask


def test_every_registered_family_has_a_case():
    covered = {fam for _, fam, _, _ in _family_cases()}
    assert covered == set(list_families())
    assert {"lenet", "resnet", "vit", "gpt", "llama", "bert"} <= covered


@pytest.mark.parametrize("family,preset,overrides,fmt", _params())
def test_family_export_matches_eager(tmp_path, one_thread, family, preset, overrides, fmt):
    if "_skip" in overrides:
        pytest.skip(overrides["_skip"])
    model = build(preset, **overrides).eval()
    path = tmp_path / f"m.{fmt}"
    res = export(model, format=fmt, path=path)
    example = torchgraft.interop.export.example_inputs(model)
    token = not example[0].dtype.is_floating_point
    assert res.input_names[0] == ("input_ids" if token else "images" if example[0].dim() == 4
                                  else res.input_names[0])
    assert res.output_names[0] == "logits"
    module = eager_module(model, res.kind, res.input_names).eval()
    block = getattr(model.config, "block_size", None)
    shapes = [(1, 5), (4, min(13, block or 13))] if token else [(1, None), (4, None)]
    for b, t in shapes:
        inputs = _inputs_like(model, example, b, t)[: len(res.input_names)]
        diff = max_abs_diff(path, module, inputs)
        with torch.no_grad():
            outs = module(*inputs)
        scale = max(o.abs().max().item() for o in (outs if isinstance(outs, tuple) else (outs,)))
        bound = model_tol(model, t) * scale
        assert diff <= bound, f"{preset} {fmt} at {[tuple(i.shape) for i in inputs]}: max abs diff {diff:.3g} > {bound:.3g}"
    meta = read_metadata(path)
    assert meta["name"] == preset and meta["family"] == family and meta["kind"] == "logits"
    assert meta["config"] == torchgraft.config.to_dict(model.config)
    if fmt == "onnx":
        import onnx

        m = onnx.load(str(path))
        assert m.opset_import[0].version == res.opset == meta["opset"]
        dims = [d.dim_param for d in m.graph.input[0].type.tensor_type.shape.dim]
        assert dims[0] == "batch" and (dims[1] == "seq" if token else True)
