"""The mixture-of-experts block: expert compute against a naive per-token reference, the blocks of
transformers (Mixtral, Qwen3-MoE, Qwen2-MoE's shared expert) with copied weights, the load-balancing
loss against transformers' `load_balancing_loss_func`, and the LM task's `router_aux_coef`."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import torchgraft
from torchgraft.nn.linear import Linear
from torchgraft.nn.mlp import GatedMLP
from torchgraft.nn.moe import GroupedExperts, MoE, SoftmaxTopK, load_balancing_loss, router_logits_of
from torchgraft.testing import assert_close_computed, tolerance

T = pytest.importorskip("transformers")

C, H, E = 16, 24, 6


def _moe(top_k: int = 2, renormalize: bool = True, shared: bool = False) -> MoE:
    torch.manual_seed(0)
    m = MoE(Linear(C, E, bias=False), SoftmaxTopK(top_k, renormalize), GroupedExperts(E, C, H),
            shared_expert=GatedMLP(C, 20) if shared else None, shared_gate=Linear(C, 1, bias=False) if shared else None)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return m


def _naive(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per token: softmax over the router, top-k, renormalise, sum of weighted expert MLPs."""
    out = []
    w_gu, w_d = m.experts.gate_up_proj.weight, m.experts.down_proj.weight
    for tok in x.reshape(-1, C):
        probs = (m.gate.weight @ tok).softmax(-1)
        w, idx = probs.topk(m.top_k)
        if m.routing.renormalize:
            w = w / w.sum()
        y = torch.zeros(C)
        for wj, e in zip(w, idx):
            g, u = (w_gu[e] @ tok).chunk(2)
            y = y + wj * (w_d[e] @ (F.silu(g) * u))
        out.append(y)
    return torch.stack(out).view_as(x)


@pytest.mark.numeric
@pytest.mark.parametrize("top_k,renormalize", [(1, True), (2, True), (3, False), (E, True)])
def test_expert_compute_equals_per_token_reference(top_k, renormalize):
    m = _moe(top_k, renormalize)
    x = torch.randn(3, 7, C, generator=torch.Generator().manual_seed(1))
    # fp32 sums of <= 24 products per output, two projections and the weighted sum of k experts
    assert_close_computed(m(x), _naive(m, x), tolerance(H, depth=3))


@pytest.mark.numeric
def test_gradients_equal_reference():
    m = _moe(2)
    x = torch.randn(2, 5, C, generator=torch.Generator().manual_seed(2), requires_grad=True)
    m(x).square().sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    x.grad = None
    m.zero_grad()
    _naive(m, x).square().sum().backward()
    want = [x.grad] + [p.grad for p in m.parameters()]
    for a, b in zip(got, want):
        assert_close_computed(a, b, tolerance(H, depth=6))  # forward (3) and backward (3)


@pytest.mark.numeric
def test_unused_experts_and_single_token():
    m = _moe(1)
    with torch.no_grad():
        m.gate.weight.zero_()
        m.gate.weight[3] = 10.0 * torch.ones(C)  # every token with a positive sum goes to expert 3
    x = torch.rand(1, 4, C)  # positive: all tokens pick expert 3, the other experts get nothing
    assert_close_computed(m(x), _naive(m, x), tolerance(H, depth=3))
    assert_close_computed(m(x[:, :1]), _naive(m, x[:, :1]), tolerance(H, depth=3))


def _copy_into(ours: MoE, hf_block) -> None:
    with torch.no_grad():
        ours.gate.weight.copy_(hf_block.gate.weight)
        ours.experts.gate_up_proj.weight.copy_(hf_block.experts.gate_up_proj)
        ours.experts.down_proj.weight.copy_(hf_block.experts.down_proj)
        if ours.shared_expert is not None:
            ours.shared_expert.load_state_dict(hf_block.shared_expert.state_dict())
            ours.shared_gate.weight.copy_(hf_block.shared_expert_gate.weight)


