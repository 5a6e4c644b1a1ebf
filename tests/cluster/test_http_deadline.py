"""The header-phase deadline on a real uvicorn over loopback sockets, with both of uvicorn's
HTTP parsers: a client that never finishes its request line and headers gets 408 and a closed
connection, on a fresh connection and on a kept-alive one; a request whose headers arrived in
time is never cut by it, however long its answer takes."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

pytest.importorskip("uvicorn")

from helpers.servers import read_until_closed, serve  # noqa: E402

from dspark.cluster.http_deadline import header_timeout_from_env, proxy_env, with_header_deadline  # noqa: E402

DEADLINE_S = 1.0
SLOW_ANSWER_S = 2.5 * DEADLINE_S


async def app(scope, receive, send):
    """Answers ``ok``; ``/slow`` only after SLOW_ANSWER_S."""
    assert scope["type"] == "http"
    while (await receive()).get("more_body"):
        pass
    if scope["path"] == "/slow":
        await asyncio.sleep(SLOW_ANSWER_S)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _protocols():
    from uvicorn.protocols.http.h11_impl import H11Protocol

    out = [pytest.param(H11Protocol, id="h11")]
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        out.append(pytest.param(HttpToolsProtocol, id="httptools"))
    except ImportError:
        pass
    return out


@pytest.fixture(params=_protocols())
def port(request):
    with serve(app, http=with_header_deadline(DEADLINE_S, request.param)) as url:
        yield int(url.rsplit(":", 1)[1])


def _assert_408(elapsed: float, answer: bytes) -> None:
    assert 0.8 * DEADLINE_S < elapsed < DEADLINE_S + 3.0, f"closed after {elapsed:.2f} s"
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"connection: close" in answer.lower()


@pytest.mark.parametrize("sent", [b"", b"GET /x HT", b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: 1\r\n"],
                         ids=["nothing", "half-a-request-line", "headers-unfinished"])
def test_unfinished_headers_get_408_and_close(port, sent):
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(sent)
        _assert_408(*read_until_closed(s, 15.0))


def test_the_deadline_applies_again_on_a_kept_alive_connection(port):
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        s.settimeout(10)
        first = s.recv(4096)
        assert first.startswith(b"HTTP/1.1 200") and first.endswith(b"ok"), first
        time.sleep(1.5 * DEADLINE_S)  # idle between requests: uvicorn's keep-alive timeout (5 s) applies
        s.sendall(b"GET /x HTTP/1.1\r\nHost: 12")
        _assert_408(*read_until_closed(s, 15.0))


def test_a_slow_answer_is_not_cut(port):
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        elapsed, answer = read_until_closed(s, 15.0)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok"), answer
    assert elapsed >= 0.9 * SLOW_ANSWER_S


def test_headers_sent_slowly_but_in_time_are_served(port):
    with socket.create_connection(("127.0.0.1", port)) as s:
        for piece in (b"GET /x HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n", b"Connection: close\r\n\r\n"):
            s.sendall(piece)
            time.sleep(0.25 * DEADLINE_S)
        _, answer = read_until_closed(s, 15.0)
    assert answer.startswith(b"HTTP/1.1 200"), answer


@pytest.mark.parametrize("bad", ["0", "-1", "nan", "inf", "ten"])
def test_bad_timeouts_are_refused(monkeypatch, bad):
    monkeypatch.setenv("DSPARK_HTTP_HEADER_TIMEOUT_S", bad)
    with pytest.raises(ValueError, match="DSPARK_HTTP_HEADER_TIMEOUT_S"):
        header_timeout_from_env()
    if bad != "ten":
        with pytest.raises(ValueError, match="header timeout"):
            proxy_env(float(bad))
