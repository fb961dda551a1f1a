"""Every decoder family against transformers (and PEFT, onnxruntime), from one spec registry.

Each case is a tiny random transformers model (2 layers, width 32) saved with `save_pretrained`:
- `torchgraft.load_hf` gives the same logits (fp32, 1e-4) on a left-padded batch;
- greedy `generate` (static KV cache; compiled in a slow test) gives transformers' `generate` tokens;
- `save_hf` output loads back into transformers with the same logits;
- a LoRA adapter saved by torchgraft on PEFT's module names for the family loads in PEFT with the
  same outputs;
- ONNX export matches onnxruntime (one family fast, the rest slow).
The tiny configs switch on what each family differs in (sliding windows shorter than the inputs,
RoPE scalings whose original length the inputs pass, soft-caps that bite, NoPE and local/global
layers). `test_every_decoder_family_has_a_case` keeps a new family from skipping the checks.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch.testing import assert_close

import torchgraft
from torchgraft.interop.hf import load_hf_with_report, save_hf
from torchgraft.models.gpt import DecoderLM
from torchgraft.models.registry import build, get_family, list_families

T = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
T.logging.set_verbosity_error()

from test_hf_parity import _randomize  # noqa: E402

VOCAB = 97
TOL = 1e-4  # fp32, width 32, 2 layers: observed differences are ~1e-6; the bar is 1e-4
BASE = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0,
            eos_token_id=0, pad_token_id=0)


@dataclass(frozen=True)
class FamilySpec:
    """One checked configuration of a torchgraft family: its HF model_type, the tiny transformers
    config, and PEFT's module names to put LoRA on (HF names; mapped to ours by the interop table)."""
    family: str
    model_type: str
    hf_config: Callable[[], object]
    peft_targets: tuple[str, ...]


def _cfg(cls_name: str, **kw) -> Callable[[], object]:
    return lambda: getattr(T, cls_name)(**{**BASE, **kw})


