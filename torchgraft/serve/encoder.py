"""`/v1/classify` and `/v1/embeddings` for encoder artifacts.

Embeddings are the mean of the last hidden states over real tokens (attention mask), as
sentence-transformers' mean pooling computes them, L2-normalised when the model directory's
`modules.json` has a Normalize module. Classification is `Classifier.predict` (the `predict --json`
objects). Calls are serialised (one batch at a time) and run off the event loop.
"""
from __future__ import annotations

import threading
from typing import Any

import torch

from torchgraft.models.heads import pool_tokens
from torchgraft.serve.artifact import EncoderArtifact
from torchgraft.serve.errors import bad_request


class EncoderService:
    """Batched encoder inference with a bound on inputs per request."""

    def __init__(self, artifact: EncoderArtifact, max_inputs: int = 256, batch_size: int = 32):
        self.artifact, self.max_inputs, self.batch_size = artifact, max_inputs, batch_size
        self._lock = threading.Lock()

    def _check(self, inputs: list[str]) -> None:
        if len(inputs) > self.max_inputs:
            raise bad_request(f"{len(inputs)} inputs in one request; at most {self.max_inputs}", "input")
        if not all(isinstance(s, str) and s for s in inputs):
            raise bad_request("every input must be a non-empty string", "input")

    @torch.inference_mode()
    def embed(self, inputs: list[str]) -> tuple[list[list[float]], int]:
        """(one vector per input, tokens read)."""
        self._check(inputs)
        model = self.artifact.model
        device = next(model.parameters()).device
        vectors, tokens = [], 0
        with self._lock:
            for start in range(0, len(inputs), self.batch_size):
                batch = {k: v.to(device) for k, v in self.artifact.encode(inputs[start:start + self.batch_size]).items()}
                hidden = model.forward_features(batch["input_ids"], batch["attention_mask"],
                                                batch.get("token_type_ids"))  # (B, T, C)
                vec = pool_tokens(hidden.float(), "mean", batch["attention_mask"])  # (B, C)
                if self.artifact.normalize:
                    vec = torch.nn.functional.normalize(vec, dim=-1)
                vectors += vec.cpu().tolist()
                tokens += int(batch["attention_mask"].sum())
        return vectors, tokens

    def classify(self, inputs: list[str], top_k: int) -> list[dict[str, Any]]:
        """`predict --json` objects: input, label, top-k probabilities."""
        if self.artifact.classifier is None:
            raise bad_request(f"model {self.artifact.name!r} is an encoder without a classification head; "
                              "use /v1/embeddings", "model")
        self._check(inputs)
        with self._lock:
            return self.artifact.classifier.predict(inputs, top_k=top_k, batch_size=self.batch_size)
