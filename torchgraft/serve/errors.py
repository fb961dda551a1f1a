"""Errors a client sees: OpenAI's JSON shape `{"error": {"message", "type", "param", "code"}}`.

Every failure a request can cause is an `APIError` with an HTTP status; nothing else reaches the
client (an unexpected exception becomes a generic 500 and its traceback goes to the server log).
"""
from __future__ import annotations

from typing import Any

from torchgraft.errors import TorchgraftError


class APIError(TorchgraftError):
    """A request the server refuses or cannot finish: status, one-line message, OpenAI type/code."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """The JSON object OpenAI's API returns on errors."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)
