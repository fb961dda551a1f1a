"""Model declarations (ModelParts): every zoo preset declares real parts whose example inputs run
through forward, and each tool reads the declaration (declared path) or falls back to name
heuristics for a user's own module (undeclared path)."""
import pytest
import torch
from torch import nn

import torchgraft
from torchgraft.distributed.parallel import find_blocks
from torchgraft.errors import ConfigError
from torchgraft.models.heads import SequenceClassificationHead, TaskModel
from torchgraft.models.parts import ModelParts, owns, parts_of
from torchgraft.models.registry import list_models
from torchgraft.peft import apply_lora
from torchgraft.peft.variants import DoRALinear, LoRAVariant
from torchgraft.testing import assert_close_computed, tolerance
from torchgraft.tools.grow import grow
from torchgraft.tools.meta import InspectError, make_inputs
from torchgraft.tools.param_groups import layer_ids
from torchgraft.tools.summary import summary
from torchgraft.tools.transfer import plain_name, transfer

pytestmark = pytest.mark.usefixtures("one_thread")


def _names(parts: ModelParts) -> list[str]:
    return [n for n in (*parts.blocks, parts.input_layer, parts.classifier, parts.position_embedding,
                        *parts.residual_projections, *parts.vocab) if n is not None]


@pytest.mark.parametrize("name", list_models())
def test_every_preset_declares_real_parts_and_runnable_inputs(name):
    model = torchgraft.build(name, device="meta")  # any size: nothing is allocated
    parts = parts_of(model)
    assert parts is not None and parts.example_inputs is not None
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    for n in _names(parts):
        assert n in modules or n in params, f"{name}: declared part {n!r} does not exist"
    for b in parts.blocks:
        assert len(list(modules[b].parameters())) > 0
    assert parts.input_layer is not None and len(parts.blocks) == len(set(parts.blocks))
    # residual projections lie inside declared blocks
    assert all(any(owns(b, r) for b in parts.blocks) for r in parts.residual_projections)
    (x,) = parts.example_inputs(2, 8)
    assert x.shape[0] == 2 and x.device.type == "meta"
    out = model(x)
    assert out.shape[0] == 2


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny", "bert-tiny", "vit-digits", "lenet", "resnet18"])
def test_example_inputs_run_for_real(name):
    model = torchgraft.build(name)
    parts = parts_of(model)
    out = model(*parts.example_inputs(2, 8))
    assert torch.isfinite(out).all()
    if "vocab" in dir(model.config):
        assert parts.vocab
    # the declared residual projections are the ones GPT-2 init scales (std / sqrt(2 L))
    if name == "gpt-tiny":
        assert parts.residual_projections == ("blocks.0.attn.o_proj", "blocks.0.mlp.fc_out",
                                              "blocks.1.attn.o_proj", "blocks.1.mlp.fc_out")
        assert parts.vocab == ("tok_emb",) and parts.classifier is None  # tied head
    if name == "llama-tiny":
        assert parts.classifier == "lm_head" and parts.vocab == ("tok_emb", "lm_head")
        assert parts.residual_projections[1] == "blocks.0.mlp.down_proj"
    if name == "bert-tiny":
        assert not parts.zero_residual_is_identity  # post-norm


def test_task_model_prefixes_the_backbone_declaration():
    backbone = torchgraft.build("gpt-tiny")
    model = TaskModel(backbone, SequenceClassificationHead(64, 3, pooling="last"))
    parts = parts_of(model)
    assert parts.blocks[0] == "backbone.blocks.0" and parts.classifier == "head"
    assert parts.vocab == ("backbone.tok_emb",)
    assert model(*parts.example_inputs(2, 5)).shape == (2, 3)
    assert parts_of(TaskModel(nn.Linear(2, 2), nn.Identity())) is None


# ---------------------------------------------------------------------------------------------
# a user's model whose names no heuristic knows: the same module undeclared and declared

