"""`ServeSettings`: every knob of `torchgraft serve`, with the defaults the CLI shows."""
from __future__ import annotations

from dataclasses import dataclass

from torchgraft.errors import ConfigError


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"       # localhost only unless asked
    port: int = 8000
    api_key: str | None = None    # required as `Authorization: Bearer KEY` on /v1 when set
    max_batch: int = 8            # slots of the batched KV cache (sequences decoded together)
    max_tokens: int = 256         # most completion tokens one choice may ask for (and the default)
    max_queue: int = 64           # choices waiting for a slot before requests get 429
    max_body: int = 1 << 20       # request body cap in bytes (413 above)
    timeout: float = 600.0        # seconds one request may take (504 after)
    prefill_chunk: int = 128      # prompt tokens prefilled per scheduler iteration
    max_inputs: int = 256         # inputs per /v1/embeddings or /v1/classify request
    compile: bool = False         # torch.compile the batched decode step
    context: int | None = None    # cap on prompt + completion tokens (default: the model's block_size)
    name: str | None = None       # model id clients use (default: the artifact directory's name)
    device: str = "cpu"

    def check(self) -> None:
        """One ConfigError naming the first bad option."""
        for opt, value, low in (("--max-batch", self.max_batch, 1), ("--max-tokens", self.max_tokens, 1),
                                ("--max-queue", self.max_queue, 1), ("--max-body", self.max_body, 1024),
                                ("--prefill-chunk", self.prefill_chunk, 1), ("--max-inputs", self.max_inputs, 1),
                                ("--port", self.port, 0)):
            if value < low:
                raise ConfigError(f"{opt} must be >= {low}, got {value}")
        if self.port > 65535:
            raise ConfigError(f"--port must be <= 65535, got {self.port}")
        if not self.timeout > 0:
            raise ConfigError(f"--timeout must be > 0 seconds, got {self.timeout}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key is empty; give a key or leave the option out")