BLOCKS = {
    "mixtral": (lambda: T.MixtralConfig(hidden_size=C, intermediate_size=H, num_local_experts=E,
                                        num_experts_per_tok=2),
                "mixtral.modeling_mixtral.MixtralSparseMoeBlock", dict(top_k=2)),
    "qwen3-moe-norm": (lambda: T.Qwen3MoeConfig(hidden_size=C, moe_intermediate_size=H, num_experts=E,
                                                num_experts_per_tok=3, norm_topk_prob=True),
                       "qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock", dict(top_k=3)),
    "qwen3-moe": (lambda: T.Qwen3MoeConfig(hidden_size=C, moe_intermediate_size=H, num_experts=E,
                                           num_experts_per_tok=3, norm_topk_prob=False),
                  "qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock", dict(top_k=3, renormalize=False)),
    "qwen2-moe-shared": (lambda: T.Qwen2MoeConfig(hidden_size=C, moe_intermediate_size=H, num_experts=E,
                                                  num_experts_per_tok=2, norm_topk_prob=False,
                                                  shared_expert_intermediate_size=20),
                         "qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock",
                         dict(top_k=2, renormalize=False, shared=True)),
}


@pytest.mark.numeric
@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_matches_transformers_block(name, impl):
    import importlib

    make_cfg, path, kw = BLOCKS[name]
    mod, cls = path.rsplit(".", 1)
    cfg = make_cfg()
    cfg._experts_implementation = impl
    torch.manual_seed(0)
    hf = getattr(importlib.import_module(f"transformers.models.{mod}"), cls)(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    ours = _moe(**kw)
    _copy_into(ours, hf)
    x = torch.randn(2, 9, C, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close_computed(ours(x), hf(x), tolerance(H, depth=3))


@pytest.mark.numeric
@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_matches_transformers(masked):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    g = torch.Generator().manual_seed(4)
    logits = tuple(torch.randn(2 * 7, E, generator=g) for _ in range(3))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    want = load_balancing_loss_func(logits, E, 2, mask if masked else None)
    got = load_balancing_loss(list(logits), 2, mask if masked else None)
    assert_close_computed(got, want, tolerance(3 * 2 * 7, depth=2))  # softmax, then a mean over 3 x 14 rows
    # an even router (all logits equal) scores exactly top_k
    even = [torch.zeros(12, 4)]
    assert_close(load_balancing_loss(even, 2), torch.tensor(2.0))


def test_model_keeps_router_logits_and_meta_build_counts_active_experts():
    m = torchgraft.build("mixtral-tiny").eval()
    ids = torch.randint(0, 256, (2, 5))
    m(ids)
    logits = router_logits_of(m)
    assert len(logits) == 2 and logits[0].shape == (10, 4)
    from torchgraft.tools.flops import measure_flops

    meta = torchgraft.build("mixtral-tiny", device="meta")
    c = meta.config
    fwd = measure_flops(meta, batch=1, seq_len=8, backward=False).forward
    dense = measure_flops(torchgraft.build("mixtral-tiny", device="meta", top_k=4), batch=1, seq_len=8,
                          backward=False).forward
    per_assignment = 2 * 8 * 3 * c.n_embd * c.intermediate_size  # 8 tokens through one more expert each
    assert dense - fwd == c.n_layer * 2 * per_assignment  # top-4 runs 2 more experts per token and layer


def test_lm_task_adds_router_aux_loss():
    from torchgraft.train.tasks.base import build_task

    m = torchgraft.build("qwen3-moe-tiny").train()
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(5))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    plain = build_task("lm").loss_sum(m, batch)
    with_aux = build_task({"name": "lm", "router_aux_coef": 0.5}).loss_sum(m, batch)
    aux = load_balancing_loss(router_logits_of(m), m.config.top_k, batch["attention_mask"])
    n = (ids != -100).sum()
    assert_close(with_aux, plain + 0.5 * aux * n)
    with_aux.backward()
    assert m.blocks[0].mlp.gate.weight.grad.abs().sum() > 0
    from torchgraft.errors import ConfigError

    with pytest.raises(ConfigError, match="mixture-of-experts"):
        build_task({"name": "lm", "router_aux_coef": 0.1}).loss_sum(torchgraft.build("llama-tiny"), batch)
    with pytest.raises(ConfigError, match="router_aux_coef"):
        build_task({"name": "lm", "router_aux_coef": -1})


# qwen2-moe without its q/k/v biases: a bias is a parameter of the analytic 6N but an add, not a matmul
@pytest.mark.parametrize("preset,kw", [("mixtral-tiny", {}), ("qwen3-moe-tiny", {}), ("qwen2-moe-tiny", {"bias": False})])
def test_flops_report_counts_active_parameters(preset, kw):
    from torchgraft.tools.flops import flops_report

    meta = torchgraft.build(preset, device="meta", **kw)
    c = meta.config
    rep = flops_report(meta, seq_len=8)
    expert_params = sum(p.numel() for n, p in meta.named_parameters() if ".experts." in n)
    matmul = sum(p.numel() for n, p in meta.named_parameters()  # all but the lookup table and norms
                 if "norm" not in n and not n.startswith("tok_emb"))
    assert rep.n_params == matmul - expert_params * (c.n_experts - c.top_k) // c.n_experts
    assert rep.ratio == pytest.approx(1.0, abs=1e-9)  # every matmul is counted by both


@pytest.mark.parametrize("preset,total,active", [("mixtral-8x7b", 46_702_792_704, 12_879_925_248),
                                                 ("qwen3-30b-a3b", 30_532_122_624, 3_353_032_704),
                                                 ("qwen1.5-moe-a2.7b", 14_315_784_192, 2_689_173_504)])
def test_presets_have_published_sizes(preset, total, active):
    """Mixtral-8x7B: 46.7B (12.9B active); Qwen3-30B-A3B: 30.5B (3.3B active); Qwen1.5-MoE-A2.7B:
    14.3B (2.7B active, the shared expert counted as active), embeddings included."""
    from torchgraft.nn.moe import inactive_expert_params

    m = torchgraft.build(preset, device="meta")
    n = sum(p.numel() for p in m.parameters())
    assert n == total
    assert n - inactive_expert_params(m) == active


@pytest.mark.parametrize("name", ["mixtral-8x7b", "qwen3-30b-a3b", "qwen1.5-moe-a2.7b"])
def test_inspect_reports_memory_and_active_flops(name, capsys):
    import json

    from torchgraft.cli import main
    from torchgraft.nn.moe import inactive_expert_params

    main(["inspect", name, "--json", "--seq", "256"])
    d = json.loads(capsys.readouterr().out)
    m = torchgraft.build(name, device="meta")
    n = sum(p.numel() for p in m.parameters())
    assert d["parameters"] == n and d["memory_bytes"]["weights"] == 4 * n
    assert d["memory_bytes"]["activations"] > 0
    assert d["flops"]["n_params"] < n - inactive_expert_params(m) + 1  # the active weights only
    assert d["flops"]["measured_over_analytic"] == pytest.approx(1.0, abs=0.01)


@pytest.mark.numeric
def test_dense_path_for_exported_graphs_equals_grouped():
    m = _moe(2)
    x = torch.randn(3, 5, C, generator=torch.Generator().manual_seed(6)).reshape(-1, C)
    w, idx = m.routing(m.gate(x))
    assert_close_computed(m.experts.dense(x, w, idx), m.experts(x, w, idx), tolerance(H, depth=3))


@pytest.mark.numeric
def test_grow_deeper_keeps_the_function_and_freeze_lora_see_the_parts():
    """Zeroing the declared residual projections (attention o_proj, experts.down_proj) makes a copied
    MoE block the identity, so `grow` deepens a Mixtral exactly; LoRA on attention trains the rest frozen."""
    from torchgraft import peft as tp
    from torchgraft.tools.grow import grow

    m = torchgraft.build("mixtral-tiny").eval()
    assert "blocks.0.mlp.experts.down_proj" in m.parts().residual_projections
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(8))
    bigger, report = grow(m, depth=1, example_inputs=(ids,))
    assert len(bigger.blocks) == 3
    with torch.no_grad():
        assert_close(bigger(ids), m(ids), rtol=0, atol=0)  # the new block adds exact zeros: identical
    tp.apply_lora(m, ["q_proj", "v_proj"], rank=2)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable)