class Cell(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.mix = nn.Linear(d, d)
        self.back = nn.Linear(d, d)  # writes into the residual stream

    def forward(self, x):
        return x + self.back(torch.relu(self.mix(x)))


class Plain(nn.Module):
    def __init__(self, n_in: int = 3, classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(n_in, 8, 3, padding=1)
        self.cells = nn.ModuleList([Cell(), Cell()])
        self.readout = nn.Linear(8, classes)

    def forward(self, x):
        h = self.stem(x).mean(dim=(2, 3))  # (B, 8)
        for c in self.cells:
            h = c(h)
        return self.readout(h)


class Declared(Plain):
    def parts(self) -> ModelParts:
        return ModelParts(blocks=("cells.0", "cells.1"), input_layer="stem", classifier="readout",
                          residual_projections=("cells.0.back", "cells.1.back"),
                          example_inputs=lambda b, t: (torch.randn(b, self.stem.in_channels, 6, 6),))


def test_transfer_auto_policy_declared_vs_heuristic():
    torch.manual_seed(0)
    src = Plain(3, 4).state_dict()
    r = transfer(src, Plain(1, 5), default_policy="auto")  # `readout` is no known head name
    assert r.adapted == ["stem.weight"] and set(r.mismatched) == {"readout.weight", "readout.bias"}
    dst = Declared(1, 5)
    r = transfer(src, dst, default_policy="auto")  # declared: first conv adapted, classifier reset
    assert r.adapted == ["stem.weight"] and set(r.reset) == {"readout.weight", "readout.bias"}
    assert_close_computed(dst.stem.weight, src["stem.weight"].sum(1, keepdim=True), tolerance(reduction=3))


def test_grow_declared_vs_heuristic():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(ConfigError, match="deepen"):
        grow(Plain(), depth=1)  # `back`/`mix` are not known branch or projection names
    big, report = grow(Declared(), depth=2, example_inputs=x)
    assert len(big.cells) == 4 and report.max_abs_diff == 0.0
    with pytest.raises(ConfigError, match="deepen"):  # post-norm BERT declares it cannot
        grow(torchgraft.build("bert-tiny"), depth=1)


def test_find_blocks_and_layer_decay_declared_vs_heuristic():
    assert find_blocks(Plain()) == []  # a ModuleList named `cells` is not a known block list
    assert [n for n, _ in find_blocks(Declared())] == ["cells.0", "cells.1"]

    class Named(Declared):  # blocks with no number in their names
        def __init__(self):
            super().__init__()
            self.first, self.second = self.cells[0], self.cells[1]
            del self.cells

        def forward(self, x):
            return self.readout(self.second(self.first(self.stem(x).mean(dim=(2, 3)))))

        def parts(self):
            return ModelParts(blocks=("first", "second"), input_layer="stem", classifier="readout")

    class PlainNamed(Named):
        parts = None

    ids, n = layer_ids(Named())
    assert n == 2 and ids["stem.weight"] == 0 and ids["first.mix.weight"] == 1
    assert ids["second.back.bias"] == 2 and ids["readout.weight"] == 3
    ids, n = layer_ids(PlainNamed())
    assert n == 0 and set(ids.values()) == {0}


def test_summary_uses_declared_example_inputs():
    assert summary(Plain()).output_shape is None  # nothing to guess an input from: parameters only
    s = summary(Declared(), batch=2)
    assert s.output_shape == [2, 4] and s.parameters == sum(p.numel() for p in Declared().parameters())
    with pytest.raises(InspectError, match="cannot guess an input"):
        make_inputs(Plain())


def test_peft_registers_its_names_and_dora_is_a_variant():
    assert plain_name("blocks.0.attn.q_proj.base_layer.weight") == "blocks.0.attn.q_proj.weight"
    assert plain_name("blocks.0.attn.q_proj.weight") is None
    model = torchgraft.build("gpt-tiny")
    layers = apply_lora(model, ["q_proj"], rank=2, dora=True)
    assert all(isinstance(l.variant, DoRALinear) and l.use_dora for l in layers.values())
    layers = apply_lora(torchgraft.build("gpt-tiny"), ["v_proj"], rank=2)
    assert all(type(l.variant) is LoRAVariant and not l.use_dora for l in layers.values())


def test_docs_family_example():
    """docs/models.md "How to add a model family" runs as written (then unregisters itself)."""
    import re
    from pathlib import Path

    from torchgraft.models import registry

    text = Path(__file__).parent.parent.joinpath("docs/models.md").read_text()
    section = text.split("## How to add a model family", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    try:
        exec(compile(code, "docs/models.md", "exec"), scope)
        model, report = scope["model"], scope["report"]
        assert model.head.out_features == 3 and report.max_abs_diff == 0.0
        assert len(scope["bigger"].blocks) == 4
        assert [n for n, _ in find_blocks(model)] == ["blocks.0", "blocks.1"]
    finally:
        registry._PRESETS.pop("tiny-encoder-s", None)
        registry._FAMILIES.pop("tiny-encoder", None)
