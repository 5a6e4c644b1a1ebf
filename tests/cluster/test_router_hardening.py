"""Router hardening against hostile clients, through real servers on 127.0.0.1 over a real
engine (SmolLM2 fp32, ngram drafter): the gRPC GenerationService (auth before decoding, malformed
payloads), both APIs with duplicate credentials, slow request bodies; the cluster's own
redis-server (password, supervision) with the real redis-server; and, at the end, one local
cluster (Ray Serve, Redis) for what only Serve's proxy and the cluster's Redis show."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

grpc = pytest.importorskip("grpc")
httpx = pytest.importorskip("httpx")

from dspark.cluster.backend import LocalBackend  # noqa: E402
from dspark.cluster.grpc_api import start_grpc_server  # noqa: E402
from dspark.cluster.openai_api import make_http_app  # noqa: E402
from dspark.cluster.validation import RouterConfig  # noqa: E402
from dspark.proto.dspark.v1 import generate_pb2 as pb  # noqa: E402
from helpers.servers import LoopThread, read_until_closed, serve  # noqa: E402

API_KEY = "hardening-test-key"
GOOD = (("authorization", f"Bearer {API_KEY}"),)
METHODS = ("/dspark.v1.GenerationService/Generate", "/dspark.v1.GenerationService/GenerateUnary")
# Bytes that are no GenerateRequest: a truncated varint, a length prefix past the end, field 0.
GARBAGE = [b"\xff\xff\xff\xff", b"\x0a\x7fshort", b"\x00\x01"]


@pytest.fixture(scope="module")
def stack():
    from dspark.workers.factory import EngineSpec, build_engine
    from dspark.workers.runner import RunnerConfig
    from dspark.workers.verifier import VerifierWorker

    built = build_engine(EngineSpec(dtype="fp32", draft="ngram", runner=RunnerConfig(n_slots=4, max_seq=512)),
                         progress=False)
    worker = VerifierWorker(built.engine)
    yield SimpleNamespace(engine=built.engine, worker=worker, tok=built.loaded.tokenizer,
                          backend=LocalBackend(worker, built.loaded.name))
    worker.close()
    built.close()


@pytest.fixture(scope="module")
def grpc_ports(stack):
    """(open port, keyed port): GenerationService without and with an API key."""
    loop = LoopThread()
    servers = [loop.run(start_grpc_server(stack.backend, stack.tok, RouterConfig(api_key=key)))
               for key in ("", API_KEY)]
    yield tuple(port for _, port in servers)
    for server, _ in servers:
        loop.run(server.stop(grace=1))
    loop.close()


@pytest.fixture(scope="module")
def http_urls(stack):
    """(open base URL, keyed base URL): the OpenAI API without and with an API key."""
    with serve(make_http_app(stack.backend, stack.tok, RouterConfig(api_key=""))) as open_url, \
            serve(make_http_app(stack.backend, stack.tok, RouterConfig(api_key=API_KEY))) as keyed_url:
        yield open_url, keyed_url


def _raw_call(port: int, method: str, payload: bytes, metadata=None):
    """Send ``payload`` as-is (identity serializers); returns the responses or the RpcError."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        if method.endswith("/Generate"):
            call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
            try:
                return list(call(payload, metadata=metadata, timeout=60))
            except grpc.RpcError as exc:
                return exc
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            return [call(payload, metadata=metadata, timeout=60)]
        except grpc.RpcError as exc:
            return exc


def _valid_payload() -> bytes:
    return pb.GenerateRequest(prompt="The three primary colors are", max_tokens=3, temperature=0.0).SerializeToString()


# ---------------------------------------------------------------------------- gRPC payloads
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("payload", GARBAGE, ids=["varint", "length", "field0"])
def test_malformed_payload_is_invalid_argument(grpc_ports, method, payload):
    open_port, keyed_port = grpc_ports
    for port, metadata in ((open_port, None), (keyed_port, GOOD)):
        err = _raw_call(port, method, payload, metadata)
        assert isinstance(err, grpc.RpcError), err
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
        assert "GenerateRequest" in err.details() and "Error" not in err.details() and "class" not in err.details()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("payload", [GARBAGE[0], b""], ids=["garbage", "empty"])