def test_training_with_router_aux_loss_lowers_the_loss(tmp_path):
    """A Mixtral trained through the trainer with `task: {name: lm, router_aux_coef}` learns: the
    validation loss falls well below its start (uniform prediction over the char vocabulary)."""
    import math

    from torchgraft.train import run_training

    cfg = {"model": {"name": "mixtral-tiny", "n_layer": 1, "block_size": 32},
           "data": {"name": "text", "tokenizer": "char", "seq_len": 32, "max_tokens": 20000,
                    "cache_dir": str(tmp_path / "cache"), "progress": False},
           "task": {"name": "lm", "router_aux_coef": 0.02},
           "optim": {"lr": 3e-3}, "trainer": {"max_steps": 30, "batch_size": 8, "seed": 0},
           "eval": {"max_batches": 4, "batch_size": 8},
           "logging": {"progress": False, "tensorboard": False, "measure_flops": False, "every": 10}}
    res = run_training(cfg, tmp_path / "run")
    assert res.metrics["val_loss"] < 0.8 * math.log(res.model.config.vocab_size)  # 3.13 vs 0.8 * 4.6


def test_qwen2_moe_preset_equals_transformers_defaults_on_meta():
    """transformers' `Qwen2MoeConfig()` defaults are Qwen1.5-MoE-A2.7B: same parameter count on meta."""
    with torch.device("meta"):
        hf = T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig())
    ours = torchgraft.build("qwen1.5-moe-a2.7b", device="meta")
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())


