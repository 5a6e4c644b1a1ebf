"""A deadline on the header phase of HTTP requests, for the uvicorn that serves the OpenAI API.

uvicorn bounds an idle keep-alive connection but never a request that is still arriving: a
client that opens a connection and sends nothing, or half a request line and some headers,
keeps it (and a file descriptor, and a protocol object) until it gives up.  ``RequestGuard``
bounds the body once the headers are in; this bounds what comes before it.

The deadline runs from the moment a connection opens, and from the first byte of each later
request on a kept-alive connection, until that request's headers are complete.  When it passes,
the client gets ``408`` with ``Connection: close`` and the connection is closed.  Between
requests uvicorn's own keep-alive timeout applies, unchanged.

Two ways in:

- a uvicorn you run yourself: ``uvicorn.Config(app, http=with_header_deadline(10.0))``;
- Ray Serve's HTTP proxy, which builds its own uvicorn: Serve calls the function named by
  ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` in the proxy process before it starts uvicorn;
  ``serve_proxy_callback`` (this module) makes uvicorn's default protocol the one with the
  deadline, read from ``DSPARK_HTTP_HEADER_TIMEOUT_S``.  ``LocalCluster`` sets both variables;
  ``deploy/kuberay/rayservice.yaml`` sets them in the pods.
"""

from __future__ import annotations

import asyncio
import logging
import os

log = logging.getLogger(__name__)

__all__ = ["HEADER_TIMEOUT_ENV", "HEADER_TIMEOUT_S", "PROXY_CALLBACK", "proxy_env", "serve_proxy_callback",
           "with_header_deadline"]

HEADER_TIMEOUT_S = 10.0  # a request line and headers not received in full by then: 408 and close
HEADER_TIMEOUT_ENV = "DSPARK_HTTP_HEADER_TIMEOUT_S"
PROXY_CALLBACK = "dspark.cluster.http_deadline:serve_proxy_callback"
_TIMEOUT_BODY = b"the request headers did not arrive in time\n"
_TIMEOUT_ANSWER = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                   b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))


def with_header_deadline(timeout_s: float, base: type[asyncio.Protocol] | None = None) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (``base``, default the one uvicorn picks for ``http="auto"``)
    with a ``timeout_s`` deadline on each request's header phase."""
    if not 0 < timeout_s < float("inf"):
        raise ValueError(f"the header timeout must be a positive, finite number of seconds, got {timeout_s}")
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        base = AutoHTTPProtocol
    # uvicorn's protocols share ``loop``, ``transport``, ``cycle`` (the request being served,
    # replaced when a request's headers are complete), ``data_received`` and ``on_response_complete``.
    return type(f"HeaderDeadline{base.__name__}", (_HeaderDeadline, base), {"header_timeout_s": float(timeout_s)})


class _HeaderDeadline:
    """Mixin over a uvicorn HTTP protocol: see the module docstring."""

    header_timeout_s: float

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._deadline_cycle = self.cycle
        self._awaiting_headers = True
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        if self._awaiting_headers and self._deadline_timer is None:
            self._arm_header_deadline()  # first byte of the next request on a kept-alive connection
        super().data_received(data)
        if self.cycle is not self._deadline_cycle:  # this request's headers are complete
            self._deadline_cycle = self.cycle
            self._awaiting_headers = False
            self._cancel_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._awaiting_headers = True  # armed again by the next request's first byte

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._deadline_timer = self.loop.call_later(self.header_timeout_s, self._header_deadline_passed)

    def _cancel_header_deadline(self) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None

    def _header_deadline_passed(self) -> None:
        self._deadline_timer = None
        if not self._awaiting_headers or self.transport.is_closing():
            return
        log.debug("request headers not received within %g s; answering 408", self.header_timeout_s)
        self.transport.write(_TIMEOUT_ANSWER)
        self.transport.close()


def header_timeout_from_env() -> float:
    """``DSPARK_HTTP_HEADER_TIMEOUT_S`` as seconds (default ``HEADER_TIMEOUT_S``); refuses a bad value."""
    raw = os.environ.get(HEADER_TIMEOUT_ENV, "").strip()
    if not raw:
        return HEADER_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{HEADER_TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if not 0 < value < float("inf"):
        raise ValueError(f"{HEADER_TIMEOUT_ENV} must be a positive, finite number of seconds, got {raw!r}")
    return value


def serve_proxy_callback() -> list:
    """Ray Serve's proxy start-up callback: from here on, the uvicorn that Serve builds in this
    process (``http="auto"``) uses the protocol with the header deadline.  Adds no middleware."""
    import uvicorn.config

    timeout_s = header_timeout_from_env()
    global ServeProxyProtocol
    ServeProxyProtocol = with_header_deadline(timeout_s)
    uvicorn.config.HTTP_PROTOCOLS["auto"] = f"{__name__}:ServeProxyProtocol"
    log.info("HTTP header deadline %g s on the Serve proxy", timeout_s)
    return []


ServeProxyProtocol: type[asyncio.Protocol] | None = None  # set by serve_proxy_callback


def proxy_env(timeout_s: float) -> dict[str, str]:
    """The environment variables that give Serve's proxy a ``timeout_s`` header deadline."""
    with_header_deadline(timeout_s)  # refuses a bad value here, not in the proxy
    return {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK, HEADER_TIMEOUT_ENV: f"{timeout_s:g}"}
