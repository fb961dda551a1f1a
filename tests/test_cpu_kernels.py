"""The CPU kernel rewrites (torchgraft.nn.cpu_kernels) and the `cpu-kernels` converter that picks them:
each rewrite gives its plain layer's results (values and gradients) up to float rounding, the
converter keeps parameters (shared), state-dict names and seeded-init values, and it is applied by
compiled training and static-cache decoding, never by model code."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchgraft
from torchgraft.nn.cpu_kernels import (SMALL_ROWS, ATenGradEmbedding, DecodeLinear, DecodeTiedLinear,
                                       SigmoidGELUTanh, _rows, _use_transposed, embedding_backward, linear)
from torchgraft.nn.linear import TiedLinear
from torchgraft.testing import assert_close_computed, model_tol, tolerance
from torchgraft.tools.converters import apply_converters, build_converter
from torchgraft.tools.cpu_kernels import cpu_kernels, kernel_converters

pytestmark = pytest.mark.numeric  # float comparisons: re-run under a forced CPU capability (docs/testing.md)


# ---- the few-row product ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1, 48), (3, 1, 48), (2, 4, 48), (17, 48), (5, 0, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_f_linear_in_values_and_gradients(shape, bias):
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(40, 48, requires_grad=True)
    b = torch.randn(40, requires_grad=True) if bias else None
    ours = linear(x, w, b)
    ref = F.linear(x, w, b)
    assert ours.shape == ref.shape and ours.is_contiguous()
    assert_close_computed(ours, ref, tolerance(reduction=48))  # another orientation: another summation order
    grads = torch.autograd.grad(ours.square().sum(), [t for t in (x, w, b) if t is not None])
    ref_grads = torch.autograd.grad(ref.square().sum(), [t for t in (x, w, b) if t is not None])
    for g, r in zip(grads, ref_grads):
        assert_close_computed(g, r, tolerance(reduction=48, depth=2))  # forward product, then the gradient's


def uses_transposed(x: torch.Tensor, w: torch.Tensor) -> bool:
    return _use_transposed(x, w, _rows(x))


def test_transposed_product_only_for_few_fp32_rows_outside_export():
    w = torch.zeros(8, 4)
    assert uses_transposed(torch.zeros(SMALL_ROWS, 4), w)
    assert uses_transposed(torch.zeros(2, 1, 4), w)
    assert not uses_transposed(torch.zeros(SMALL_ROWS + 1, 4), w)
    assert not uses_transposed(torch.zeros(2, 4, dtype=torch.bfloat16), w.bfloat16())


def test_export_of_a_decode_linear_keeps_a_shape_generic_graph():
    layer = DecodeLinear(6, 3).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(layer, (torch.randn(4, 6),), dynamic_shapes=({0: batch},))
    for rows in (1, 4, 20):
        x = torch.randn(rows, 6)
        assert_close_computed(ep.module()(x), F.linear(x, layer.weight, layer.bias), tolerance(reduction=6))


@pytest.mark.parametrize("bias", [True, False])
def test_compiled_single_row_equals_f_linear(bias):
    torch.manual_seed(0)
    w, b = torch.randn(40, 48), (torch.randn(40) if bias else None)
    compiled = torch.compile(linear, dynamic=False, fullgraph=True)
    for shape in [(1, 1, 48), (1, 48), (3, 1, 48)]:  # one row takes the reduction, three the mm
        x = torch.randn(*shape)
        assert_close_computed(compiled(x, w, b), F.linear(x, w, b), tolerance(reduction=48))


# ---- the embedding's ATen backward ----------------------------------------------------------------
def test_embedding_backward_op_passes_the_custom_op_checks():
    grad, ids = torch.randn(2, 5, 3), torch.randint(0, 7, (2, 5))
    torch.library.opcheck(embedding_backward, (grad, ids, 7, -1))
    assert torch.equal(embedding_backward(grad, ids, 7, 1),  # the same ATen kernel
                       torch.ops.aten.embedding_dense_backward(grad, ids, 7, 1, False))


@pytest.mark.parametrize("padding_idx", [None, 3])
def test_compiled_embedding_gradients_equal_eager_nn_embedding(padding_idx):
    torch.manual_seed(0)
    ours = ATenGradEmbedding(20, 8, padding_idx=padding_idx)
    plain = nn.Embedding(20, 8, padding_idx=padding_idx)
    plain.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 20, (3, 16))
    ids[0, :4] = 3  # repeated ids accumulate; id 3 is the padding row in one case
    scale = torch.randn(3, 16, 8)
    compiled = torch.compile(lambda ids: (ours(ids) * scale).sum(), fullgraph=True)
    compiled(ids).backward()
    (plain(ids) * scale).sum().backward()
    assert torch.equal(ours.weight.grad, plain.weight.grad)  # ATen's kernel in both, on the same gradient
    if padding_idx is not None:
        assert ours.weight.grad[padding_idx].abs().sum() == 0


# ---- GELU (tanh) in sigmoid form ------------------------------------------------------------------
def test_compiled_sigmoid_gelu_tanh_equals_f_gelu_in_values_and_gradients():
    act = SigmoidGELUTanh()
    x = (torch.randn(4, 64) * 3).requires_grad_()
    compiled = torch.compile(act, fullgraph=True)
    ours, ref = compiled(x), F.gelu(x, approximate="tanh")
    # x * sigmoid(2u) vs tanh's formula: a few elementwise roundings (u's cubic, the exp, the division)
    assert_close_computed(ours, ref, tolerance(reduction=1, depth=6))
    (g_ours,) = torch.autograd.grad(ours.square().sum(), x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    assert_close_computed(g_ours, g_ref, tolerance(reduction=1, depth=12))  # and their derivatives
    assert torch.equal(act(x), ref)  # eager is F.gelu itself


# ---- the converter --------------------------------------------------------------------------------
def _gpt_tiny() -> nn.Module:
    torch.manual_seed(0)
    return torchgraft.build("gpt-tiny").eval()


def test_converter_swaps_plain_layers_and_keeps_parameters_names_and_logits():
    model = _gpt_tiny()
    params = {n: p for n, p in model.named_parameters()}
    names = list(model.state_dict())
    ids = torch.randint(0, 256, (2, 9))
    before = model(ids)
    (report,) = apply_converters(model, [build_converter("cpu-kernels")])
    kinds = {type(m) for m in model.modules()}
    assert {DecodeLinear, ATenGradEmbedding, SigmoidGELUTanh, DecodeTiedLinear} <= kinds
    assert not kinds & {nn.Linear, nn.Embedding, nn.GELU, TiedLinear}
    # 2 blocks x (q, k, v, o, fc_in, fc_out, gelu) + tok_emb + pos_emb + the tied head
    assert len(report.swapped) == 2 * 7 + 3 and not report.skipped
    assert list(model.state_dict()) == names
    assert all(p is params[n] for n, p in model.named_parameters())  # the very tensors: optimizers, ties
    # 18 rows take F.linear again; one row per sequence takes the transposed product
    torch.testing.assert_close(model(ids), before, rtol=0, atol=0)
    cache = model.make_kv_cache(2)
    model(ids[:, :8], kv_cache=cache)
    step = model(ids[:, 8:], kv_cache=cache)[:, -1]
    assert_close_computed(step, before[:, -1], model_tol(model, seq_len=9))
    assert apply_converters(model, [cpu_kernels()])[0].swapped == []  # converting twice changes nothing


def test_converter_leaves_subclasses_and_hooked_layers_and_draws_no_random_numbers():
    class Quantised(nn.Linear):
        pass

    model = nn.Sequential(Quantised(4, 4), nn.Linear(4, 4), nn.Embedding(5, 4, max_norm=1.0), nn.Linear(4, 4))
    model[1].register_forward_hook(lambda m, i, o: None)
    state = torch.random.get_rng_state()
    report = cpu_kernels().convert(model)
    assert torch.equal(torch.random.get_rng_state(), state)  # the new layer is built on meta
    assert type(model[0]) is Quantised and type(model[1]) is nn.Linear and type(model[2]) is nn.Embedding
    assert report.swapped == ["3"] and set(report.skipped) == {"1", "2"}


def test_kernel_converters_only_on_cpu():
    assert [c.name for c in kernel_converters("cpu")] == ["cpu-kernels"]
    assert kernel_converters("meta") == [] and kernel_converters("cuda") == []


def test_model_code_is_plain_until_decoding_or_compiled_training_converts_it():
    from torchgraft.generation import generate
    from torchgraft.train.engine import LocalEngine

    model = _gpt_tiny()
    assert {type(m) for m in model.modules()} >= {nn.Linear, nn.Embedding, nn.GELU, TiedLinear}
    eager, _ = LocalEngine("cpu").setup_model(_gpt_tiny(), None, None, compile=False)
    assert not any(type(m).__module__ == "torchgraft.nn.cpu_kernels" for m in eager.modules())
    compiled, _ = LocalEngine("cpu").setup_model(_gpt_tiny(), None, None, compile=True)
    assert any(isinstance(m, ATenGradEmbedding) for m in compiled.modules())
    ids = torch.randint(0, 256, (1, 5))
    plain_out = generate(_gpt_tiny(), ids, max_new_tokens=4, cache="dynamic").tokens
    assert generate(model, ids, max_new_tokens=4).tokens == plain_out  # the static decoder converts
    assert any(isinstance(m, DecodeLinear) for m in model.modules())
