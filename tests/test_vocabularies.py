"""One vocabulary each for precision (torchgraft.precision) and activation-checkpointing modes
(torchgraft.activation_checkpointing): the trainer, parallelize and the memory estimate read the same
table, and the transformer formulas read model sizes through `transformer_shape`."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torchgraft
from torchgraft.activation_checkpointing import ACMode, parse_ac
from torchgraft.errors import ConfigError
from torchgraft.models.shape import transformer_shape
from torchgraft.precision import NAMES, precision
from torchgraft.tools.memory import estimate_memory


@pytest.mark.parametrize("name, param, compute, reduce", [
    ("fp32", torch.float32, torch.float32, torch.float32), ("none", torch.float32, torch.float32, torch.float32),
    ("bf16", torch.float32, torch.bfloat16, torch.float32), ("bf16-mixed", torch.float32, torch.bfloat16, torch.float32),
    ("fp16", torch.float32, torch.float16, torch.float32), ("FP16-Mixed", torch.float32, torch.float16, torch.float32),
    ("bf16-true", torch.bfloat16, torch.bfloat16, torch.bfloat16),
    ("fp16-true", torch.float16, torch.float16, torch.float16)])
def test_precision_table(name, param, compute, reduce):
    p = precision(name)
    assert (p.param, p.compute, p.reduce) == (param, compute, reduce)
    assert p.mixed == (param != compute)
    assert p.needs_grad_scaler == (compute == torch.float16)


def test_unknown_precision_names_the_key_and_the_closest_name():
    with pytest.raises(ConfigError, match=r"trainer.precision='bf61' is not a precision \(did you mean 'bf16'"):
        precision("bf61", "trainer.precision")


def test_trainer_parallelize_and_memory_read_the_same_table():
    from torchgraft.distributed.parallel import _mp_dtype
    from torchgraft.train.precision import autocast, make_grad_scaler

    cpu = torch.device("cpu")
    for name in ("fp32", "bf16", "fp16"):  # trainer.precision's names
        with autocast(name, cpu):
            got = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32
        assert got == precision(name).compute
        assert (make_grad_scaler(name, cpu) is not None) == (name == "fp16")
        assert _mp_dtype(name) == (precision(name).compute if precision(name).mixed else None)
    with pytest.raises(ConfigError, match="would store the weights in 16 bits"):
        _mp_dtype("bf16-true")  # FSDP keeps fp32 master weights
    # the memory estimate: a name and its alias give the same bytes; bytes come from the dtypes
    mlp = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    n = sum(p.numel() for p in mlp.parameters())
    for a, b in (("bf16", "bf16-mixed"), ("fp16", "fp16-mixed"), ("fp32", "float32")):
        ea, eb = (estimate_memory(mlp, input_size=(4, 10), precision=p) for p in (a, b))
        assert ea.to_dict() == eb.to_dict()
    fp16 = estimate_memory(mlp, input_size=(4, 10), precision="fp16-true")
    assert (fp16.weights, fp16.gradients, fp16.optimizer) == (2 * n, 2 * n, 2 * 2 * n)
    assert set(NAMES) >= {"fp32", "bf16", "fp16", "bf16-true", "fp16-true", "bf16-mixed", "fp16-mixed"}


@pytest.mark.parametrize("value, mode", [
    (None, ACMode()), (False, ACMode()), ("none", ACMode()), ("off", ACMode()), (0, ACMode()), ("0", ACMode()),
    (True, ACMode(1)), ("full", ACMode(1)), ("ALL", ACMode(1)), (1, ACMode(1)), (3, ACMode(3)), (" 3 ", ACMode(3)),
    ("selective", ACMode(1, selective=True))])
def test_activation_checkpointing_modes(value, mode):
    assert parse_ac(value) == mode


@pytest.mark.parametrize("value", ["sometimes", -1, 1.5, "2x"])
def test_bad_activation_checkpointing_is_one_line_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"^distributed.activation_checkpointing=.* is not valid; use none, full"):
        parse_ac(value, "distributed.activation_checkpointing")


def test_checkpointed_blocks_are_the_same_for_parallelize_and_the_estimate():
    from torchgraft.distributed.parallel import apply_activation_checkpointing

    assert list(parse_ac(2).checkpointed(5)) == [0, 2, 4] and list(parse_ac("none").checkpointed(5)) == []
    model = torchgraft.build("gpt-tiny", device="meta", n_layer=5)
    assert apply_activation_checkpointing(model, "2") == ["blocks.0", "blocks.2", "blocks.4"]
    meta = torchgraft.build("gpt-tiny", device="meta", n_layer=5)
    by_word, by_number = (estimate_memory(meta, batch=2, activation_checkpointing=v) for v in ("full", True))
    assert by_word.activations == by_number.activations
    every2 = estimate_memory(meta, batch=2, activation_checkpointing="2")
    assert every2.activations == estimate_memory(meta, batch=2, activation_checkpointing=2).activations
    assert by_word.activations < every2.activations < estimate_memory(meta, batch=2).activations


def test_transformer_shape_resolves_the_optional_sizes():
    llama = torchgraft.get_config("llama-tiny")
    s = transformer_shape(llama)
    head = llama.head_dim or llama.n_embd // llama.n_head
    assert (s.n_layer, s.n_embd, s.q_width, s.kv_width, s.intermediate_size) == (
        llama.n_layer, llama.n_embd, llama.n_head * head, (llama.n_kv_head or llama.n_head) * head,
        llama.intermediate_size)
    gpt = transformer_shape(torchgraft.get_config("gpt-tiny", intermediate_size=None, n_kv_head=None))
    assert gpt.intermediate_size == 4 * gpt.n_embd and gpt.n_kv_head == gpt.n_head
    assert transformer_shape(torchgraft.get_config("lenet")) is None and transformer_shape(None) is None