def test_dense_layers_of_the_qwen_moe_families():
    from torchgraft.errors import ConfigError
    from torchgraft.nn.mlp import GatedMLP

    m = torchgraft.build("qwen3-moe-tiny", device="meta", n_layer=4, decoder_sparse_step=2, mlp_only_layers=[3])
    assert [type(b.mlp) for b in m.blocks] == [GatedMLP, MoE, GatedMLP, GatedMLP]
    assert m.blocks[0].mlp.up_proj.weight.shape == (96, 64)  # dense layers: intermediate_size wide
    q2 = torchgraft.build("qwen2-moe-tiny", device="meta", mlp_only_layers=[0])
    assert isinstance(q2.blocks[0].mlp, GatedMLP) and q2.blocks[1].mlp.shared_expert is not None
    with pytest.raises(ConfigError, match="decoder_sparse_step"):
        torchgraft.build("qwen3-moe-tiny", device="meta", decoder_sparse_step=0)
    with pytest.raises(ConfigError, match="mlp_only_layers"):
        torchgraft.build("qwen2-moe-tiny", device="meta", mlp_only_layers=[2])


def test_router_jitter_is_train_time_noise_as_transformers(tmp_path):
    """Mixtral's `router_jitter_noise`: eval logits ignore it; in training mode, from the same seed,
    torchgraft draws the same noise as transformers (one uniform per element of each block's input)
    and gives the same logits, which differ from the eval ones."""
    from test_hf_parity import _randomize

    cfg = T.MixtralConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=48, vocab_size=97, num_local_experts=4, num_experts_per_tok=2,
                          router_jitter_noise=0.3)
    torch.manual_seed(0)
    hf = _randomize(T.MixtralForCausalLM(cfg))
    hf.save_pretrained(tmp_path)
    ours = torchgraft.load_hf(tmp_path)
    assert ours.config.router_jitter == pytest.approx(0.3)
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # fp32, width 32, 2 layers: differences are rounding (~1e-6); 1e-4 as the family checks
        evals = ours(ids)
        assert_close(evals, hf(ids).logits, rtol=1e-4, atol=1e-4)
        hf.train(), ours.train()
        torch.manual_seed(11)
        want = hf(ids).logits
        torch.manual_seed(11)
        got = ours(ids)
    assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - evals).abs().max() > 1e-2  # the noise changes the routing / outputs
    with torch.no_grad():
        again = ours(ids)  # the next draw is other noise
    assert (again - got).abs().max() > 1e-3


