"""inspect_model's table for identical-layer models comes from a 2-layer forward: it must equal the
table of a forward pass through every layer (names, types, shapes, parameter counts)."""
import pytest

import torchgraft
from torchgraft.tools.summary import inspect_model, summary


@pytest.mark.parametrize("name,overrides", [("gpt-tiny", {"n_layer": 5}), ("llama-tiny", {"n_layer": 4}),
                                            ("bert-tiny", {"n_layer": 4})])
@pytest.mark.parametrize("depth", [1, 2, 4])
def test_table_from_two_layers_equals_the_full_forward(name, overrides, depth):
    full = summary(torchgraft.build(name, device="meta", **overrides), depth=depth)
    rep = inspect_model(name, overrides, depth=depth)
    assert rep.summary.to_dict() == full.to_dict()
    deep = [r for r in rep.summary.rows if r.name.rpartition(".")[2] == "3"]  # a block beyond the two run
    assert all(r.output_shape is not None for r in deep) and (deep or depth == 1)