ATTN_MLP = ("q_proj", "v_proj", "o_proj", "down_proj")
CASES: dict[str, FamilySpec] = {
    "llama-smollm2": FamilySpec("llama", "llama", _cfg("LlamaConfig", tie_word_embeddings=True,
                                                       rope_theta=100000.0), ATTN_MLP),
    "llama-yarn": FamilySpec("llama", "llama", _cfg("LlamaConfig", rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 16}), ATTN_MLP),
    "llama-llama3": FamilySpec("llama", "llama", _cfg("LlamaConfig", rope_parameters={
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}), ATTN_MLP),
    "llama-linear": FamilySpec("llama", "llama", _cfg("LlamaConfig", rope_parameters={
        "rope_type": "linear", "rope_theta": 1e4, "factor": 3.0}), ATTN_MLP),
    "gpt2": FamilySpec("gpt", "gpt2", lambda: T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB,
                                                           n_positions=64, bos_token_id=0, eos_token_id=0),
                       ("c_fc", "c_proj")),
    "qwen2-window-tied": FamilySpec("qwen2", "qwen2", _cfg("Qwen2Config", tie_word_embeddings=True,
                                                           use_sliding_window=True, sliding_window=4,
                                                           max_window_layers=1, rope_theta=1e6), ATTN_MLP),
    "qwen2-yarn": FamilySpec("qwen2", "qwen2", _cfg("Qwen2Config", tie_word_embeddings=False, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 16}), ATTN_MLP),
    "qwen3": FamilySpec("qwen3", "qwen3", _cfg("Qwen3Config", head_dim=16, tie_word_embeddings=False), ATTN_MLP),
    "qwen3-dynamic": FamilySpec("qwen3", "qwen3", _cfg("Qwen3Config", head_dim=8, tie_word_embeddings=True,
                                                       max_position_embeddings=8, rope_parameters={
                                                           "rope_type": "dynamic", "rope_theta": 1e4,
                                                           "factor": 2.0}), ATTN_MLP),
    "mistral-window": FamilySpec("mistral", "mistral", _cfg("MistralConfig", sliding_window=4), ATTN_MLP),
    "mistral-linear": FamilySpec("mistral", "mistral", _cfg("MistralConfig", sliding_window=None, rope_parameters={
        "rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}), ATTN_MLP),
    "gemma2": FamilySpec("gemma2", "gemma2", _cfg("Gemma2Config", head_dim=16, query_pre_attn_scalar=12,
                                                  sliding_window=4, attn_logit_softcapping=1.0,
                                                  final_logit_softcapping=3.0), ATTN_MLP),
    "gemma3": FamilySpec("gemma3", "gemma3_text", _cfg(
        "Gemma3TextConfig", head_dim=16, query_pre_attn_scalar=12, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}), ATTN_MLP),
    "phi3-longrope-partial": FamilySpec("phi3", "phi3", _cfg(
        "Phi3Config", num_key_value_heads=2, max_position_embeddings=32, original_max_position_embeddings=8,
        rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
                         "short_factor": [1.0, 1.3], "long_factor": [2.0, 3.5],
                         "original_max_position_embeddings": 8}),
        ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    "olmo2": FamilySpec("olmo2", "olmo2", _cfg("Olmo2Config"), ATTN_MLP),
    "smollm3-nope-llama3": FamilySpec("smollm3", "smollm3", _cfg(
        "SmolLM3Config", no_rope_layers=[1, 0], tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}), ATTN_MLP),
    # mixture of experts (tests/test_moe.py checks the expert compute itself); PEFT targets attention
    # (PEFT 0.21 rewrites `mlp.down_proj` targets of these models into their 3-D expert parameters)
    "mixtral-window": FamilySpec("mixtral", "mixtral", _cfg("MixtralConfig", num_local_experts=4, num_experts_per_tok=2,
                                                            sliding_window=4), ("q_proj", "v_proj", "o_proj")),
    "qwen3-moe": FamilySpec("qwen3_moe", "qwen3_moe", _cfg("Qwen3MoeConfig", head_dim=16, num_experts=4,
                                                           num_experts_per_tok=2, moe_intermediate_size=24,
                                                           norm_topk_prob=True), ("q_proj", "k_proj", "o_proj")),
    "qwen3-moe-unnormalized": FamilySpec("qwen3_moe", "qwen3_moe", _cfg(
        "Qwen3MoeConfig", head_dim=8, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=16,
        norm_topk_prob=False, tie_word_embeddings=True), ("q_proj", "v_proj")),
    # layer 0 dense (off the decoder_sparse_step=2 grid), layer 1 sparse
    "qwen3-moe-dense-layer": FamilySpec("qwen3_moe", "qwen3_moe", _cfg(
        "Qwen3MoeConfig", head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
        decoder_sparse_step=2, norm_topk_prob=True), ("q_proj", "o_proj")),
    # the noise is train-time only: eval logits and generation are unchanged (tests/test_moe.py: train mode)
    "mixtral-jitter": FamilySpec("mixtral", "mixtral", _cfg("MixtralConfig", num_local_experts=4, num_experts_per_tok=2,
                                                            router_jitter_noise=0.1), ("q_proj", "v_proj")),
    # shared expert with its sigmoid gate; layer 1 dense through mlp_only_layers
    "qwen2-moe-dense-layer": FamilySpec("qwen2_moe", "qwen2_moe", _cfg(
        "Qwen2MoeConfig", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, mlp_only_layers=[1]), ("q_proj", "v_proj")),
    "qwen2-moe-window": FamilySpec("qwen2_moe", "qwen2_moe", _cfg(
        "Qwen2MoeConfig", num_experts=6, num_experts_per_tok=3, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, norm_topk_prob=True, use_sliding_window=True, sliding_window=4,
        max_window_layers=2, tie_word_embeddings=True), ("k_proj", "o_proj")),
}
FAST_ONNX = {"qwen3"}


def _decoder_families() -> set[str]:
    out = set()
    for fam in list_families():
        f = get_family(fam)
        with torch.device("meta"):
            model = f.builder(f.config_cls())
        if isinstance(model, DecoderLM):
            out.add(fam)
    return out


