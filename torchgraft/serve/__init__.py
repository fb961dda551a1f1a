"""`torchgraft serve`: an OpenAI-compatible HTTP server for torchgraft artifacts (docs/serve.md).

- `artifact.py`: what a path holds (a decoder LM with its tokenizer and chat template, or a text
  encoder / classifier) and how it is loaded;
- `decoder.py`: the batched slotted KV cache a model decodes in (`SlotDecoder`);
- `sequence.py`: one generated choice (sampling parameters, text, stop strings, finish reason);
- `scheduler.py`: continuous batching on a background thread (admission, chunked prefill, decode,
  eviction, cancellation);
- `encoder.py`: `/v1/classify` and `/v1/embeddings`;
- `protocol.py`: request bodies (pydantic) and the OpenAI response / chunk shapes;
- `errors.py`: `APIError` and OpenAI's error JSON;
- `middleware.py`: body-size cap, API key, structured access log;
- `app.py`: the FastAPI routes; `server.py`: uvicorn, the ready line, SIGTERM draining.
FastAPI / uvicorn are imported only here (the `serve` extra).
"""
