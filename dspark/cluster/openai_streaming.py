"""Sending a generation over ASGI: a Server-Sent Events stream, or one JSON answer.

Every generation runs under a watch for the client leaving (:class:`WatchedResponse`): a
disconnect cancels the handler, which closes the backend iterator and so aborts the request
(one debug line, never an error). The first output decides the status: a backend that refuses
gets a JSON 4xx/5xx, a failure after the stream started is sent as an error event before
``[DONE]``.
"""

from __future__ import annotations

import json
import logging
from typing import AsyncIterator, Awaitable, Callable

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from dspark.cluster.backend import GenerationBackend, collect
from dspark.cluster.openai_errors import backend_error
from dspark.cluster.openai_formats import Format
from dspark.cluster.validation import PreparedRequest
from dspark.workers.request import RequestOutput

log = logging.getLogger(__name__)

__all__ = ["WatchedResponse", "generation_response"]

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # proxies (nginx) must not buffer the stream
]
_DONE = b"data: [DONE]\n\n"


def generation_response(
    backend: GenerationBackend, prepared: PreparedRequest, fmt: Format, stream: bool | None, include_usage: bool
) -> Response:
    """The response that runs ``prepared`` on ``backend`` and sends it in ``fmt``, streamed or whole."""

    def start() -> AsyncIterator[RequestOutput]:
        return backend.generate(prepared.prompt_ids, prepared.params, fmt.id)

    if stream:
        return WatchedResponse(lambda send: _stream(start(), fmt, include_usage, send))
    return WatchedResponse(lambda send: _whole(start(), fmt, send))


async def _stream(outputs: AsyncIterator[RequestOutput], fmt: Format, include_usage: bool, send: Send) -> None:
    """SSE: the first output decides the status (a backend that refuses gets a JSON 4xx/5xx)."""
    try:
        try:
            out = await outputs.__anext__()
        except Exception as exc:  # noqa: BLE001 - mapped to a status, never a dropped connection
            status, body = backend_error(exc)
            await _send_json(send, status, body)
            return
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        for ev in fmt.first_events():
            await _send_event(send, ev)
        finals: dict[int, RequestOutput] = {}
        try:
            while True:
                for ev in fmt.output_events(out):
                    await _send_event(send, ev)
                if out.finished:
                    finals[out.index] = out
                    if len(finals) == fmt.n:  # every choice has finished
                        if include_usage:
                            await _send_event(send, fmt.usage_event([finals[i] for i in range(fmt.n)]))
                        break
                out = await outputs.__anext__()
        except OSError:
            raise  # the client is gone (ASGI servers raise OSError on send); nothing to tell it
        except Exception as exc:  # noqa: BLE001 - the client gets an error event, then [DONE]
            _, body = backend_error(exc)
            await _send_event(send, body)
        await send({"type": "http.response.body", "body": _DONE, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        await _close(outputs)


async def _whole(outputs: AsyncIterator[RequestOutput], fmt: Format, send: Send) -> None:
    try:
        done = await collect(outputs, fmt.n)
    except Exception as exc:  # noqa: BLE001
        status, body = backend_error(exc)
        await _send_json(send, status, body)
        return
    finally:
        await _close(outputs)
    await _send_json(send, 200, fmt.whole(done))


async def _close(outputs: AsyncIterator[RequestOutput]) -> None:
    """Close the backend iterator (aborting an unfinished request), even while cancelled."""
    aclose = getattr(outputs, "aclose", None)
    if aclose is not None:
        with anyio.CancelScope(shield=True):
            await aclose()


class WatchedResponse(Response):
    """Runs ``handler(send)`` while watching the client; a disconnect cancels the handler.

    A client that leaves is normal: one debug line, no error and no traceback, whether the
    server says so with ``http.disconnect`` (uvicorn) or by raising from ``receive`` (Ray Serve's
    proxy cancels the call that fetches messages: ``TaskCancelledError``).
    """

    def __init__(self, handler: Callable[[Send], Awaitable[None]]) -> None:
        super().__init__()  # the handler sends its own status and headers
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                try:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    log.debug("client disconnected mid-response; aborting its request")
                except Exception as exc:  # noqa: BLE001 - Ray Serve's receive raises once the client is gone
                    log.debug("client gone mid-response (%s); aborting its request", type(exc).__name__)
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            try:
                await self.handler(send)
            except OSError:  # send failed: the client left before the watcher noticed
                pass
            finally:
                tg.cancel_scope.cancel()


async def _send_event(send: Send, obj: dict) -> None:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    data = b"data: " + text.encode("utf-8", "replace") + b"\n\n"  # "replace": never fail on odd text
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def _send_json(send: Send, status: int, obj: dict) -> None:
    body = json.dumps(obj).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
