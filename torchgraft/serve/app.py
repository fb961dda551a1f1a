"""The FastAPI application: OpenAI-compatible routes over a loaded artifact.

FastAPI (on Starlette) was chosen for its pydantic request validation, which turns every malformed
body into one 400 naming the field; streaming uses Starlette's `StreamingResponse` with
`text/event-stream` (plain SSE lines are all OpenAI clients read, so no SSE library is needed).

Routes: `GET /health`, `GET /v1/models`, `GET /v1/models/{id}`; decoders: `POST /v1/completions`,
`POST /v1/chat/completions`; encoders: `POST /v1/embeddings`, `POST /v1/classify`. Every error is
OpenAI's error JSON; unexpected exceptions become a bare 500 (the traceback goes to the log only).
"""
from __future__ import annotations

import base64
import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from torchgraft.errors import TorchgraftError
from torchgraft.serve import protocol
from torchgraft.serve.artifact import DecoderArtifact, EncoderArtifact
from torchgraft.serve.completions import CompletionService, check_model, run_job, stream_job
from torchgraft.serve.decoder import SlotDecoder
from torchgraft.serve.encoder import EncoderService
from torchgraft.serve.errors import APIError, bad_request, error_body
from torchgraft.serve.middleware import AccessLog, APIKeyGuard, BodyLimit
from torchgraft.serve.scheduler import Scheduler
from torchgraft.serve.settings import ServeSettings

log = logging.getLogger("torchgraft.serve")


class Service:
    """The artifact and what runs it: a scheduler (decoders) or an encoder service."""

    def __init__(self, artifact: DecoderArtifact | EncoderArtifact, settings: ServeSettings):
        self.artifact, self.settings = artifact, settings
        self.kind = "decoder" if isinstance(artifact, DecoderArtifact) else "encoder"
        self.created = protocol.now()
        self.draining = False
        self.scheduler: Scheduler | None = None
        self.completions: CompletionService | None = None
        self.encoder: EncoderService | None = None
        if isinstance(artifact, DecoderArtifact):
            decoder = SlotDecoder(artifact.model, settings.max_batch, artifact.context, compile=settings.compile)
            self.scheduler = Scheduler(artifact.model, decoder, settings.max_queue, settings.prefill_chunk)
            self.completions = CompletionService(artifact, self.scheduler, settings.max_tokens, settings.timeout)
        else:
            self.encoder = EncoderService(artifact, settings.max_inputs)

    def health(self) -> dict[str, Any]:
        stats = self.scheduler.stats() if self.scheduler is not None else {}
        return {"status": "draining" if self.draining else "ok", "model": self.artifact.name, "kind": self.kind,
                **stats}

    def model_card(self) -> dict[str, Any]:
        return {"id": self.artifact.name, "object": "model", "created": self.created, "owned_by": "torchgraft"}

    def need(self, kind: str, route: str) -> None:
        """400 when `route` needs another kind of artifact than the one served."""
        if self.kind != kind:
            other = "/v1/completions or /v1/chat/completions" if self.kind == "decoder" else "/v1/embeddings"
            raise APIError(400, f"{route} is not available for model {self.artifact.name!r} (a {self.kind}); "
                           f"use {other}", param="model", code="unsupported_route")


def create_app(artifact: DecoderArtifact | EncoderArtifact, settings: ServeSettings | None = None) -> Any:
    """The ASGI app (FastAPI inside the API-key, body-cap and access-log middleware); the
    scheduler thread runs between the app's startup and shutdown."""
    settings = settings or ServeSettings()
    service = Service(artifact, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if service.scheduler is not None:
            service.scheduler.start()
        try:
            yield
        finally:
            if service.scheduler is not None:
                service.scheduler.stop()

    api = FastAPI(title="torchgraft serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    api.state.service = service
    _errors(api)

    @api.get("/health")
    async def health() -> dict[str, Any]:
        return service.health()

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [service.model_card()]}

    @api.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != artifact.name:
            raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
        return service.model_card()

    async def generate(req: Any, request: Request, chat: bool) -> Any:
        service.need("decoder", request.url.path)
        job = service.completions.start(req, chat)
        if req.stream:
            return StreamingResponse(stream_job(job), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        return await run_job(job, request.is_disconnected)

    @api.post("/v1/completions")
    async def completions(req: protocol.CompletionRequest, request: Request) -> Any:
        return await generate(req, request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(req: protocol.ChatCompletionRequest, request: Request) -> Any:
        return await generate(req, request, chat=True)

    @api.post("/v1/embeddings")
    async def embeddings(req: protocol.EmbeddingRequest, request: Request) -> Any:
        service.need("encoder", request.url.path)
        check_model(req.model, artifact.name)
        if not hasattr(artifact.model, "forward_features"):
            raise bad_request(f"model {artifact.name!r} has no forward_features(); it cannot give embeddings")
        vectors, tokens = await run_in_threadpool(service.encoder.embed, protocol.inputs_of(req))
        data = [{"object": "embedding", "index": i, "embedding": _encode_vector(v, req.encoding_format)}
                for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": artifact.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @api.post("/v1/classify")
    async def classify(req: protocol.ClassifyRequest, request: Request) -> Any:
        service.need("encoder", request.url.path)
        check_model(req.model, artifact.name)
        preds = await run_in_threadpool(service.encoder.classify, protocol.inputs_of(req), req.top_k)
        return {"object": "list", "model": artifact.name, "data": [{"index": i, **p} for i, p in enumerate(preds)]}

    app: Any = BodyLimit(api, settings.max_body)
    app = APIKeyGuard(app, settings.api_key)
    app = AccessLog(app)
    app.service = service  # type: ignore[attr-defined]
    return app


def _encode_vector(v: list[float], fmt: str) -> Any:
    """A float list, or (encoding_format "base64", the openai client's default) little-endian
    float32 bytes in base64."""
    if fmt == "float":
        return v
    import numpy as np

    return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()


def _errors(api: FastAPI) -> None:
    """Every error as OpenAI's JSON, without internals."""

    @api.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(*_validation_message(e.errors())), status_code=400)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {e.detail}", kind),
                            status_code=e.status_code)

    @api.exception_handler(TorchgraftError)
    async def user_error(request: Request, e: TorchgraftError) -> JSONResponse:
        return JSONResponse(error_body(str(e)), status_code=400)

    @api.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=e)
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)


def _validation_message(errors: Any) -> tuple[str, str, str | None]:
    """(message, type, param) of pydantic's first complaint, in the client's terms."""
    errors = list(errors)
    if not errors:
        return "invalid request body", "invalid_request_error", None
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid" or not loc:
        return ("malformed JSON: the request body must be a JSON object (Content-Type: application/json)",
                "invalid_request_error", None)
    param = ".".join(loc)
    if first.get("type") == "extra_forbidden":
        return f"unknown field {param!r}", "invalid_request_error", param
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return (f"{param}: {msg}" if param else msg), "invalid_request_error", param
