"""Real servers on 127.0.0.1 for in-process tests: uvicorn in a thread, an asyncio loop in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time


@contextlib.contextmanager
def serve(app, **config):
    """Run ``app`` under uvicorn on a free 127.0.0.1 port in a thread; yields the base URL.
    ``config``: more ``uvicorn.Config`` arguments."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def read_until_closed(sock: socket.socket, wait_s: float = 20.0) -> tuple[float, bytes]:
    """Read ``sock`` until the server closes it: (seconds it took, everything it sent).  Fails
    the test if it is still open after ``wait_s``."""
    import pytest

    sock.settimeout(wait_s)
    t0, answer = time.monotonic(), b""
    try:
        while chunk := sock.recv(4096):
            answer += chunk
    except socket.timeout:
        pytest.fail(f"the connection was still open after {wait_s} s (answer so far: {answer!r})")
    return time.monotonic() - t0, answer


class LoopThread:
    """An asyncio loop on a daemon thread, for servers the synchronous tests talk to."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def ends_early_backend(worker, model_name: str):
    """A real LocalBackend whose outputs stop after the first one, before the finished output
    (what a broken backend looks like to the client APIs)."""
    from dspark.cluster.backend import LocalBackend

    class EndsEarly(LocalBackend):
        async def generate(self, prompt_ids, params, request_id=None):
            outputs = super().generate(prompt_ids, params, request_id)
            try:
                yield await outputs.__anext__()
            finally:
                await outputs.aclose()

    return EndsEarly(worker, model_name)
