"""torchgraft.nn.Linear: F.linear's results by a faster orientation for the few rows of a decode step."""
import pytest
import torch
import torch.nn.functional as F

from torchgraft.nn.linear import SMALL_ROWS, Linear, _rows, _use_transposed, linear
from torchgraft.testing import assert_close_computed, tolerance

pytestmark = pytest.mark.numeric  # float comparisons: re-run under a forced CPU capability (docs/testing.md)


@pytest.mark.parametrize("shape", [(1, 1, 48), (3, 1, 48), (2, 4, 48), (17, 48), (5, 0, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_f_linear_in_values_and_gradients(shape, bias):
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


def test_layer_is_an_nn_linear_with_the_same_state_dict():
    layer = Linear(6, 3)
    plain = torch.nn.Linear(6, 3)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 6)
    assert isinstance(layer, torch.nn.Linear) and repr(layer) == repr(plain)
    assert_close_computed(layer(x), plain(x), tolerance(reduction=6))


def test_export_keeps_a_shape_generic_graph():
    layer = Linear(6, 3).eval()
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
