"""BERT (`BertModel`, `BertForSequenceClassification`, `BertForTokenClassification`) <-> torchgraft
`bert` family (`task` "none", "sequence_classification", "token_classification"). `BertForMaskedLM` and
`BertForPreTraining` files load as the encoder (`task="none"`) with `strict=False`, dropping `cls.*`.

| Hugging Face (`bert.` prefix for the task models, none for BertModel) | torchgraft                     |
|---------------------------------------------------------|-----------------------------------------|
| embeddings.word_embeddings.weight                       | embeddings.tok_emb.weight               |
| embeddings.position_embeddings.weight                   | embeddings.pos_emb.weight               |
| embeddings.token_type_embeddings.weight                 | embeddings.type_emb.weight              |
| embeddings.LayerNorm.{weight,bias}                      | embeddings.norm.{weight,bias}           |
| encoder.layer.{i}.attention.self.{query,key,value}.*    | blocks.{i}.attn.{q,k,v}_proj.*          |
| encoder.layer.{i}.attention.output.dense.*              | blocks.{i}.attn.o_proj.*                |
| encoder.layer.{i}.attention.output.LayerNorm.*          | blocks.{i}.attn_norm.*                  |
| encoder.layer.{i}.intermediate.dense.*                  | blocks.{i}.mlp.fc_in.*                  |
| encoder.layer.{i}.output.dense.*                        | blocks.{i}.mlp.fc_out.*                 |
| encoder.layer.{i}.output.LayerNorm.*                    | blocks.{i}.mlp_norm.*                   |
| pooler.dense.*                                          | pooler.dense.*                          |
| classifier.* (the classification models)               | classifier.*                            |

Skipped on import (buffers, recomputed): `embeddings.position_ids`, `embeddings.token_type_ids`.
A checkpoint without `pooler.dense` (saved with `add_pooling_layer=False`) loads with `pooler=False`.
"""
from __future__ import annotations

from typing import Any

from torchgraft.errors import ConfigError
from torchgraft.interop.hf_gpt2 import ACT_FROM_HF, ACT_TO_HF
from torchgraft.interop.hf_spec import HFSpec, Rule, check_equal, copy, linear, need

CLASSIFY = "BertForSequenceClassification"
TOKENS = "BertForTokenClassification"
ARCH_OF_TASK = {"none": "BertModel", "sequence_classification": CLASSIFY, "token_classification": TOKENS}
# pretraining checkpoints (e.g. bert-base-uncased) load as the encoder; their `cls.*` heads have no
# torchgraft counterpart, so they need strict=False and are listed in the load report
TASKS = {**{v: k for k, v in ARCH_OF_TASK.items()}, "BertForMaskedLM": "none", "BertForPreTraining": "none"}


def rules(cfg: Any, p: str, arch: str) -> list[Rule]:
    e = f"{p}embeddings."
    r = [copy(f"{e}word_embeddings.weight", "embeddings.tok_emb.weight"),
         copy(f"{e}position_embeddings.weight", "embeddings.pos_emb.weight"),
         copy(f"{e}token_type_embeddings.weight", "embeddings.type_emb.weight"),
         *linear(f"{e}LayerNorm", "embeddings.norm")]
    for i in range(cfg.n_layer):
        h, b = f"{p}encoder.layer.{i}.", f"blocks.{i}."
        r += linear(f"{h}attention.self.query", f"{b}attn.q_proj")
        r += linear(f"{h}attention.self.key", f"{b}attn.k_proj")
        r += linear(f"{h}attention.self.value", f"{b}attn.v_proj")
        r += linear(f"{h}attention.output.dense", f"{b}attn.o_proj")
        r += linear(f"{h}attention.output.LayerNorm", f"{b}attn_norm")
        r += linear(f"{h}intermediate.dense", f"{b}mlp.fc_in")
        r += linear(f"{h}output.dense", f"{b}mlp.fc_out")
        r += linear(f"{h}output.LayerNorm", f"{b}mlp_norm")
    r += linear(f"{p}pooler.dense", "pooler.dense")
    r += linear("classifier", "classifier")
    return r