@pytest.mark.parametrize("metadata", [None, (("authorization", "Bearer wrong"),)], ids=["missing", "wrong"])
def test_unauthenticated_before_the_payload_is_read(grpc_ports, method, payload, metadata):
    """With a key configured, a client without it gets UNAUTHENTICATED whatever it sent."""
    err = _raw_call(grpc_ports[1], method, payload, metadata)
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.UNAUTHENTICATED, err


def test_valid_raw_payload_still_generates(grpc_ports):
    for method in METHODS:
        out = _raw_call(grpc_ports[1], method, _valid_payload(), GOOD)
        assert not isinstance(out, grpc.RpcError), out
        last = pb.GenerateResponse.FromString(out[-1])
        assert last.finish_reason == pb.FINISH_REASON_LENGTH and last.usage.completion_tokens == 3


# ---------------------------------------------------------------------------- duplicate credentials
TWO_KEYS = [("Bearer wrong", f"Bearer {API_KEY}"), (f"Bearer {API_KEY}", "Bearer wrong"),
            (f"Bearer {API_KEY}", f"Bearer {API_KEY}")]


@pytest.mark.parametrize("values", TWO_KEYS, ids=["wrong-right", "right-wrong", "right-right"])
def test_two_authorization_headers_are_refused_over_http(http_urls, values):
    for base in http_urls:
        headers = [("Authorization", v) for v in values]
        r = httpx.get(f"{base}/v1/models", headers=headers, timeout=30)
        assert r.status_code == 400, (base, r.status_code, r.text)
        err = r.json()["error"]
        assert err["code"] == "duplicate_authorization" and "more than one Authorization header" in err["message"]
    r = httpx.get(f"{http_urls[1]}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("values", TWO_KEYS, ids=["wrong-right", "right-wrong", "right-right"])
def test_two_authorization_entries_are_refused_over_grpc(grpc_ports, values):
    for port in grpc_ports:
        for method in METHODS:
            err = _raw_call(port, method, _valid_payload(), [("authorization", v) for v in values])
            assert isinstance(err, grpc.RpcError), (port, method, err)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "more than one" in err.details(), err


# ---------------------------------------------------------------------------- slow clients
def _slow_body(port: int, wait_s: float = 20.0) -> tuple[float, bytes]:
    """Send headers announcing 1,000 body bytes, then only 12; return (seconds until the server
    closed the connection, what it answered).  ``wait_s`` bounds the wait."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n" + b'{"messages":')
        return read_until_closed(s, wait_s)


def _assert_timed_out(elapsed: float, answer: bytes, timeout_s: float) -> None:
    assert elapsed < timeout_s + 3.0, f"closed only after {elapsed:.1f} s"
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:300]
    if answer:
        body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert body["error"]["code"] == "request_timeout", body


def test_slow_body_is_answered_408_and_closed(stack):
    timeout_s = 1.0
    with serve(make_http_app(stack.backend, stack.tok, RouterConfig(api_key=""), body_timeout_s=timeout_s)) as url:
        port = int(url.rsplit(":", 1)[1])
        elapsed, answer = _slow_body(port)
        _assert_timed_out(elapsed, answer, timeout_s)
        assert elapsed > 0.8 * timeout_s, f"answered after {elapsed:.2f} s, before the deadline"
        r = httpx.get(f"{url}/v1/models", timeout=30)  # the server itself is fine
        assert r.status_code == 200


# ---------------------------------------------------------------------------- the cluster's Redis
def _unauthenticated_ping(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        return s.recv(256)


def _wait_for(predicate, timeout_s: float, period_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(period_s)
    return None


def test_cluster_redis_requires_a_password_and_comes_back_after_a_crash(caplog):
    """The redis-server a cluster starts refuses clients without its password (NOAUTH); killed
    from outside, it is back on the same port with the same password within seconds, and a
    state client that was connected before carries on."""
    from dspark.cluster.redis_server import ping, start_cluster_redis
    from dspark.cluster.redis_state import RedisState, StateConfig

    caplog.set_level(logging.DEBUG)
    server = start_cluster_redis()
    try:
        port, url, password = server.port, server.url, server.password
        assert password and len(password) >= 24 and f":{password}@" in url
        assert _unauthenticated_ping(port).startswith(b"-NOAUTH"), "the cluster's Redis accepts anyone"
        assert password not in " ".join(server.process.args), "the password is on the command line"

        async def beat(state: RedisState, member: str) -> set:
            await state.heartbeat("router", member, {"n": 1})
            return set(await state.alive("router"))

        async def scenario() -> None:
            async with RedisState(StateConfig(url=url, prefix="hardening")) as state:
                assert await beat(state, "before") == {"before"}
                os.kill(server.process.pid, signal.SIGKILL)  # a crash the owner did not ask for
                t0 = time.monotonic()
                back = await asyncio.to_thread(_wait_for, lambda: ping("127.0.0.1", port, 0.2, password), 8.0)
                assert back, "redis-server did not come back"
                assert time.monotonic() - t0 < 8.0 and server.port == port and server.url == url
                # The same client reconnects on its own; the restarted server starts empty.
                members = None
                for _ in range(50):
                    try:
                        members = await beat(state, "after")
                        break
                    except ConnectionError:
                        await asyncio.sleep(0.1)
                assert members == {"after"}, members

        asyncio.run(scenario())
        # The supervisor counts the restart just after the new server answers: allow it that moment.
        assert _wait_for(lambda: server.restarts == 1, 5.0), server.restarts
        assert _unauthenticated_ping(port).startswith(b"-NOAUTH")
        text = "\n".join(r.getMessage() for r in caplog.records) + repr(server)
        assert "restarting" in text and password not in text
    finally:
        server.close()
    assert not ping("127.0.0.1", port, 0.2, password), "close() left the server running"


# ---------------------------------------------------------------------------- through the real cluster
# One local cluster (Ray Serve, Redis, no draft workers) for the rest of the file: Serve's own
# HTTP proxy sits in front of the router, which is where the log noise and timeouts arise.
CLUSTER_MODEL = "SmolLM2-135M-Instruct"
CLUSTER_BODY_TIMEOUT_S = 2.0
CLUSTER_HEADER_TIMEOUT_S = 1.5
COUNT = [{"role": "user", "content": "Count from 1 to 300, separated by commas."}]


@pytest.fixture(scope="module")
def cluster():
    from dspark.cluster.config import ClusterConfig
    from dspark.cluster.local import LocalCluster

    cfg = ClusterConfig(dtype="fp32", draft="none", draft_workers=0, n_slots=4, max_seq=512, torch_threads=1,
                        http_body_timeout_s=CLUSTER_BODY_TIMEOUT_S, http_header_timeout_s=CLUSTER_HEADER_TIMEOUT_S)
    c = LocalCluster(cfg, http_port=0).start(timeout_s=600)
    yield c
    c.stop()


def _ray_logs() -> dict:
    """{path: size} of the Ray worker and Serve replica logs of this session."""
    import ray

    root = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs"
    files = [*root.glob("worker-*.err"), *root.glob("worker-*.out"), *root.glob("serve/replica_*.log")]
    return {f: f.stat().st_size for f in files}


def _new_log_text(before: dict) -> str:
    text = []
    for f in _ray_logs():
        with open(f, "rb") as fh:
            fh.seek(before.get(f, 0))
            text.append(fh.read().decode("utf-8", "replace"))
    return "\n".join(text)


def _sse_request(port: int, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=120)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return s


@pytest.mark.slow
def test_client_disconnect_mid_stream_is_not_an_error(cluster):
    """Streaming clients that hang up after a few chunks leave no ERROR line and no traceback in
    any router or verifier log, and the cluster serves the next request."""
    before = _ray_logs()
    body = {"model": CLUSTER_MODEL, "messages": COUNT, "max_tokens": 300, "temperature": 0, "stream": True}
    for _ in range(3):
        s = _sse_request(cluster.http_port, body)
        received = b""
        while received.count(b"data: ") < 4:
            chunk = s.recv(4096)
            assert chunk, received
            received += chunk
        assert received.startswith(b"HTTP/1.1 200"), received[:200]
        s.close()
    time.sleep(3.0)  # the router notices, aborts the request, and would log here
    r = httpx.post(f"{cluster.base_url}/v1/chat/completions", timeout=120,
                   json={**body, "stream": False, "max_tokens": 4})
    assert r.status_code == 200, r.text
    text = _new_log_text(before)
    for needle in ("Traceback", "ERROR", "unhandled error", "TaskCancelledError", "exception was never retrieved"):
        assert needle not in text, f"{needle!r} in the cluster logs:\n{text[-3000:]}"


@pytest.mark.slow
def test_slow_body_through_the_serve_proxy(cluster):
    """Serve's HTTP proxy (uvicorn) never times a request being received; the router's deadline
    (``ClusterConfig.http_body_timeout_s``) answers 408 and the proxy closes the connection."""
    elapsed, answer = _slow_body(cluster.http_port)
    _assert_timed_out(elapsed, answer, CLUSTER_BODY_TIMEOUT_S)


@pytest.mark.slow
@pytest.mark.parametrize("sent", [b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty"],
                         ids=["nothing", "headers-unfinished"])
def test_slow_headers_through_the_serve_proxy(cluster, sent):
    """Serve's proxy has no header-phase timeout of its own; the cluster gives it one
    (``ClusterConfig.http_header_timeout_s``): 408 and a closed connection, and several such
    clients at once hold nothing."""
    socks = [socket.create_connection(("127.0.0.1", cluster.http_port), timeout=20) for _ in range(20)]
    try:
        for s in socks:
            s.sendall(sent)
        t0 = time.monotonic()
        for s in socks:
            _, answer = read_until_closed(s)
            assert answer.startswith(b"HTTP/1.1 408"), answer
        elapsed = time.monotonic() - t0
        assert elapsed < CLUSTER_HEADER_TIMEOUT_S + 3.0, f"closed only after {elapsed:.1f} s"
    finally:
        for s in socks:
            s.close()
    r = httpx.get(f"{cluster.base_url}/v1/models", timeout=30)
    assert r.status_code == 200, r.text


@pytest.mark.slow
def test_cluster_redis_is_supervised_and_password_protected(cluster):
    """The local cluster's Redis: NOAUTH without the password; killed, it comes back on the
    same port and the router's state client writes its heartbeat into the new server."""
    import redis

    from dspark.cluster.redis_server import ping

    server = cluster._redis
    assert _unauthenticated_ping(server.port).startswith(b"-NOAUTH"), "the cluster's Redis accepts anyone"
    port, password = server.port, server.password
    assert password and f":{password}@" in cluster.redis_url
    client = redis.Redis.from_url(cluster.redis_url, socket_timeout=2)
    assert client.keys("dspark:hb:router:*"), "no router heartbeat in the cluster's Redis"
    os.kill(server.process.pid, signal.SIGKILL)
    assert _wait_for(lambda: ping("127.0.0.1", port, 0.2, password), 8.0), "redis-server did not come back"

    def router_heartbeat():
        try:
            return client.keys("dspark:hb:router:*")
        except redis.ConnectionError:
            return None

    assert _wait_for(router_heartbeat, 15.0), "the router did not reconnect to the restarted Redis"
    r = httpx.post(f"{cluster.base_url}/v1/chat/completions", timeout=120,
                   json={"model": CLUSTER_MODEL, "messages": COUNT, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