def test_every_decoder_family_has_a_case():
    assert {s.family for s in CASES.values()} == _decoder_families()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """case -> (saved directory, the transformers model), built once per case."""
    made: dict[str, tuple] = {}

    def get(case: str):
        if case not in made:
            spec = CASES[case]
            cfg = spec.hf_config()
            assert cfg.model_type == spec.model_type
            torch.manual_seed(0)
            model = _randomize(T.AutoModelForCausalLM.from_config(cfg))
            path = tmp_path_factory.mktemp(case)
            model.save_pretrained(path)
            made[case] = (path, model)
        return made[case]
    return get


def _batch():
    """(ids, mask, positions): 2 rows of 12, the first left-padded by 4."""
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    ids[0, :4] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _compare_logits(ours, hf) -> float:
    ids, mask, pos = _batch()
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, position_ids=pos)
        b = hf(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert_close(a[real], b[real], rtol=TOL, atol=TOL)
    return (a[real] - b[real]).abs().max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_load_hf_logits_left_padded(case, hf_dirs, one_thread):
    path, hf = hf_dirs(case)
    ours, report = load_hf_with_report(path)
    assert get_family(CASES[case].family).config_cls is type(ours.config)
    assert report.loaded == len(ours.state_dict())
    _compare_logits(ours, hf)
    with torch.no_grad():  # no mask: the causal fast path
        ids = _batch()[0][1:]
        assert_close(ours(ids), hf(ids).logits, rtol=TOL, atol=TOL)


def _prompt(model) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ids, mask, new tokens): 7-token prompts (row 0 left-padded to 3 real tokens) and 10 new
    tokens, which pass the sliding windows and RoPE original lengths of the cases; fewer when the
    model's context (block_size, where `generate` starts shifting the window) is shorter."""
    ids, mask, _ = _batch()
    return ids[:, :7], mask[:, :7], min(10, model.config.block_size - 7)


def _hf_greedy(hf, ids, mask, n):
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)[:, ids.shape[1]:]


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_generate_matches_transformers(case, hf_dirs, one_thread):
    path, hf = hf_dirs(case)
    ours = torchgraft.load_hf(path)
    ids, mask, n = _prompt(ours)
    ref = _hf_greedy(hf, ids, mask, n)
    from torchgraft.generation import generate

    res = generate(ours, ids, attention_mask=mask, max_new_tokens=n, eos_token_id=None, cache="static")
    assert res.tokens == ref.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_generate_matches_transformers(case, hf_dirs):
    torch._dynamo.reset()  # one compiled decode-step function serves every case: start each afresh
    path, hf = hf_dirs(case)
    ours = torchgraft.load_hf(path)
    ids, mask, n = _prompt(ours)
    ref = _hf_greedy(hf, ids, mask, n)
    from torchgraft.generation import generate

    with warnings.catch_warnings():
        # a silent fall-back to eager would not test compilation
        warnings.filterwarnings("error", message="torch.compile of the decode step failed")
        res = generate(ours, ids, attention_mask=mask, max_new_tokens=n, eos_token_id=None, compile=True)
    assert res.tokens == ref.tolist()


@pytest.mark.parametrize("case", list(CASES))
def test_save_hf_loads_back_in_transformers(case, hf_dirs, tmp_path, one_thread):
    path, hf = hf_dirs(case)
    ours = torchgraft.load_hf(path)
    save_hf(ours, tmp_path / "out")
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.config.model_type == CASES[case].model_type
    assert type(back) is type(hf)
    _compare_logits(ours, back)
    again = torchgraft.load_hf(tmp_path / "out")
    assert again.config == ours.config


@pytest.mark.parametrize("case", list(CASES))
def test_convert_cli_both_ways(case, hf_dirs, tmp_path, one_thread):
    """`torchgraft convert` HF -> torchgraft checkpoint -> HF; both read back with transformers' logits."""
    from torchgraft.cli import main
    from torchgraft import load_model

    path, hf = hf_dirs(case)
    assert main(["convert", str(path), str(tmp_path / "tg")]) in (0, None)
    ours = load_model(tmp_path / "tg").eval()
    _compare_logits(ours, hf)
    assert main(["convert", str(tmp_path / "tg"), str(tmp_path / "hf")]) in (0, None)
    _compare_logits(ours, T.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval())