def _num_labels(hf: dict[str, Any]) -> int:
    if hf.get("num_labels"):
        return int(hf["num_labels"])
    return len(hf.get("id2label") or {}) or 2


def config_from_hf(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    act = hf.get("hidden_act", "gelu")
    if act not in ACT_FROM_HF:
        raise ConfigError(f"{arch} with hidden_act={act!r} is not supported "
                          f"(supported: {', '.join(ACT_FROM_HF)})")
    check_equal(hf, "position_embedding_type", "absolute", arch, default="absolute")
    check_equal(hf, "is_decoder", False, arch, default=False)
    fields = {
        "vocab_size": need(hf, "vocab_size", arch),
        "n_layer": need(hf, "num_hidden_layers", arch),
        "n_head": need(hf, "num_attention_heads", arch),
        "n_embd": need(hf, "hidden_size", arch),
        "intermediate_size": need(hf, "intermediate_size", arch),
        "block_size": hf.get("max_position_embeddings") or 512,
        "type_vocab_size": hf.get("type_vocab_size", 2),
        "norm_eps": float(hf.get("layer_norm_eps", 1e-12)),
        "dropout": float(hf.get("hidden_dropout_prob", 0.0) or 0.0),
        "activation": ACT_FROM_HF[act],
        "init_std": float(hf.get("initializer_range", 0.02)),
    }
    fields["task"] = TASKS[arch]
    if fields["task"] != "none":
        problem = hf.get("problem_type")
        if problem not in (None, "single_label_classification"):
            raise ConfigError(f"{arch} with problem_type={problem!r} is not supported "
                              "(only single-label classification)")
        fields["num_labels"] = _num_labels(hf)
        if hf.get("classifier_dropout") is not None:
            fields["classifier_dropout"] = float(hf["classifier_dropout"])
    return fields


def from_tensors(fields: dict[str, Any], names: set[str], prefix: str) -> dict[str, Any]:
    """No `pooler.dense` in the file (add_pooling_layer=False) -> a model without a pooler."""
    return {**fields, "pooler": f"{prefix}pooler.dense.weight" in names}


def config_to_hf(cfg: Any) -> tuple[str, dict[str, Any]]:
    if cfg.activation not in ACT_TO_HF:
        raise ConfigError(f"activation {cfg.activation!r} has no Hugging Face name")
    if not cfg.bias:
        raise ConfigError("Hugging Face BERT always has biases; this model has bias=false")
    arch = ARCH_OF_TASK[cfg.task]
    if arch == CLASSIFY and cfg.pooling != "pooler":
        raise ConfigError("Hugging Face BertForSequenceClassification classifies the pooler output; "
                          f"this model pools with pooling={cfg.pooling!r}")
    if arch == CLASSIFY and not cfg.pooler:
        raise ConfigError("Hugging Face BertForSequenceClassification classifies the pooler output; "
                          "this model has pooler=false")
    out = {
        "vocab_size": cfg.vocab_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.block_size,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.norm_eps,
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.dropout,
        "hidden_act": ACT_TO_HF[cfg.activation],
        "position_embedding_type": "absolute",
        "initializer_range": cfg.init_std,
        "pad_token_id": 0,
    }
    if arch != "BertModel":
        out["num_labels"] = cfg.num_labels
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
        out["classifier_dropout"] = cfg.classifier_dropout
        if arch == CLASSIFY:
            out["problem_type"] = "single_label_classification"
    return arch, out


SPEC = HFSpec(
    model_type="bert",
    family="bert",
    architectures=tuple(TASKS),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    rules=rules,
    prefixes={"BertModel": ("", "bert."), **{a: ("bert.",) for a in TASKS if a != "BertModel"}},
    anchor="embeddings.word_embeddings.weight",
    derived=(r"embeddings\.position_ids$", r"embeddings\.token_type_ids$"),
    from_tensors=from_tensors,
)
