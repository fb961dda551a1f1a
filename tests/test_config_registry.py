import pytest
import torch

import torchgraft
from torchgraft.config import apply_overrides, from_dict, parse_overrides
from torchgraft.errors import ConfigError
from torchgraft.models.lenet import LeNetConfig


def test_lenet_shapes_and_param_count():
    model = torchgraft.build("lenet")
    assert sum(p.numel() for p in model.parameters()) == 1_682_258
    out = model(torch.randn(3, 1, 32, 32))
    assert out.shape == (3, 10)
    assert torchgraft.build("lenet", num_classes=5)(torch.randn(2, 1, 32, 32)).shape == (2, 5)


def test_list_models_contains_lenet():
    assert "lenet" in torchgraft.list_models()


def test_unknown_model_suggests_close_name():
    with pytest.raises(ConfigError, match="did you mean 'lenet'"):
        torchgraft.build("lenett")


def test_unknown_key_and_wrong_type_are_named():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.num_clases'.*num_classes"):
        torchgraft.build("lenet", num_clases=3)
    with pytest.raises(ConfigError, match=r"model.num_classes: expected an integer"):
        torchgraft.build("lenet", num_classes="ten")


def test_dotted_overrides_parse_yaml_values():
    ov = parse_overrides(["model.n_layer=4", "trainer.compile=true", "optim.lr=3e-4", "data.name=digits"])
    assert ov == {"model.n_layer": 4, "trainer.compile": True, "optim.lr": 3e-4, "data.name": "digits"}
    tree = apply_overrides({"model": {"name": "lenet"}}, ov)
    assert tree["model"] == {"name": "lenet", "n_layer": 4}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["oops"])


def test_from_dict_converts_lists_to_tuples():
    cfg = from_dict(LeNetConfig, {"conv_channels": [8, 16]})
    assert cfg.conv_channels == (8, 16)


def test_yaml_build(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("model:\n  name: lenet\n  num_classes: 4\n")
    model = torchgraft.build(str(p))
    assert model.fc2.out_features == 4
    assert model.model_name == "lenet"


def test_meta_build_then_materialize_matches_seeded_build():
    meta = torchgraft.build("lenet", device="meta")
    assert all(p.is_meta for p in meta.parameters())
    torch.manual_seed(1)
    a = torchgraft.materialize(meta, "cpu")
    torch.manual_seed(1)
    b = torchgraft.build("lenet")
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=n)
