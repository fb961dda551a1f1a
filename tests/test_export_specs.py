"""Export specs (torchgraft/interop/export_spec.py): a new input kind is a new class plus a registration,
and exports, checks and runs in onnxruntime without an edit of `export`; the text-pair kind puts
`token_type_ids` in the graph; choosing a kind by name and the errors for a wrong one."""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import torchgraft  # noqa: E402
from torchgraft.errors import ConfigError  # noqa: E402
from torchgraft.interop.export import (EXPORT_SPECS, ExportSpec, build_spec, eager_module,  # noqa: E402
                                       max_abs_diff, ort_session, read_metadata, register_export_spec,
                                       run_exported)
from torchgraft.testing import model_tol, tolerance  # noqa: E402


# ---- a toy input kind, registered here ---------------------------------------------------------------
class Keyword(nn.Module):
    """An audio classifier: `forward(waveform (B, T))` -> logits (B, 3), any length T."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(1, 8, kernel_size=5, padding=2)
        self.fc = nn.Linear(8, 3)
        self.sample_rate = 16_000

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(waveform[:, None]))  # (B, 8, T)
        return self.fc(h.mean(-1))  # (B, 3)


class WaveformSpec(ExportSpec):
    """`waveform` (batch, samples): dynamic batch and length (the `seq` axis the user asks for)."""

    name = "waveform"

    def __init__(self, model, example, axes):
        super().__init__(model, example, axes)
        self.inputs, self.input_names = (example[0],), ["waveform"]
        self.dynamic_axes = {"waveform": {**({0: "batch"} if "batch" in axes else {}),
                                          **({1: "samples"} if "seq" in axes else {})}}

    @classmethod
    def accepts(cls, model, example):
        return hasattr(model, "sample_rate") and example[0].dim() == 2 and example[0].dtype.is_floating_point

    @classmethod
    def default_example(cls, model):
        return (torch.randn(2, 400, generator=torch.Generator().manual_seed(0)),)

    def more_examples(self):
        """Longer along each dynamic axis: one more clip, twice the samples + 7."""
        (b, t), axes = self.inputs[0].shape, self.dynamic_axes["waveform"]
        shape = (b + 1 if 0 in axes else b, t * 2 + 7 if 1 in axes else t)
        return [(torch.randn(shape, generator=torch.Generator().manual_seed(1)),)]

    def metadata(self):
        return {**super().metadata(), "sample_rate": self.model.sample_rate}


@pytest.fixture
def waveform_spec(monkeypatch):
    monkeypatch.setitem(EXPORT_SPECS, WaveformSpec.name, WaveformSpec)  # removed again after the test
    return WaveformSpec


def _bound(module, inputs, reduction: int, depth: int) -> float:
    with torch.no_grad():
        out = module(*inputs)
    return tolerance(reduction, depth) * float(out.abs().max())


def test_a_registered_input_kind_exports_checks_and_runs(tmp_path, one_thread, waveform_spec):
    model = Keyword().eval()
    path = tmp_path / "kws.onnx"
    x = torch.randn(2, 400, generator=torch.Generator().manual_seed(0))
    res = torchgraft.export(model, x, format="onnx", path=path, check=True)  # chosen by accepts(), before the built-ins
    assert res.spec == "waveform" and res.kind == "logits"
    assert res.input_names == ["waveform"] and res.dynamic_axes == {"waveform": {0: "batch", 1: "samples"}}
    assert res.checked_shapes == [[(2, 400)], [(3, 807)]]  # its example and its more_examples
    # the longest sum is the mean over the longest clip (807 samples), three layers deep
    assert res.max_abs_diff <= _bound(model, (torch.randn(3, 807),), 807, 3)
    import onnx

    dims = [d.dim_param for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "samples"]
    meta = read_metadata(path)
    assert meta["spec"] == "waveform" and meta["sample_rate"] == 16_000 and meta["inputs"] == ["waveform"]
    x = torch.randn(5, 1234, generator=torch.Generator().manual_seed(2))  # a size neither example had
    (got,) = run_exported(path, (x,))
    with torch.no_grad():
        want = model(x)
    assert (got - want).abs().max() <= _bound(model, (x,), 1234, 3)
    assert not torch.allclose(want[0], want[1])  # the rows differ: the comparison is not vacuous


def test_a_registered_kind_is_chosen_by_name_and_its_axes_follow_dynamic(tmp_path, one_thread, waveform_spec):
    class Plain(Keyword):  # no sample_rate: the toy spec does not claim it by itself
        def __init__(self):
            super().__init__()
            del self.sample_rate

    plain = Plain().eval()
    x = torch.randn(2, 300, generator=torch.Generator().manual_seed(3))
    assert build_spec(Keyword(), x).name == "waveform"
    auto = build_spec(plain, x)
    assert auto.name == "tensors" and auto.input_names == ["input_0"]
    model = Keyword().eval()
    res = torchgraft.export(model, format="pt2", path=tmp_path / "named.pt2", spec=WaveformSpec,
                            dynamic="batch", check=True)  # no example: the spec's default_example
    assert res.spec == "waveform" and res.dynamic_axes == {"waveform": {0: "batch"}}
    assert res.checked_shapes == [[(2, 400)], [(3, 400)]]  # more_examples follows the axes asked for
    assert res.max_abs_diff <= _bound(model, (torch.randn(3, 400),), 400, 3)
    prog = torch.export.load(str(tmp_path / "named.pt2")).module()
    assert prog(torch.randn(5, 400)).shape == (5, 3)  # batch stays dynamic
    with pytest.raises(Exception, match="400"):  # the length is fixed to the example's now
        prog(torch.randn(2, 401))


def test_a_new_kind_is_asked_before_the_built_ins_whatever_the_import_order():
    builtins = dict(EXPORT_SPECS)
    EXPORT_SPECS.clear()
    EXPORT_SPECS[WaveformSpec.name] = WaveformSpec  # registered before the built-ins were imported
    EXPORT_SPECS.update(builtins)
    try:
        assert build_spec(Keyword(), torch.randn(2, 50)).name == "waveform"
        assert build_spec(torchgraft.build("lenet")).name == "image"  # not claimed by the toy: unchanged
    finally:
        EXPORT_SPECS.clear()
        EXPORT_SPECS.update(builtins)


# ---- text pairs ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    return torchgraft.build("bert-tiny", vocab_size=64, task="sequence_classification", num_labels=3).eval()


def _bert_bound(bert, seq_len: int) -> float:
    """The derived fp32 bound (torchgraft.testing) times the size of the classifier's logits."""
    ids = torch.randint(0, 64, (3, seq_len), generator=torch.Generator().manual_seed(seq_len))
    with torch.no_grad():
        scale = float(bert(ids).abs().max())
    return model_tol(bert, seq_len) * max(scale, 1.0)


