"""summary(): module table with output shapes, parameter counts, depth control, bytes per dtype."""
import pytest
import torch
from torch import nn

import torchgraft
from torchgraft.errors import TorchgraftError
from torchgraft.tools.summary import InspectError, summary


def test_lenet_shapes_and_parameter_counts():
    s = summary(torchgraft.build("lenet"))  # input 1x32x32 made up from the config
    rows = {r.name: r for r in s.rows}
    assert rows["conv1"].output_shape == [1, 20, 28, 28]
    assert rows["conv2"].output_shape == [1, 64, 10, 10]
    assert rows["fc1"].output_shape == [1, 1024]
    assert rows["fc2"].output_shape == [1, 10]
    expected = {"conv1": 1 * 20 * 25 + 20, "conv2": 20 * 64 * 25 + 64, "fc1": 64 * 5 * 5 * 1024 + 1024,
                "fc2": 1024 * 10 + 10}
    assert {k: rows[k].parameters for k in expected} == expected
    assert s.parameters == sum(expected.values()) == 1_682_258
    assert s.trainable_parameters == s.parameters
    assert s.param_bytes == {"float32": 4 * 1_682_258}
    assert s.output_shape == [1, 10]


class UserNet(nn.Module):
    """Not a zoo model: nested containers, a frozen part, a bf16 parameter, a buffer, two outputs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 3)
        self.aux = nn.Linear(16, 2).to(torch.bfloat16)
        self.register_buffer("scale", torch.ones(16))
        for p in self.stem[0].parameters():
            p.requires_grad_(False)

    def forward(self, x):
        h = self.stem(x) * self.scale  # (B, 16)
        return self.head(h), self.aux(h.to(torch.bfloat16))


def test_user_module_depth_trainable_and_dtypes():
    model = UserNet()
    s = summary(model, input_size=(5, 8), depth=2)
    rows = {r.name: r for r in s.rows}
    assert rows["stem"].output_shape == [5, 16] and rows["stem.0"].output_shape == [5, 16]
    assert rows["head"].output_shape == [5, 3]
    assert s.output_shape == [[5, 3], [5, 2]]
    assert rows["stem"].parameters == 8 * 16 + 16 + 16 * 16 + 16
    assert rows["stem"].trainable == 16 * 16 + 16  # stem.0 is frozen
    assert s.parameters == 144 + 272 + 51 + 34
    assert s.trainable_parameters == s.parameters - 144
    assert s.param_bytes == {"float32": 4 * (144 + 272 + 51), "bfloat16": 2 * 34}
    assert s.buffer_bytes == {"float32": 64}
    assert max(r.depth for r in s.rows) == 2
    shallow = summary(model, input_size=(5, 8), depth=1)
    assert [r.name for r in shallow.rows if r.depth > 0] == ["stem", "head", "aux"]
    d = s.to_dict()
    assert d["parameters"] == s.parameters and d["modules"][0]["name"] == "stem"
    text = str(s)
    assert "stem" in text and "Linear" in text and "(5, 16)" in text


def test_real_input_and_meta_model_give_the_same_table():
    real = summary(UserNet(), torch.randn(2, 8))
    with torch.device("meta"):
        meta_model = UserNet()
    meta = summary(meta_model, input_size=(2, 8))
    assert [r.to_dict() for r in real.rows] == [r.to_dict() for r in meta.rows]


class PlainTensorNet(nn.Module):
    """Keeps an unregistered tensor: the meta pass fails, the fake-tensor fallback must work."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.offset = torch.ones(4)  # not a buffer

    def forward(self, x):
        return self.fc(x) + self.offset


def test_plain_tensor_attributes_fall_back_to_fake_tensors():
    s = summary(PlainTensorNet(), input_size=(3, 4))
    assert s.output_shape == [3, 4] and s.parameters == 20


def test_gpt2_on_meta_collapses_repeated_blocks():
    model = torchgraft.build("gpt2", device="meta")
    s = summary(model, depth=2, seq_len=16)
    assert s.parameters == 124_439_808
    assert {r.name: r.output_shape for r in s.rows}["blocks.11"] == [1, 16, 768]
    assert "0..11 (x12)" in str(s)


def test_no_input_gives_parameters_without_shapes():
    s = summary(nn.Sequential(nn.Linear(3, 4)))
    assert s.parameters == 16 and all(r.output_shape is None for r in s.rows)


def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(TorchgraftError, match="input_size"):
        summary(UserNet(), input_size=("a", "b"))
    with pytest.raises(InspectError, match="UserNet.forward failed"):
        summary(UserNet(), input_size=(2, 7))  # wrong feature size
    with pytest.raises(InspectError, match="nn.Module"):
        summary("gpt2")


def test_top_level_sequential_of_identical_blocks_collapses():
    model = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(5)], nn.Linear(4, 2))
    s = summary(model, input_size=(1, 4), depth=2)
    text = str(s)
    assert "0..4 (x5)" in text and text.count("ReLU") == 1  # children shown once, for the first block
    assert {r.name: r.output_shape for r in s.rows}["5"] == [1, 2]
