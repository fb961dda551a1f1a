"""Knowledge distillation: the divergences against torch / TRL references, the chunked loss equals the
full-logits loss (values and gradients), the `distill` task on real teachers (run dir, HF dir), bad
options, resume, and the `configs/distill-*.yaml` through the fine-tune recipe."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from torchgraft.errors import ConfigError
from torchgraft.nn.kd_loss import DIVERGENCES, chunked_distill_loss, distill_loss, divergence
from torchgraft.train.tasks import build_task
from torchgraft.testing import assert_close_computed, model_tol, tolerance

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
        "Pack my box with five dozen liquor jugs. ") * 40


def _logits(n=23, v=31, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * 2.0, torch.randn(n, v, generator=g) * 2.0


# ---- the divergences -------------------------------------------------------------------------------
@pytest.mark.numeric
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_divergences_equal_torch_kl_div(temperature):
    s, t = _logits()
    ls, lt = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    fwd = F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)  # KL(teacher || student)
    rev = F.kl_div(lt, ls, log_target=True, reduction="none").sum(-1)  # KL(student || teacher)
    # fp32 sums of V=31 terms after a log-softmax; each term is p * (log p - log q), at most
    # max |log p - log q| in size, so that bounds the sums' rounding
    tol, scale = tolerance(31, depth=2), float((ls - lt).abs().max())
    assert_close_computed(divergence(s, t, "forward_kl", temperature), fwd, tol, scale=scale)
    assert_close_computed(divergence(s, t, "reverse_kl", temperature), rev, tol, scale=scale)
    assert_close_computed(divergence(s, t, "symmetric", temperature), (fwd + rev) / 2, tol, scale=scale)
    assert (fwd > 0).all() and not torch.allclose(fwd, rev)


@pytest.mark.numeric
def test_jsd_and_kls_equal_trl_gkd_generalized_jsd():
    """TRL's GKD loss: beta=0 is our forward KL, beta=1 reverse KL, beta=0.5 our `jsd`
    (reduction "sum" over unmasked tokens, the sum our task returns)."""
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer").GKDTrainer.generalized_jsd_loss
    s, t = _logits(n=2 * 9, v=17, seed=3)
    labels = torch.randint(0, 17, (2, 9))
    labels[0, :3] = -100
    for kind, beta in (("forward_kl", 0.0), ("reverse_kl", 1.0), ("jsd", 0.5)):
        ref = gkd(s.view(2, 9, 17), t.view(2, 9, 17), labels=labels, beta=beta, temperature=1.7, reduction="sum")
        ours = distill_loss(s, t, labels, kind=kind, temperature=1.7, alpha=1.0)
        # a sum over 18 tokens of 17-term sums after a log-softmax
        assert_close_computed(ours.kd, ref, tolerance(18 * 17, depth=2))


@pytest.mark.numeric
def test_mix_is_hard_ce_plus_t2_scaled_kd():
    s, t = _logits()
    y = torch.randint(0, 31, (23,))
    y[:4] = -100
    out = distill_loss(s, t, y, kind="forward_kl", temperature=2.0, alpha=0.3)
    ce = F.cross_entropy(s, y, ignore_index=-100, reduction="sum")
    kd = divergence(s[4:], t[4:], "forward_kl", 2.0).sum()
    torch.testing.assert_close(out.ce, ce)
    torch.testing.assert_close(out.kd, kd)
    torch.testing.assert_close(out.loss, 0.7 * ce + 0.3 * 4.0 * kd)
    assert int(out.count) == 19
    # identical distributions: no divergence left, the loss is the hard part only
    same = distill_loss(s, s.clone(), y, kind="jsd", alpha=0.5)
    assert abs(float(same.kd)) < 1e-5 * 23


@pytest.mark.numeric
@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunked_equals_full_logits_loss_and_grads(kind, chunk):
    torch.manual_seed(0)
    b, t, c, ct, v = 2, 13, 12, 20, 41
    h0, w0 = torch.randn(b, t, c), torch.randn(v, c) * 0.3
    th, tw = torch.randn(b, t, ct), torch.randn(v, ct) * 0.3
    y = torch.randint(0, v, (b, t))
    y[0, :4] = -100
    results = []
    for chunked in (False, True):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        if chunked:
            out = chunked_distill_loss(h, w, th, tw, y, chunk, kind=kind, temperature=1.5, alpha=0.4)
        else:
            out = distill_loss(F.linear(h, w), F.linear(th, tw), y, kind=kind, temperature=1.5, alpha=0.4)
        (out.loss * 1.3).backward()  # a non-unit upstream gradient
        results.append((out.loss.detach(), out.kd, out.ce, h.grad, w.grad))
    # fp32 everywhere; the projection, a 41-term softmax and KL, and backward through both; the
    # loss and the weight gradient also sum over the 26 rows
    for a, b_ in zip(*results):
        assert_close_computed(a, b_, tolerance(b * t * v, depth=4))


@pytest.mark.numeric
def test_chunked_under_bf16_autocast_matches_full_logits():
    """Under autocast both paths project in bf16 and take the softmaxes in float32; they differ only
    by where bf16 rounding falls (the gradient's cast), so bf16-level tolerances (8 mantissa bits)."""
    torch.manual_seed(2)
    h0, w0 = torch.randn(40, 32), torch.randn(300, 32) * 0.1
    th, tw = torch.randn(40, 24), torch.randn(300, 24) * 0.1
    y = torch.randint(0, 300, (40,))
    out = []
    for chunked in (False, True):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if chunked:
                loss = chunked_distill_loss(h, w, th, tw, y, 16, kind="jsd", temperature=2.0).loss
            else:
                loss = distill_loss(F.linear(h, w), F.linear(th, tw), y, kind="jsd", temperature=2.0).loss
        loss.backward()
        out.append((loss.detach(), h.grad, w.grad))
    (l1, gh1, gw1), (l2, gh2, gw2) = out
    torch.testing.assert_close(l1, l2, rtol=1e-3, atol=0)
    torch.testing.assert_close(gh1, gh2, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(gw1, gw2, rtol=2e-2, atol=2e-3)


# ---- the task on real models -----------------------------------------------------------------------
def _cfg(tmp_path: Path, n_layer: int, steps: int, task=None, every: int = 2) -> dict:
    src = tmp_path / "corpus.txt"
    if not src.exists():
        src.write_text(TEXT)
    cfg = {"model": {"family": "llama", "n_layer": n_layer, "n_head": 2, "n_kv_head": 1, "n_embd": 32,
                     "intermediate_size": 64, "block_size": 32, "tie_embeddings": True},
           "data": {"name": "text", "source": str(src), "tokenizer": "char", "seq_len": 32,
                    "val_fraction": 0.2, "cache_dir": str(tmp_path / "cache"), "progress": False},
           "optim": {"name": "adamw", "lr": 3e-3},
           "trainer": {"max_steps": steps, "batch_size": 4, "seed": 0},
           "eval": {"every": every, "max_batches": 2},
           "checkpoint": {"every": every, "keep_last": 2},
           "logging": {"every": 1, "progress": False, "tensorboard": False, "measure_flops": False}}
    if task is not None:
        cfg["task"] = task
    return cfg


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from torchgraft.recipes.training import run_training

    tmp = tmp_path_factory.mktemp("teacher")
    run_training(_cfg(tmp, 2, 6), tmp / "run")
    return tmp


def _batch(tmp: Path):
    from torchgraft.data import build_data

    bundle = build_data(_cfg(tmp, 1, 1)["data"])
    b = bundle.train.get_batch(torch.arange(3))
    b["labels"][0, :5] = -100
    return b, bundle.info["tokenizer"].vocab_size


@pytest.mark.numeric
def test_task_loss_is_the_loss_of_teacher_and_student_logits(teacher_dir):
    from torchgraft.models.registry import build
    from torchgraft import load_model

    batch, vocab = _batch(teacher_dir)
    task = build_task({"name": "distill", "teacher": str(teacher_dir / "run"), "loss": "reverse_kl",
                       "temperature": 2.0, "alpha": 0.25})
    assert all(not p.requires_grad for p in task.teacher.parameters()) and not task.teacher.training
    student = build({"family": "llama", "n_layer": 1, "n_head": 2, "n_kv_head": 1, "n_embd": 32,
                     "intermediate_size": 64, "block_size": 32, "vocab_size": vocab})
    teacher = load_model(teacher_dir / "run").eval()
    with torch.no_grad():
        ref = distill_loss(student(batch["input_ids"]), teacher(batch["input_ids"]), batch["labels"],
                           kind="reverse_kl", temperature=2.0, alpha=0.25)
    loss = task.loss_sum(student, batch)
    # the same models and ops in another order (the task's forward vs two calls): a 1-layer llama
    # (width 64) and a loss summed over the batch's tokens
    assert_close_computed(loss.detach(), ref.loss, tolerance(batch["labels"].numel() * vocab, depth=3))
    assert int(task.count(batch)) == int(ref.count)
    loss.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in task.teacher.parameters())
    sums = {k: float(v) for k, v in task.eval_sums(student, batch).items()}
    m = task.metrics(sums)
    tol = tolerance(batch["labels"].numel() * vocab, depth=3)
    assert_close_computed(torch.tensor(m["val_loss"]), ref.ce / ref.count, tol)
    assert_close_computed(torch.tensor(m["val_kl"]), ref.kd / ref.count, tol)


@pytest.mark.numeric
def test_task_chunked_equals_unchunked(teacher_dir):
    from torchgraft.models.registry import build

    batch, vocab = _batch(teacher_dir)
    grads = []
    for chunk in (None, 16):
        torch.manual_seed(1)
        student = build({"family": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32,
                         "vocab_size": vocab})
        task = build_task({"name": "distill", "teacher": str(teacher_dir / "run"), "chunked_ce": chunk})
        loss = task.loss_sum(student, batch)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in student.parameters()]))
    # chunked vs full logits: the same maths summed in another order over the tokens x vocab
    tol = tolerance(batch["labels"].numel() * vocab, depth=4)
    assert_close_computed(grads[0][0], grads[1][0], tol)
    for a, b in zip(grads[0][1], grads[1][1]):
        assert_close_computed(a, b, tol)