def test_text_pair_exports_token_type_ids(bert, tmp_path, one_thread):
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "pair.onnx"
    res = torchgraft.export(bert, (ids,), format="onnx", path=path, spec="text-pair", check=True)
    assert res.spec == "text-pair" and res.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    assert res.checked_shapes == [[(2, 10)], [(3, 13)]]
    assert res.max_abs_diff <= _bert_bound(bert, 13)
    module = eager_module(bert, res.kind, res.input_names)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a padded row
    first, second = torch.zeros_like(ids), (torch.arange(10) >= 4).long().expand(2, -1).contiguous()
    outs, sess = [], ort_session(path)
    for types in (first, second):
        diff = max_abs_diff(path, module, (ids, mask, types), sess)
        assert diff <= _bert_bound(bert, 10)
        outs.append(run_exported(path, (ids, mask, types), sess)[0])
    assert (outs[0] - outs[1]).abs().max() > 1e-3  # the types reach the logits: the input is live
    with torch.no_grad():
        want = bert(ids, attention_mask=mask, token_type_ids=second)
    assert (outs[1] - want).abs().max() <= _bert_bound(bert, 10)


def test_three_token_tensors_choose_text_pair(bert):
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    pair = build_spec(bert, (ids, torch.ones_like(ids), torch.zeros_like(ids)))
    assert pair.name == "text-pair" and pair.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    plain = build_spec(bert, (ids,))
    assert plain.name == "tokens" and plain.input_names == ["input_ids", "attention_mask"]  # as before
    assert build_spec(torchgraft.build("lenet")).name == "image"
    assert build_spec(bert, (ids, ids)).input_names == ["input_ids", "input_1"]  # two: not a pair


