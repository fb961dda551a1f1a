"""torchgraft.nn.Embedding: nn.Embedding whose compiled weight gradient is ATen's kernel."""
import pytest
import torch

from torchgraft.nn.embedding import Embedding, embedding_backward

pytestmark = pytest.mark.numeric  # float comparisons: re-run under a forced CPU capability (docs/testing.md)


def test_layer_is_an_nn_embedding_with_the_same_state_dict():
    ours, plain = Embedding(11, 4, padding_idx=2), torch.nn.Embedding(11, 4, padding_idx=2)
    plain.load_state_dict(ours.state_dict())
    ids = torch.tensor([[0, 2, 5], [10, 2, 1]])
    assert isinstance(ours, torch.nn.Embedding) and repr(ours) == repr(plain)
    assert torch.equal(ours(ids), plain(ids))  # a lookup


def test_backward_op_passes_the_custom_op_checks():
    grad, ids = torch.randn(2, 5, 3), torch.randint(0, 7, (2, 5))
    torch.library.opcheck(embedding_backward, (grad, ids, 7, -1))
    assert torch.equal(embedding_backward(grad, ids, 7, 1),  # the same ATen kernel
                       torch.ops.aten.embedding_dense_backward(grad, ids, 7, 1, False))


@pytest.mark.parametrize("padding_idx", [None, 3])
def test_compiled_gradients_equal_eager_nn_embedding(padding_idx):
    torch.manual_seed(0)
    ours = Embedding(20, 8, padding_idx=padding_idx)
    plain = torch.nn.Embedding(20, 8, padding_idx=padding_idx)
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
