"""What the OpenAI-compatible API checks before FastAPI parses anything (ASGI middleware).

The API key on ``/v1/*``, the body size limit and the body read deadline: a client that sends
its body slowly, or not at all, gets ``408`` and the connection is closed.
"""

from __future__ import annotations

import logging

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dspark.cluster.openai_errors import error_body, error_response
from dspark.cluster.validation import ErrorKind, RequestError, check_bearer

log = logging.getLogger(__name__)

__all__ = ["BODY_TIMEOUT_S", "RequestGuard"]

BODY_TIMEOUT_S = 30.0  # a request body not received in full by then is answered 408


class RequestGuard:
    """ASGI middleware: API key on /v1/* and the body size limit, before anything is parsed.

    A /v1 request with more than one Authorization header is 400, key or no key.
    The body is read here (counting bytes, so a missing or lying Content-Length cannot get past
    the limit), within ``body_timeout_s`` (uvicorn itself never times a request that is being
    received), and replayed to the app; later ``receive`` calls (disconnect) pass through.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, max_bytes: int, body_timeout_s: float) -> None:
        self.app = app
        self.api_key = api_key
        self.max_bytes = max_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", ())}
        try:
            if scope["path"].startswith("/v1"):
                auths = [v for k, v in scope.get("headers", ()) if k.lower() == b"authorization"]
                if len(auths) > 1:  # servers and proxies disagree on which one counts: refuse, never pick
                    raise RequestError("more than one Authorization header: send exactly one",
                                       code="duplicate_authorization")
                check_bearer(auths[0].decode("latin-1") if auths else None, self.api_key)
            with anyio.fail_after(self.body_timeout_s):
                body = await self._read_body(headers, receive)
            _check_utf8(body)
        except RequestError as exc:
            await error_response(exc.kind.value, error_body(exc.message, exc.param, exc.code))(scope, receive, send)
            return
        except TimeoutError:
            log.debug("request body not received within %g s; answering 408", self.body_timeout_s)
            message = f"the request body was not received within {self.body_timeout_s:g} s"
            await error_response(408, error_body(message, code="request_timeout"))(scope, receive, send)
            return
        except _ClientGone as exc:
            log.debug("client left while sending the request body (%s)", exc)
            return
        replay: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

        async def replayed() -> Message:
            return replay.pop(0) if replay else await receive()

        await self.app(scope, replayed, send)

    async def _read_body(self, headers: dict[bytes, bytes], receive: Receive) -> bytes:
        too_large = RequestError(
            f"the request body is larger than {self.max_bytes} bytes",
            code="request_too_large",
            kind=ErrorKind.TOO_LARGE,
        )
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                msg = await receive()
            except Exception as exc:  # noqa: BLE001 - Ray Serve's receive raises once the client is gone
                raise _ClientGone(type(exc).__name__) from None
            if msg["type"] != "http.request":
                raise _ClientGone(msg["type"])  # nobody is left to answer
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise too_large
            chunks.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(chunks)


class _ClientGone(Exception):
    """The client went away before its request body was complete."""


def _check_utf8(body: bytes) -> None:
    # JSON bodies must be UTF-8 (RFC 8259); json.loads would also guess UTF-16/32 and blur errors.
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"the body is not valid UTF-8 (byte {exc.start})", code="invalid_encoding") from None
