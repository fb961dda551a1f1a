"""The module-swap pass: replacements keep names and outputs, skips are reported, options are checked."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from torchgraft.errors import ConfigError
from torchgraft.tools.converters import (SwapConverter, apply_converters, build_converter, register_converter,
                                         skip)


class DoubledLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def _as_doubled(name: str, m: nn.Module):
    if not isinstance(m, nn.Linear):
        return None
    if m.in_features < 4:
        return skip(f"in_features {m.in_features} < 4")
    new = DoubledLinear(m.in_features, m.out_features, bias=m.bias is not None)
    new.load_state_dict(m.state_dict())
    return new


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Sequential(nn.Linear(6, 3), nn.Linear(3, 2)))


def test_swap_keeps_names_and_reports_what_it_left():
    model = _model()
    names = list(model.state_dict())
    x = torch.randn(5, 8)
    h0 = model[0](x)
    (report,) = apply_converters(model, [SwapConverter("doubled", _as_doubled)])
    assert report.swapped == ["0", "2.0"]
    assert report.skipped == {"2.1": "in_features 3 < 4"}
    assert list(model.state_dict()) == names
    assert isinstance(model[2][0], DoubledLinear) and type(model[2][1]) is nn.Linear
    torch.testing.assert_close(model[0](x), 2 * h0, rtol=0, atol=0)
    assert "2 module(s) converted, 1 left (2.1: in_features 3 < 4)" in str(report)


def test_registry_builds_by_name_and_rejects_typos():
    @register_converter("test-doubled")
    def make(min_in: int = 4) -> SwapConverter:
        return SwapConverter("test-doubled", _as_doubled)

    assert build_converter("test-doubled", min_in=4).name == "test-doubled"
    with pytest.raises(ConfigError, match="test-doubled"):
        build_converter("test-doubled", min_inn=4)
    with pytest.raises(ConfigError, match="unknown converter 'nope'"):
        build_converter("nope")