@pytest.mark.numeric
def test_hf_directory_teacher_equals_its_transformers_logits(teacher_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    batch, vocab = _batch(teacher_dir)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True)).eval()
    hf.save_pretrained(tmp_path / "hf")
    task = build_task({"name": "distill", "teacher": str(tmp_path / "hf"), "alpha": 1.0})
    with torch.no_grad():
        ref = hf(batch["input_ids"]).logits
        assert_close_computed(task.forward(task.teacher, batch), ref, model_tol(task.teacher, seq_len=32))
        # the teacher distilled into itself: no divergence
        out = task.distill(task.teacher, batch)
    assert abs(float(out.kd)) < 1e-5 * float(out.count)


@pytest.mark.parametrize("opts, words", [
    ({"loss": "kl"}, "task.loss must be one of"),
    ({"temperature": 0}, "task.temperature"),
    ({"alpha": 1.5}, "task.alpha"),
    ({"teacher": "/nonexistent/teacher"}, "task.teacher"),
    ({"chunked_ce": 0}, "chunked_ce"),
])
def test_bad_options_are_one_line_config_errors(teacher_dir, opts, words):
    spec = {"name": "distill", "teacher": str(teacher_dir / "run"), **opts}
    with pytest.raises(ConfigError, match=words) as e:
        build_task(spec)
    assert "\n" not in str(e.value)


