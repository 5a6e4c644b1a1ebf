"""Start and stop the whole cluster on this machine: Redis, Ray, Serve, the DSpark app.

Used by ``dspark serve``, ``dspark demo``, the end-to-end tests and the cluster benchmarks, so
all of them run exactly the deployment a user gets.  With ``RAY_ADDRESS`` set, the app is
deployed to that existing Ray cluster instead of a local one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import signal
import time
import urllib.request
from dataclasses import dataclass, field

from dspark import omp
from dspark.cluster.app import build_app
from dspark.cluster.config import ClusterConfig

log = logging.getLogger(__name__)
APP_NAME = "dspark"


def _causes(app_status) -> str:
    """Why the failed deployments of ``app_status`` failed: the last line of each one's message
    (the exception its constructor raised, e.g. a drafter checkpoint refused naming the field);
    Serve's application message alone only lists which deployments failed."""
    causes = []
    for name, dep in sorted(app_status.deployments.items()):
        lines = [ln.strip() for ln in (dep.message or "").splitlines() if ln.strip()]
        if str(dep.status).rsplit(".", 1)[-1] in ("DEPLOY_FAILED", "UNHEALTHY") and lines:
            causes.append(f"{name}: {lines[-1]}")
    return "".join(f"; {c}" for c in causes)


# Ray waits 30 s for its GCS server to write its port file; on a host whose cores other
# processes keep busy (the test suite's other worker) that window has been missed.  Unless the
# operator set Ray's own variable, the local node's start waits this long instead.
GCS_PORT_WAIT_S = 90
_GCS_PORT_WAIT_ENV = "RAY_gcs_server_port_wait_time_s"


@contextlib.contextmanager
def _gcs_port_wait(seconds: int):
    """Ray reads its GCS port wait from the environment when the node starts: set it for the
    duration of ``ray.init`` only, leaving an operator's own value and the environment after."""
    if _GCS_PORT_WAIT_ENV in os.environ:
        yield
        return
    os.environ[_GCS_PORT_WAIT_ENV] = str(seconds)
    try:
        yield
    finally:
        os.environ.pop(_GCS_PORT_WAIT_ENV, None)


def _missed_startup_window(e: BaseException) -> bool:
    """Whether ``ray.init`` failed only because a process of the node missed a startup window:
    the raylet its registration, or the GCS server its port file."""
    msg = str(e)
    return "timed out during startup" in msg or ("Timed out waiting for file" in msg and "gcs_server_port" in msg)


def _stop_failed_node(e: BaseException) -> None:
    """Stop what a failed ``ray.init`` left running: the processes it started for the session its
    error names (a GCS server that missed its window keeps running, a child of this process,
    which ``ray.shutdown`` does not know of)."""
    m = re.search(r"(session_[0-9_-]+)", str(e))
    if m is None:
        return
    session = m.group(1)
    for pid in _children(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace")
        except OSError:  # gone meanwhile, or no /proc here
            continue
        if session in args:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)


def _children(pid: int) -> list[int]:
    """The child processes of ``pid``, started from any of its threads, from /proc (empty where
    there is none)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:  # the thread ended meanwhile
            continue
    return out


def _wait_serve_gone(timeout_s: float = 60.0) -> None:
    """Until Serve's controller actor is gone: ``serve.shutdown()`` gives up waiting for it after
    a while, and a ``serve.start`` that still finds it attaches to it, keeping its old port."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        except ValueError:
            return
        time.sleep(0.5)
    raise TimeoutError(f"Serve's controller still alive {timeout_s:.0f}s after serve.shutdown()")