def test_unaligned_sizes_take_the_per_expert_fallback():
    """Widths whose strides are not 16-byte multiples (C=6, H=5) cannot use torch._grouped_mm; the
    per-expert fallback gives the reference values and gradients."""
    torch.manual_seed(0)
    m = MoE(Linear(6, 4, bias=False), SoftmaxTopK(2), GroupedExperts(4, 6, 5))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(9), requires_grad=True)
    got = m(x)
    got.square().sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    x.grad = None
    m.zero_grad()
    out = []  # naive, widths of this block
    for tok in x.reshape(-1, 6):
        w, idx = (m.gate.weight @ tok).softmax(-1).topk(2)
        w = w / w.sum()
        y = 0
        for wj, e in zip(w, idx):
            g, u = (m.experts.gate_up_proj.weight[e] @ tok).chunk(2)
            y = y + wj * (m.experts.down_proj.weight[e] @ (F.silu(g) * u))
        out.append(y)
    want = torch.stack(out).view_as(x)
    want.square().sum().backward()
    assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, [x.grad] + [p.grad for p in m.parameters()]):
        assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu", "relu", "quick_gelu"])
def test_written_out_backward_of_each_activation(activation):
    """The operator's hand-written backward against autograd through `traced` (plain ops)."""
    torch.manual_seed(0)
    ex = GroupedExperts(E, C, H, activation)
    x = torch.randn(9, C, generator=torch.Generator().manual_seed(10), requires_grad=True)
    w = torch.rand(9, 2, generator=torch.Generator().manual_seed(11), requires_grad=True)
    idx = torch.randint(0, E, (9, 2), generator=torch.Generator().manual_seed(12))
    results = []
    for fn in (ex, ex.traced):
        x.grad = w.grad = None
        ex.zero_grad()
        y = fn(x, w, idx)
        y.square().sum().backward()
        results.append([y, x.grad, w.grad, ex.gate_up_proj.weight.grad, ex.down_proj.weight.grad])
    for a, b in zip(*results):
        assert_close(a, b, rtol=1e-4, atol=1e-5)


def _graphs_of(fn, *args):
    """The FX graphs dynamo hands its backend when compiling `fn(*args)` (aot_eager runs them)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, _inputs):  # noqa: ANN001, ANN202
        graphs.append(gm)
        return make_boxed_func(gm.forward)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))
    return compiled(*args), graphs


def test_compiled_block_stays_sparse_and_matches_eager():
    """Under torch.compile the experts run as the sparse operator (not the dense E/k path), forward
    and backward, with eager's values and gradients."""
    m = _moe(2)
    x = torch.randn(2, 7, C, generator=torch.Generator().manual_seed(13), requires_grad=True)
    want = m(x)
    want.square().sum().backward()
    want_grads = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    x.grad = None
    m.zero_grad()
    got, graphs = _graphs_of(m, x)
    got.square().sum().backward()
    assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip([x.grad] + [p.grad for p in m.parameters()], want_grads):
        assert_close(a, b, rtol=1e-5, atol=1e-6)
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert "torchgraft.grouped_experts.default" in targets
    assert "torchgraft.grouped_experts_backward.default" in targets
    assert not any("einsum" in t or "bmm" in t for t in targets)  # no dense all-experts compute
