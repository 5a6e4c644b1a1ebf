"""A private, throw-away `redis-server` on a free loopback port.

Used when DSPARK_REDIS_URL is not set (local runs, demos, tests): the server
listens on 127.0.0.1 only, keeps nothing on disk (`--save ''`,
`--appendonly no`, its working directory is a temp dir) and dies with us.

    with RedisServer() as redis:
        state = RedisState(StateConfig(url=redis.url))
        ...
        redis.kill()      # simulate a crash (SIGKILL)
        redis.restart()   # same port, empty data set

This module speaks RESP over a raw socket for its readiness probe, so it
needs no Redis client library.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path

REDIS_URL_ENV = "DSPARK_REDIS_URL"
_LOOPBACK = "127.0.0.1"

INSTALL_HINT = (
    "redis-server was not found on PATH. Install it, e.g.\n"
    "  Debian/Ubuntu: sudo apt-get update && sudo apt-get install -y redis-server\n"
    "  macOS:         brew install redis\n"
    "or run `make redis`, or point DSPARK_REDIS_URL at an existing server."
)


class RedisServerError(RuntimeError):
    """redis-server is missing, or failed to start or answer PING."""


def ensure_redis_server(executable: str | None = None) -> str:
    """Path of the redis-server binary; RedisServerError with install steps if absent.

    `executable` may be a path or a name to look up on PATH (default
    "redis-server").
    """
    found = shutil.which(executable or "redis-server")
    if found is None:
        raise RedisServerError(INSTALL_HINT)
    return found


def find_free_port(host: str = _LOOPBACK) -> int:
    """A TCP port that was free on `host` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ping(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if a Redis server at host:port answers PING with PONG."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _terminate(proc: subprocess.Popen) -> None:
    # Finalizer for servers nobody stopped: never leave one running.
    if proc.poll() is None:
        proc.kill()
        proc.wait()


class RedisServer:
    """A local redis-server child process. Context manager; see module doc.

    Attributes: host ("127.0.0.1"), port, url ("redis://127.0.0.1:<port>/0"),
    workdir (temp dir holding the log), process (subprocess.Popen or None).
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        executable: str | None = None,
        startup_timeout_s: float = 10.0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.executable = ensure_redis_server(executable)
        self.host = _LOOPBACK
        # port=None or 0: pick a free one (and retry if it gets taken meanwhile).
        self._fixed_port = bool(port)
        self.port = port or 0
        self.startup_timeout_s = startup_timeout_s
        self.extra_args = tuple(extra_args)
        self.workdir = Path(tempfile.mkdtemp(prefix="dspark-redis-"))
        self.process: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None
        self._cleanup_dir = weakref.finalize(self, shutil.rmtree, str(self.workdir), True)

    # -------------------------------------------------------------- state

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ping(self, timeout: float = 0.5) -> bool:
        return self.running and ping(self.host, self.port, timeout)

    # -------------------------------------------------------------- lifecycle

    def start(self) -> "RedisServer":
        """Start the server and wait until it answers PING. Returns self."""
        if self.running:
            return self
        # A free port can be taken between probing and binding; retry with a
        # new one unless the caller fixed the port.
        attempts = 1 if self._fixed_port else 5
        last_error: Exception | None = None
        for _ in range(attempts):
            if not self.port:
                self.port = find_free_port(self.host)
            try:
                self._spawn_and_wait()
                return self
            except RedisServerError as exc:
                last_error = exc
                if not self._fixed_port:
                    self.port = 0
        assert last_error is not None
        raise last_error

    def _command(self) -> list[str]:
        return [
            self.executable,
            "--bind", self.host,
            "--port", str(self.port),
            "--protected-mode", "yes",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--logfile", str(self.log_path),
            "--daemonize", "no",
            *self.extra_args,
        ]  # fmt: skip

    def _spawn_and_wait(self) -> None:
        self.process = subprocess.Popen(
            self._command(),
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            # Own session: a Ctrl-C aimed at a foreground job does not reach it.
            start_new_session=True,
        )
        self._finalizer = weakref.finalize(self, _terminate, self.process)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if ping(self.host, self.port, timeout=0.2):
                return
            time.sleep(0.02)
        stderr = b""
        if self.process.poll() is None:
            _terminate(self.process)
        elif self.process.stderr is not None:
            stderr = self.process.stderr.read() or b""
        log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
        self.process = None
        raise RedisServerError(
            f"redis-server on {self.host}:{self.port} did not answer PING within "
            f"{self.startup_timeout_s}s\n{stderr.decode(errors='replace')}{log}"
        )

    def stop(self, timeout_s: float = 5.0) -> None:
        """Graceful shutdown (SIGTERM, then SIGKILL after timeout_s). Idempotent."""
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._reap()

    def kill(self) -> None:
        """Crash the server with SIGKILL (no shutdown work). Idempotent."""
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        self._reap()

    def restart(self) -> "RedisServer":
        """Stop if running, then start again on the same port (data is gone)."""
        self.stop()
        self._fixed_port = True  # clients hold the old URL
        return self.start()

    def close(self) -> None:
        """Stop the server and delete its working directory."""
        self.stop()
        self._cleanup_dir()

    def _reap(self) -> None:
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self.process = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RedisServer(url={self.url!r}, running={self.running})"


def start_redis_server(**kwargs) -> RedisServer:
    """Start a RedisServer (see its arguments) and return it running."""
    return RedisServer(**kwargs).start()


def redis_url_from_env(env: dict[str, str] | None = None) -> tuple[str, RedisServer | None]:
    """(url, owned_server): DSPARK_REDIS_URL if set, else a freshly started local server.

    The caller owns a returned server and must close() it.
    """
    env = os.environ if env is None else env
    url = env.get(REDIS_URL_ENV, "").strip()
    if url:
        return url, None
    server = start_redis_server()
    return server.url, server