@dataclass
class LocalCluster:
    cfg: ClusterConfig
    host: str = "127.0.0.1"
    http_port: int = 8000  # 0: a free port, chosen as Serve starts (again if something takes it first)
    redis_url: str | None = field(default=None, repr=False)  # None: start a private redis-server (see below)
    ray_cpus: int = 0  # logical CPUs for a local Ray (0: enough for fractional actors)
    env: dict[str, str] = field(default_factory=dict)  # extra env for every Ray worker
    _redis: object = None
    _ray_started: bool = False
    _serve_started: bool = False
    _picked_port: bool = False  # http_port was 0: picked at start, 0 again after stop

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    # Serve starts this many times on fresh ports when the port chosen for it was taken meanwhile.
    BIND_TRIES = 3
    RAY_INIT_TRIES = 3  # starts of Ray's node when it misses its registration window

    def start(self, timeout_s: float = 600.0, stop_on_failure: bool = True) -> "LocalCluster":
        """Start Redis (unless given), Ray (unless running), Serve and the app; wait until healthy.
        A start that fails stops what it started (unless ``stop_on_failure`` is False: the caller
        reports the error first and calls ``stop()``, which can take a minute)."""
        try:
            return self._start(timeout_s)
        except BaseException:
            if stop_on_failure:
                self.stop()
            raise

    def _start(self, timeout_s: float) -> "LocalCluster":
        import ray
        from ray import serve

        from dspark.cluster.http_deadline import proxy_env
        from dspark.cluster.redis_server import start_cluster_redis

        if self.redis_url is None:  # password-protected and supervised; the URL carries the password
            self._redis = start_cluster_redis()
            self.redis_url = self._redis.url
        cfg = dataclasses.replace(self.cfg, redis_url=self.redis_url)
        # The roles share this host's cores: sleeping OpenMP waits unless the operator chose (dspark/omp.py).
        env = {**omp.child_env("passive"), "TOKENIZERS_PARALLELISM": "false",
               **proxy_env(cfg.http_header_timeout_s), **self.env}
        forwarded = (cfg.internal_token_env, cfg.api_key_env, cfg.internal_tls_cert_env, cfg.internal_tls_key_env,
                     cfg.internal_tls_ca_env, cfg.internal_tls_name_env, "DSPARK_CACHE_DIR", "DSPARK_DATA_DIR",
                     "DSPARK_MODEL")
        for k in forwarded:
            if os.environ.get(k):
                env.setdefault(k, os.environ[k])
        if not cfg.internal_token and env.get(cfg.internal_token_env):
            # The roles get this token through their environment, but build_app runs here, where
            # it may not be set: carry it in the config so no other token is generated for them.
            cfg = dataclasses.replace(cfg, internal_token=env[cfg.internal_token_env])
        if not ray.is_initialized():
            if os.environ.get("RAY_ADDRESS"):
                ray.init(runtime_env={"env_vars": env}, logging_level=logging.WARNING)
            else:
                cpus = self.ray_cpus or max(16, 4 * (os.cpu_count() or 1))
                kw = dict(num_cpus=cpus, include_dashboard=False, runtime_env={"env_vars": env},
                          logging_level=logging.WARNING, log_to_driver=bool(os.environ.get("DSPARK_RAY_LOGS")))
                self._ray_started = True  # from here on, stop() shuts down whatever ray.init left
                for attempt in range(1, self.RAY_INIT_TRIES + 1):
                    try:
                        with _gcs_port_wait(GCS_PORT_WAIT_S):
                            ray.init(**kw)
                        break
                    except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for these
                        # On a loaded host the raylet can miss Ray's fixed 30 s registration
                        # window, or the GCS server its port file's window (each seen with the
                        # test suite's other worker busy); a later start usually makes it.
                        # Anything else is raised as it came.
                        if not _missed_startup_window(e) or attempt == self.RAY_INIT_TRIES:
                            raise
                        log.warning("Ray's node did not start in time (%s); starting it again (%d/%d)",
                                    e, attempt + 1, self.RAY_INIT_TRIES)  # fmt: skip
                        ray.shutdown()
                        _stop_failed_node(e)
                        time.sleep(2.0 * attempt)  # let the old node's processes go first
            self._ray_started = True
        self._start_serve()
        try:
            serve.run(build_app(dataclasses.asdict(cfg)), name=APP_NAME, route_prefix="/", blocking=False)
        except RuntimeError as e:  # Serve's message names the failed deployments, not why they failed
            status = serve.status().applications.get(APP_NAME)
            raise RuntimeError(f"{str(e).rstrip('.')}{_causes(status) if status is not None else ''}") from None
        self._wait_healthy(timeout_s)
        return self

    def _start_serve(self) -> None:
        """Serve's proxy binds the HTTP port.  A port picked here (``http_port=0``) comes from
        outside the ranges the OS and Ray hand out (``dspark.net.free_port``), yet another process
        may still bind it before the proxy does: then Serve starts again on another one.  A port
        the caller named is not changed."""
        from ray import serve

        from dspark.net import free_port

        self._picked_port = pick = self._picked_port or self.http_port == 0
        for attempt in range(1, self.BIND_TRIES + 1):
            port = free_port(self.host) if pick else self.http_port
            self._serve_started = True
            try:
                serve.start(http_options={"host": self.host, "port": port})
            except Exception as e:  # noqa: BLE001 - the proxy's bind error reaches us wrapped in a RayTaskError
                if not (pick and "Failed to bind" in str(e) and attempt < self.BIND_TRIES):
                    raise
                log.warning("Serve could not bind port %d (taken meanwhile); trying another", port)
                serve.shutdown()
                _wait_serve_gone()
                continue
            self.http_port = port
            return

    def _wait_healthy(self, timeout_s: float) -> None:
        from ray import serve

        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            status = serve.status().applications.get(APP_NAME)
            if status is not None and status.status == "RUNNING":
                try:
                    with urllib.request.urlopen(self.base_url + "/health", timeout=5) as r:
                        if r.status == 200:
                            return
                except Exception as exc:  # proxy not up yet
                    last = exc
            elif status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise RuntimeError(f"deployment failed: {status.message}{_causes(status)}")
            time.sleep(0.5)
        raise TimeoutError(f"cluster not healthy after {timeout_s:.0f}s (last error: {last})")

    def stop(self) -> None:
        """Delete the app gracefully (in-flight requests finish, within each deployment's
        ``graceful_shutdown_timeout_s``), then stop Serve, Ray and the Redis we started.
        Safe to call twice."""
        import ray
        from ray import serve

        if self._serve_started and ray.is_initialized():
            for step in (lambda: serve.delete(APP_NAME), serve.shutdown):
                try:
                    step()
                except Exception as exc:
                    log.warning("serve shutdown: %s", exc)
        self._serve_started = False
        if self._ray_started:
            ray.shutdown()
            self._ray_started = False
        if self._redis is not None:
            self._redis.close()
            self._redis = None
            self.redis_url = None  # ours: a new start starts a new one
        if self._picked_port:
            self.http_port = 0

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
