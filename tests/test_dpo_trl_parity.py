"""DPO (sigmoid / hinge / rso / ipo / robust, conservative label smoothing), SimPO and ORPO losses and
their logged reward metrics equal TRL 1.16's on the same tiny model, batch and reference log-probs.

TRL side: a real `DPOTrainer` on a tiny Hugging Face Llama (its `compute_loss` and `_metrics`), and
the loss functions of `CPOTrainer` (SimPO) / `ORPOTrainer` applied to log-probs from TRL's own
`get_batch_logps` on the Hugging Face logits. torchgraft side: the same weights loaded with
`load_hf`, the same token ids as a "preference" batch, through each task's `loss_sum` / `eval_sums`
/ `metrics` (what the trainer calls). Float32 throughout; logits agree to ~1e-6 and the sums run over
<= 10 tokens, so 1e-5 is the tolerance the computation allows.
"""
from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch

pytest.importorskip("trl")
from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402

from torchgraft.train.tasks import build_task  # noqa: E402
from torchgraft.train.tasks.pairwise import pair_logps  # noqa: E402

B, T, V = 4, 12, 40
TOL = dict(rel=1e-5, abs=1e-5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(TRL DPOTrainer, HF model, torchgraft model, TRL inputs, torchgraft batch)."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from torchgraft.data.tokenizers import char_tokenizer
    from torchgraft.interop.hf import load_hf

    d = tmp_path_factory.mktemp("trl")
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    with torch.no_grad():  # larger weights than the default init, so log-probs differ between sequences
        for p in hf.parameters():
            p.mul_(4.0)
    hf.save_pretrained(d / "hf")
    tok = char_tokenizer(["abcdefghijklmnopqrstuvwxyz0123456789"])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token=tok.eos_token, pad_token=tok.pad_token)
    args = DPOConfig(output_dir=str(d / "out"), report_to="none", use_cpu=True, precompute_ref_log_probs=False)
    trainer = DPOTrainer(model=str(d / "hf"), args=args, processing_class=hf_tok,
                         train_dataset=Dataset.from_dict({"prompt": ["ab"], "chosen": ["c"], "rejected": ["d"]}))
    trainer.precompute_ref_logps = True  # the reference log-probs come with the batch, as precomputed ones do

    # full sequences [chosen; rejected] (2B, T): prompt, completion, right padding (varied lengths)
    g = torch.Generator().manual_seed(1)
    full = torch.randint(3, V, (2 * B, T), generator=g)
    prompt_len = torch.tensor([3, 5, 2, 4] * 2)
    length = torch.tensor([9, 12, 7, 10, 12, 8, 11, 6])
    pos = torch.arange(T)[None]
    attn = (pos < length[:, None]).long()
    completion = ((pos >= prompt_len[:, None]) & (pos < length[:, None])).long()
    full = torch.where(attn.bool(), full, torch.full_like(full, tok.pad_id))
    ref = torch.randn(2 * B, generator=g) * 3 - 30
    trl_inputs = {"input_ids": full, "attention_mask": attn, "completion_mask": completion,
                  "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    # the same pairs as the preference dataset batches them: inputs ids[:-1], labels shifted
    labels = torch.where(completion[:, 1:].bool(), full[:, 1:], torch.full_like(full[:, 1:], -100))
    batch = {"pair_id": torch.arange(B), "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    for side, rows in (("chosen", slice(0, B)), ("rejected", slice(B, 2 * B))):
        batch[f"{side}_input_ids"] = full[rows, :-1]
        batch[f"{side}_labels"] = labels[rows]
        batch[f"{side}_attention_mask"] = attn[rows, :-1]
    ours = load_hf(d / "hf")
    return trainer, hf, ours, trl_inputs, batch


def trl_dpo(trainer, inputs, loss_type, beta, ls):
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    trainer.beta, trainer.label_smoothing = beta, ls
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    return float(loss.detach()), {k: v[-1] for k, v in trainer._metrics["train"].items()}


def ours(task, model, batch):
    with torch.no_grad():
        loss = float(task.loss_sum(model, batch) / task.count(batch))
        sums = {k: float(v) for k, v in task.eval_sums(model, batch).items()}
    return loss, task.metrics(sums)


@pytest.mark.parametrize("loss_type,trl_type,beta,ls", [
    ("sigmoid", "sigmoid", 0.1, 0.0), ("sigmoid", "sigmoid", 0.5, 0.0), ("hinge", "hinge", 0.1, 0.0),
    ("rso", "hinge", 0.3, 0.0), ("ipo", "ipo", 0.1, 0.0), ("robust", "robust", 0.2, 0.2)])
def test_dpo_losses_and_metrics_equal_trl(setup, loss_type, trl_type, beta, ls):
    trainer, _, model, inputs, batch = setup
    want_loss, want = trl_dpo(trainer, inputs, trl_type, beta, ls)
    task = build_task({"name": "dpo", "loss_type": loss_type, "beta": beta, "label_smoothing": ls})
    loss, got = ours(task, model, batch)
    assert loss == pytest.approx(want_loss, **TOL)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert got[f"val_{k}"] == pytest.approx(want[k], **TOL), k
    assert got["val_loss"] == pytest.approx(want_loss, **TOL)
    assert 0.0 < want["rewards/accuracies"] < 1.0  # the batch separates the two sides both ways
    # the shared helper gives TRL's summed completion log-probs
    c, r = pair_logps(model, batch)
    assert float(c.sum.mean()) == pytest.approx(want["logps/chosen"], **TOL)
    assert float(r.sum.mean()) == pytest.approx(want["logps/rejected"], **TOL)


def trl_logps(hf, inputs, average):
    """TRL's CPO/ORPO `get_batch_logps` on the HF model's logits: (chosen, rejected) (B,)."""
    with torch.no_grad():
        logits = hf(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    lp = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=average)
    return lp[:B], lp[B:]


def stub(**attrs):
    """The attributes TRL's loss methods read from their trainer."""
    return types.SimpleNamespace(accelerator=types.SimpleNamespace(device=torch.device("cpu")), **attrs)


def test_sigmoid_label_smoothing_equals_trl_conservative_loss(setup):
    """cDPO: TRL 1.16 keeps label-smoothed sigmoid in CPOTrainer.cpo_loss; fed log-ratios it is DPO's."""
    _, hf, model, inputs, batch = setup
    c, r = pair_logps(model, batch)
    c_lr, r_lr = c.sum - batch["ref_chosen_logps"], r.sum - batch["ref_rejected_logps"]
    losses, _, _ = CPOTrainer.cpo_loss(stub(alpha=0.0, beta=0.2, label_smoothing=0.15, loss_type="sigmoid"),
                                       c_lr, r_lr)
    task = build_task({"name": "dpo", "beta": 0.2, "label_smoothing": 0.15})
    loss, _ = ours(task, model, batch)
    assert loss == pytest.approx(float(losses.mean()), **TOL)


@pytest.mark.parametrize("beta,gamma,ls", [(2.0, 0.5, 0.0), (1.0, 1.2, 0.1)])
def test_simpo_equals_trl(setup, beta, gamma, ls):
    _, hf, model, inputs, batch = setup
    c, r = trl_logps(hf, inputs, average=True)
    losses, cr, rr = CPOTrainer.cpo_loss(stub(alpha=0.0, beta=beta, simpo_gamma=gamma, label_smoothing=ls,
                                              loss_type="simpo"), c, r)
    loss, got = ours(build_task({"name": "simpo", "beta": beta, "gamma": gamma, "label_smoothing": ls}), model, batch)
    assert loss == pytest.approx(float(losses.mean()), **TOL)
    assert got["val_rewards/chosen"] == pytest.approx(float(cr.mean()), **TOL)
    assert got["val_rewards/rejected"] == pytest.approx(float(rr.mean()), **TOL)
    assert got["val_rewards/margins"] == pytest.approx(float((cr - rr).mean()), **TOL)
    assert got["val_rewards/accuracies"] == pytest.approx(float((cr > rr).float().mean()), **TOL)


def test_orpo_equals_trl(setup):
    _, hf, model, inputs, batch = setup
    c, r = trl_logps(hf, inputs, average=True)
    beta = 0.25
    losses, cr, rr, ratio, log_odds = ORPOTrainer.odds_ratio_loss(stub(beta=beta), c, r)
    _, got = ours(build_task({"name": "orpo", "beta": beta}), model, batch)
    assert got["val_log_odds_ratio"] == pytest.approx(float(ratio), **TOL)
    assert got["val_log_odds_chosen"] == pytest.approx(float(log_odds), **TOL)
    assert got["val_rewards/chosen"] == pytest.approx(float(cr.mean()), **TOL)
    assert got["val_rewards/rejected"] == pytest.approx(float(rr.mean()), **TOL)
    assert got["val_rewards/accuracies"] == pytest.approx(float((cr > rr).float().mean()), **TOL)
    # loss = per-pair mean NLL of the chosen completion - TRL's odds-ratio term (TRL: nll - losses.mean())
    assert got["val_nll_loss"] == pytest.approx(float(-c.mean()), **TOL)
    assert got["val_loss"] == pytest.approx(float(-c.mean() - losses.mean()), **TOL)


def test_orpo_total_equals_trl_when_chosen_lengths_are_equal(setup):
    """TRL's NLL is a token mean over the batch's chosen tokens; ours is per pair, then over pairs. With
    equal chosen lengths (pairs 0 and 3: 6 completion tokens each) the two are the same number."""
    _, hf, model, inputs, batch = setup
    keep = [0, 3]
    sub = {k: v[keep] for k, v in batch.items()}
    assert (sub["chosen_labels"] != -100).sum(-1).tolist() == [6, 6]
    rows = keep + [B + i for i in keep]
    ids, attn = inputs["input_ids"][rows], inputs["attention_mask"][rows]
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=attn).logits
    labels = ids.masked_fill(inputs["completion_mask"][rows] == 0, -100)
    lp = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    nll = torch.nn.functional.cross_entropy(logits[:2, :-1].reshape(-1, V), labels[:2, 1:].reshape(-1))
    losses, *_ = ORPOTrainer.odds_ratio_loss(stub(beta=0.1), lp[:2], lp[2:])
    loss, _ = ours(build_task({"name": "orpo", "beta": 0.1}), model, sub)
    assert loss == pytest.approx(float(nll - losses.mean()), **TOL)
