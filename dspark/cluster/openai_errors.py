"""Errors of the OpenAI-compatible API, as OpenAI's error body.

Every failure is answered ``{"error": {"message", "type", "param", "code"}}`` with its HTTP
status: request errors from :mod:`dspark.cluster.validation` with theirs, pydantic's validation
errors as 400 with the offending field, unknown paths and methods as 404 / 405, a backend's
failure by its kind (:func:`backend_error`), anything else as 500 without details.
"""

from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from dspark.cluster import openai_types as T
from dspark.cluster.backend import BackendUnavailable
from dspark.cluster.validation import RequestError

log = logging.getLogger(__name__)

__all__ = ["add_error_handlers", "backend_error", "error_body", "error_response"]


def error_body(
    message: str, param: str | None = None, code: str | None = None, type_: str = "invalid_request_error"
) -> dict:
    """OpenAI's error body."""
    return T.dump(T.ErrorResponse(error=T.ErrorDetail(message=message, type=type_, param=param, code=code)))


def error_response(status: int, body: dict) -> Response:
    """``body`` as a JSON response with ``status`` (and the headers 401 and 408 need)."""
    # ASCII-escaped JSON: an error message may quote client text that is not valid Unicode.
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    if status == 408:  # the rest of the body may still arrive: this connection cannot carry another request
        headers["Connection"] = "close"
    return Response(json.dumps(body), status_code=status, headers=headers, media_type="application/json")


# Request fields whose backend-side checks (engine limits) name them as their message's first word.
BACKEND_PARAMS = ("n", "max_tokens", "logprobs")


def backend_error(exc: BaseException) -> tuple[int, dict]:
    """(status, OpenAI error body) for an exception a backend raised."""
    if isinstance(exc, RequestError):
        return exc.kind.value, error_body(exc.message, exc.param, exc.code)
    if isinstance(exc, ValueError):  # the backend's own validation; its message starts with the field
        first = str(exc).split(" ", 1)[0]
        return 400, error_body(str(exc), first if first in BACKEND_PARAMS else None)
    if isinstance(exc, BackendUnavailable):
        log.warning("generation interrupted: %s", exc)
        return 503, error_body(str(exc), type_="server_error", code="backend_unavailable")
    log.error("generation failed: %s", exc, exc_info=exc)
    return 500, error_body(f"generation failed: {exc}", type_="server_error", code="engine_error")


_TYPE_TAG = re.compile(r"^(str|int|float|bool|list|dict|none|function-.*|.*\[.*\])$")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """A one-line message and the offending field from pydantic's error list."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    e = errors[0]
    if e.get("type") == "json_invalid":
        detail = (e.get("ctx") or {}).get("error", "")
        return f"the body is not valid JSON: {detail}".rstrip(": "), None
    loc = [p for p in e.get("loc", ()) if p != "body"]
    path = ""
    for p in loc:
        if isinstance(p, int):
            path += f"[{p}]"
        elif _TYPE_TAG.match(str(p)):
            break  # a union member's tag, not a field
        else:
            path += f".{p}" if path else str(p)
    if e.get("type") == "missing" and not path:
        return "the request body is missing or not a JSON object", None
    msg = e.get("msg", "invalid value")
    return (f"{path}: {msg}" if path else msg), (path or None)


def add_error_handlers(app: FastAPI) -> None:
    """Answer every error the app raises with OpenAI's error body (see the module doc)."""

    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> Response:
        return error_response(exc.kind.value, error_body(exc.message, exc.param, exc.code))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        message, param = _validation_message(exc)
        return error_response(400, error_body(message, param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, error_body(str(exc.detail), code=code, type_=type_))

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception) -> Response:
        log.error("unhandled error: %s", exc, exc_info=exc)
        return error_response(500, error_body("internal server error", type_="server_error"))