@pytest.mark.parametrize("case", list(CASES))
def test_lora_adapter_loads_in_peft(case, hf_dirs, tmp_path, one_thread):
    from torchgraft import peft as tp
    from torchgraft.peft.adapter_io import hf_module_names

    path, _ = hf_dirs(case)
    targets = CASES[case].peft_targets
    fresh = T.AutoModelForCausalLM.from_pretrained(path).eval()
    hf_leafs = {n.rsplit(".", 1)[-1] for n, _ in fresh.named_modules()}
    assert set(targets) <= hf_leafs, f"{targets} are not module names of {type(fresh).__name__}"
    ours = torchgraft.load_hf(path)
    names = hf_module_names(ours)[0]
    mine = sorted({o.rsplit(".", 1)[-1] for o, h in names.items() if h.rsplit(".", 1)[-1] in targets})
    assert mine, f"no torchgraft layer maps to {targets}"
    ids, mask, pos = _batch()
    with torch.no_grad():
        before = ours(ids, attention_mask=mask, position_ids=pos)
    tp.apply_lora(ours, mine, rank=4, alpha=8)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    tp.save_adapter(ours, tmp_path / "ad", hf_names=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(fresh, tmp_path / "ad").eval()
    assert {m.rsplit(".", 1)[-1] for m in pm.peft_config["default"].target_modules} == set(targets)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, position_ids=pos)
        b = pm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert (a - before)[real].abs().max() > 0.1  # the adapter changes the outputs: the check is not vacuous
    assert_close(a[real], b[real], rtol=TOL, atol=TOL)


def _onnx_params():
    return [pytest.param(c, id=c, marks=[] if c in FAST_ONNX else [pytest.mark.slow]) for c in CASES]


@pytest.mark.parametrize("case", _onnx_params())
def test_onnx_export_matches_onnxruntime(case, hf_dirs, tmp_path, one_thread):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from torchgraft.interop.export import eager_module, export, max_abs_diff

    path, _ = hf_dirs(case)
    ours = torchgraft.load_hf(path)
    res = export(ours, format="onnx", path=tmp_path / "m.onnx")
    module = eager_module(ours, res.kind, res.input_names).eval()
    ids, mask, _ = _batch()
    for inputs in [(ids, mask), (ids[1:, :5], mask[1:, :5])]:
        diff = max_abs_diff(tmp_path / "m.onnx", module, inputs[: len(res.input_names)])
        assert diff <= TOL, f"{case}: onnxruntime differs by {diff:.3g}"


# transformers 4.x wrote RoPE as `rope_theta` + `rope_scaling` (Gemma 3: `rope_local_base_freq`,
# Phi-3: a top-level `partial_rotary_factor`) and no `layer_types`; published checkpoints still do
V4_CASES = ["qwen2-yarn", "gemma2", "gemma3", "phi3-longrope-partial", "smollm3-nope-llama3"]


def _as_v4(hf_cfg: dict) -> dict:
    cfg = dict(hf_cfg)
    params = cfg.pop("rope_parameters")
    if "full_attention" in params:  # gemma3
        full, local = params["full_attention"], params["sliding_attention"]
        cfg["rope_local_base_freq"] = local["rope_theta"]
        params = full
    params = dict(params)
    cfg["rope_theta"] = params.pop("rope_theta")
    if "partial_rotary_factor" in params:
        cfg["partial_rotary_factor"] = params.pop("partial_rotary_factor")
    kind = params.pop("rope_type")
    cfg["rope_scaling"] = None if kind == "default" else {"type": kind, **params}
    if cfg.get("model_type") in ("gemma2", "gemma3_text"):  # their 4.x default pattern
        cfg.pop("layer_types", None)
    return cfg


@pytest.mark.parametrize("case", V4_CASES)
def test_transformers_4x_style_config_loads_the_same(case, hf_dirs, tmp_path, one_thread):
    import json
    import shutil

    path, hf = hf_dirs(case)
    shutil.copytree(path, tmp_path / "v4")
    cfg = json.loads((path / "config.json").read_text())
    v4 = _as_v4(cfg)
    if case == "gemma3":  # 4.x had no layer_types: the pattern came from sliding_window_pattern
        v4["sliding_window_pattern"] = 2
    (tmp_path / "v4" / "config.json").write_text(json.dumps(v4))
    _compare_logits(torchgraft.load_hf(tmp_path / "v4"), hf)