# ---- errors ----------------------------------------------------------------------------------------
def test_wrong_spec_choices_are_one_line(tmp_path):
    gpt = torchgraft.build("gpt-tiny")
    with pytest.raises(ConfigError, match="takes no token_type_ids; the text-pair spec is for BERT"):
        torchgraft.export(gpt, format="pt2", path=tmp_path / "x.pt2", spec="text-pair")
    with pytest.raises(ConfigError, match="unknown export spec 'audio'; use one of decode-step, image, "):
        torchgraft.export(gpt, format="pt2", path=tmp_path / "x.pt2", spec="audio")
    with pytest.raises(ConfigError, match="cannot be combined with spec='tokens'"):
        torchgraft.export(gpt, format="pt2", path=tmp_path / "x.pt2", spec="tokens", kv_cache=True)
    with pytest.raises(ConfigError, match="not a decoder LM"):
        torchgraft.export(torchgraft.build("lenet"), format="pt2", path=tmp_path / "x.pt2", spec="decode-step")
    assert not list(tmp_path.iterdir())  # nothing written


def test_registering_a_taken_name_is_refused():
    class Other(WaveformSpec):
        name = "image"

    with pytest.raises(ConfigError, match="'image' is already registered"):
        register_export_spec(Other)
    image = EXPORT_SPECS["image"]
    before = dict(EXPORT_SPECS)
    assert register_export_spec(image) is image and EXPORT_SPECS == before  # the same class again: a no-op

    class Nameless(ExportSpec):
        pass

    with pytest.raises(ConfigError, match="Nameless needs a `name`"):
        register_export_spec(Nameless)


def test_cli_spec_option(tmp_path, capsys, one_thread):
    from torchgraft.cli import main
    from torchgraft.interop.hf import save_hf

    hf = tmp_path / "hf_bert"
    save_hf(torchgraft.build("bert-tiny", vocab_size=64), hf)

    def run(*argv):
        try:
            main(list(argv))
            code = 0
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return code, out.out, out.err

    out = tmp_path / "pair.onnx"
    code, stdout, err = run("export", str(hf), "--out", str(out), "--spec", "text-pair", "--check")
    assert code == 0, err
    assert "inputs input_ids[0:batch, 1:seq], attention_mask[0:batch, 1:seq], token_type_ids[0:batch, 1:seq]" in stdout
    assert "check (onnxruntime, inputs (2, 8), (3, 11))" in stdout
    assert read_metadata(out)["spec"] == "text-pair"
    code, _, err = run("export", str(hf), "--out", str(tmp_path / "x.onnx"), "--spec", "audio")
    assert code == 2 and err.startswith("error: unknown export spec 'audio'") and err.count("\n") == 1


def test_check_export_after_the_fact(tmp_path, one_thread):
    from torchgraft.interop.export import check_export

    m = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3)).eval()
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    res = torchgraft.export(m, x, format="pt2", path=tmp_path / "m.pt2")
    assert res.max_abs_diff is None and res.spec == "tensors"
    bigger = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    check_export(res, m, [(x,), (bigger,)])
    with torch.no_grad():
        scale = float(m(bigger).abs().max())
    assert res.checked_shapes == [[(2, 6)], [(5, 6)]] and res.max_abs_diff <= model_tol(m) * scale