def test_teacher_with_another_vocabulary_is_refused(teacher_dir):
    from torchgraft.models.registry import build

    batch, vocab = _batch(teacher_dir)
    student = build({"family": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32,
                     "vocab_size": vocab + 5})
    task = build_task({"name": "distill", "teacher": str(teacher_dir / "run")})
    with pytest.raises(ConfigError, match="share the tokenizer"):
        task.loss_sum(student, batch)


def test_distill_run_resumes_to_the_uninterrupted_weights(teacher_dir, tmp_path):
    from torchgraft.recipes.training import run_training
    from torchgraft.train import Callback

    task = {"name": "distill", "teacher": str(teacher_dir / "run"), "temperature": 2.0, "chunked_ce": 8}
    ref = run_training(_cfg(teacher_dir, 1, 6, task), tmp_path / "ref")

    class Stop(Exception):
        pass

    class StopAt(Callback):
        def on_step_end(self, trainer, record):
            if trainer.state.step == 5:
                raise Stop()

    cfg = _cfg(teacher_dir, 1, 6, task)
    cfg["logging"]["tensorboard"] = True
    with pytest.raises(Stop):
        run_training(cfg, tmp_path / "run", callbacks=[StopAt()])
    from torchgraft.train.lock import RunLock

    with RunLock(tmp_path / "run"), pytest.raises(ConfigError, match="in use"):  # the run-directory lock
        run_training(cfg, tmp_path / "run", resume=True)
    res = run_training(cfg, tmp_path / "run", resume=True)
    assert list((tmp_path / "run").glob("**/events.out.tfevents.*"))
    from torchgraft.train.plot import plot_runs

    plot_runs([tmp_path / "run"], tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
    a, b = ref.model.state_dict(), res.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert {"val_loss", "val_kl", "val_distill_loss"} <= set(res.metrics)
    assert res.metrics["val_kl"] == ref.metrics["val_kl"]
    ck = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    from safetensors.torch import load_file

    assert len(load_file(ck / "model.safetensors")) == len(ref.model.state_dict())  # no teacher tensors


def test_distill_configs_run_through_finetune(teacher_dir, tmp_path):
    """Each configs/distill-*.yaml, pointed at the tiny teacher and shortened, runs through the
    fine-tune recipe (student initialised from the teacher's first layers) into a run directory."""
    from torchgraft.config import load_yaml
    from torchgraft.recipes.finetune import run_finetune

    configs = sorted((ROOT / "configs").glob("distill-*.yaml"))
    assert configs
    for path in configs:
        tree = load_yaml(path)
        assert tree["task"]["name"] == "distill"
        small = _cfg(teacher_dir, 1, 2, every=2)
        tree.update(model=small["model"], data=small["data"], trainer=small["trainer"], eval=small["eval"],
                    checkpoint=small["checkpoint"], logging=small["logging"])
        tree.setdefault("schedule", {})["warmup_steps"] = 0  # a 2-step run has no room for a warm-up
        tree["finetune"]["source"] = tree["task"]["teacher"] = str(teacher_dir / "run")
        out = tmp_path / path.stem
        summary = run_finetune(tree, out)
        assert summary["transfer"]["copied"] > 0 and summary["steps"] == 2
        assert "val_kl" in summary["metrics"]
        assert (out / "metrics.jsonl").is_file() and (out / "config.yaml").is_file()
    # a LoRA student (torchtune's KD recipes are LoRA-only): only the adapters train
    tree["finetune"].update(method="lora", lora={"targets": ["q_proj", "v_proj"], "rank": 4, "alpha": 8})
    summary = run_finetune(tree, tmp_path / "lora")
    assert summary["adapted_layers"] and (tmp_path / "lora" / "adapter" / "adapter_config.json").is_file()
    from torchgraft.recipes.lm import load_lm

    assert load_lm(tmp_path / "lora").model.config.n_layer == 1  # eval / generate take a distill run


def test_chunked_loss_never_makes_a_full_logits_tensor():
    """Every tensor the chunked forward + backward create (recorded with a dispatch mode) is at most
    (chunk, V) in size, while the unchunked loss makes (N, V) ones."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    n, c, v, chunk = 64, 8, 500, 16
    h, w = torch.randn(n, c, requires_grad=True), torch.randn(v, c, requires_grad=True)
    th, tw = torch.randn(n, c), torch.randn(v, c)
    y = torch.randint(0, v, (n,))
    for kind in DIVERGENCES:
        with Largest() as rec:
            chunked_distill_loss(h, w, th, tw, y, chunk, kind=kind, temperature=2.0).loss.backward()
        assert rec.numel <= chunk * v, (kind, rec.numel)
        with Largest() as rec:
            distill_loss(h @ w.t(), th @ tw.t(), y, kind=kind).loss.backward()
        assert rec.numel >= n * v
