"""A private, throw-away `redis-server` on a free loopback port.

Used when DSPARK_REDIS_URL is not set (local runs, demos, tests): the server
listens on 127.0.0.1 only, keeps nothing on disk (`--save ''`,
`--appendonly no`, its working directory is a temp dir) and dies with us.

    with RedisServer() as redis:
        state = RedisState(StateConfig(url=redis.url))
        ...
        redis.kill()      # SIGKILL it; it stays down (supervision paused)
        redis.restart()   # same port and password, empty data set

The server a cluster starts for itself (:func:`start_cluster_redis`: `dspark
serve`, the local cluster, `serve run` without Redis configured) requires a
password generated for that cluster (`requirepass`, written to a config file
in the private working directory, never on the command line; clients get it
in `url`) and is supervised: if it dies on its own, a thread starts it again
on the same port with the same password, backing off while it keeps failing.

This module speaks RESP over a raw socket for its readiness probe, so it
needs no Redis client library.
"""

from __future__ import annotations

import atexit
import logging
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from pathlib import Path
from urllib.parse import quote

from dspark.net import free_port

log = logging.getLogger(__name__)

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


def _resp(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def ping(host: str, port: int, timeout: float = 0.5, password: str | None = None) -> bool:
    """True if a Redis server at host:port answers PING with PONG (after AUTH with `password`)."""
    request, expected = _resp(b"PING"), b"+PONG\r\n"
    if password:
        request, expected = _resp(b"AUTH", password.encode()) + request, b"+OK\r\n" + expected
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(request)
            answer = b""
            while len(answer) < len(expected) and (chunk := s.recv(64)):
                answer += chunk
            return answer.startswith(expected)
    except OSError:
        return False


def _terminate(proc: subprocess.Popen) -> None:
    # Finalizer for servers nobody stopped: never leave one running.
    if proc.poll() is None:
        proc.kill()
        proc.wait()


class RedisServer:
    """A local redis-server child process. Context manager; see module doc.

    Attributes: host ("127.0.0.1"), port, url ("redis://[:<password>@]127.0.0.1:<port>/0"),
    workdir (temp dir holding the log), process (subprocess.Popen or None),
    restarts (how many times supervision brought it back).

    `password`: required of clients (`requirepass`); None: none.  `supervise`:
    restart the server when it exits without being asked to, after
    `min_backoff_s`, doubling up to `max_backoff_s` while restarts fail or
    the server keeps dying within a minute.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        executable: str | None = None,
        startup_timeout_s: float = 10.0,
        extra_args: tuple[str, ...] = (),
        password: str | None = None,
        supervise: bool = False,
        min_backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
    ) -> None:
        self.executable = ensure_redis_server(executable)
        self.host = _LOOPBACK
        # port=None or 0: pick a free one (and retry if it gets taken meanwhile).
        self._fixed_port = bool(port)
        self.port = port or 0
        self.startup_timeout_s = startup_timeout_s
        self.extra_args = tuple(extra_args)
        if password is not None and not all(c.isprintable() and c.isascii() and c not in '"\\ ' for c in password):
            raise ValueError("the Redis password must be printable ASCII without spaces, quotes or backslashes")
        self.password = password
        self.workdir = Path(tempfile.mkdtemp(prefix="dspark-redis-"))  # mode 0700
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self._finalizer: weakref.finalize | None = None
        self._cleanup_dir = weakref.finalize(self, shutil.rmtree, str(self.workdir), True)
        # Supervision: `_wanted` is the owner's intent (start() sets it; stop()/kill() clear it),
        # `_lock` orders the owner's calls against the supervisor's restarts.
        self.supervise = supervise
        self.min_backoff_s, self.max_backoff_s = min_backoff_s, max_backoff_s
        self._lock = threading.RLock()
        self._wanted = False
        self._closed = threading.Event()
        self._supervisor: threading.Thread | None = None

    # -------------------------------------------------------------- state

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ping(self, timeout: float = 0.5) -> bool:
        return self.running and ping(self.host, self.port, timeout, self.password)

    # -------------------------------------------------------------- lifecycle

    def start(self) -> "RedisServer":
        """Start the server and wait until it answers PING. Returns self."""
        with self._lock:
            self._start()
            self._wanted = True
        if self.supervise and self._supervisor is None:
            # At exit, stop supervising before the finalizers kill the server (atexit runs this
            # first: it is registered later); otherwise it would restart an orphan.
            atexit.register(self._closed.set)
            self._supervisor = threading.Thread(target=self._supervise, name=f"redis-supervisor-{self.port}",
                                                daemon=True)
            self._supervisor.start()
        return self

    def _start(self) -> None:
        if self.running:
            return
        # A free port can be taken between probing and binding; retry with a
        # new one unless the caller fixed the port.
        attempts = 1 if self._fixed_port else 5
        last_error: Exception | None = None
        for _ in range(attempts):
            if not self.port:
                self.port = free_port(self.host)
            try:
                self._spawn_and_wait()
                return
            except RedisServerError as exc:
                last_error = exc
                if not self._fixed_port:
                    self.port = 0
        assert last_error is not None
        raise last_error

    def _command(self) -> list[str]:
        # The password goes in a config file only we can read, not on the command line (ps).
        conf = self.workdir / "redis.conf"
        conf.touch(mode=0o600)
        conf.write_text(f'requirepass "{self.password}"\n' if self.password else "")
        return [
            self.executable,
            str(conf),
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
            if ping(self.host, self.port, timeout=0.2, password=self.password):
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
        self._end(graceful=True, timeout_s=timeout_s)

    def kill(self) -> None:
        """SIGKILL the server (no shutdown work); it stays down until restart(). Idempotent."""
        self._end(graceful=False)

    def _end(self, graceful: bool, timeout_s: float = 5.0) -> None:
        with self._lock:
            self._wanted = False  # on purpose: supervision must not bring it back
            proc = self.process
            if proc is None:
                return
            if proc.poll() is None:
                if graceful:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout_s)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                else:
                    proc.kill()
            proc.wait()
            self._reap()

    def restart(self) -> "RedisServer":
        """Stop if running, then start again on the same port and password (data is gone)."""
        with self._lock:
            self.stop()
            self._fixed_port = True  # clients hold the old URL
            return self.start()

    def close(self) -> None:
        """Stop the server (and its supervision) and delete its working directory."""
        self._closed.set()
        self.stop()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(timeout=5)
        self._cleanup_dir()

    # -------------------------------------------------------------- supervision

    def _supervise(self) -> None:
        """Restart the server whenever it dies while wanted: same port, same password."""
        backoff = self.min_backoff_s
        up_since = time.monotonic()
        while not self._closed.wait(0.1):
            with self._lock:
                proc = self.process
                died = self._wanted and (proc is None or proc.poll() is not None)
                code = proc.poll() if proc is not None else None
            if not died:
                continue
            if time.monotonic() - up_since > 60.0:
                backoff = self.min_backoff_s  # it had been stable: this is a fresh failure
            log.warning("redis-server on %s:%d exited (code %s); restarting in %.1f s",
                        self.host, self.port, code, backoff)
            if self._closed.wait(backoff):
                return
            with self._lock:
                if self._closed.is_set():
                    return
                if not self._wanted or self.running:
                    continue  # the owner stopped or restarted it meanwhile
                if self.process is not None:
                    self._reap()
                self._fixed_port = True  # clients hold the URL
                try:
                    self._start()
                except (RedisServerError, OSError) as exc:
                    log.warning("redis-server on %s:%d did not come back: %s", self.host, self.port,
                                str(exc).splitlines()[0])
                    backoff = min(2 * backoff, self.max_backoff_s)
                    continue
                self.restarts += 1
            log.warning("redis-server on %s:%d is back (restart %d); its data set starts empty",
                        self.host, self.port, self.restarts)
            up_since = time.monotonic()
            backoff = min(2 * backoff, self.max_backoff_s)

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
        auth = ":***@" if self.password else ""  # never the password itself
        return f"RedisServer(url='redis://{auth}{self.host}:{self.port}/0', running={self.running})"


def start_redis_server(**kwargs) -> RedisServer:
    """Start a RedisServer (see its arguments) and return it running."""
    return RedisServer(**kwargs).start()


def start_cluster_redis() -> RedisServer:
    """The redis-server a cluster starts for itself: a password of its own, supervised."""
    return start_redis_server(password=secrets.token_urlsafe(24), supervise=True)
