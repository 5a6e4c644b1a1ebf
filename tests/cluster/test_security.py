"""Security of the internal link and of secrets, in-process (fast): a real DraftWorkerServer
(ngram drafter) over TLS with the internal token, a real RemoteDrafter, and a real
password-protected redis-server for log redaction."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import time

import grpc
import pytest

from dspark.proto.dspark.v1 import draft_pb2, draft_pb2_grpc
from dspark.workers.draft_worker import DraftWorkerConfig, DraftWorkerServer
from dspark.workers.drafters.ngram import NgramDrafter
from dspark.workers.drafters.remote import RemoteDrafter, RemoteDrafterConfig
from dspark.workers.request import SamplingParams, Sequence

TOKEN = "internal-token-for-tests"
SERVER_NAME = "dspark-draft.internal"


def make_pki(folder) -> dict[str, str]:
    """A throwaway CA and a draft-worker certificate for SERVER_NAME and 127.0.0.1 (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(fname: str, data: bytes) -> str:
        path = folder / fname
        path.write_bytes(data)
        return str(path)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("dspark test CA")).issuer_name(name("dspark test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName(SERVER_NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (x509.CertificateBuilder().subject_name(name(SERVER_NAME)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return {
        "ca": write("ca.pem", ca.public_bytes(pem)),
        "cert": write("worker.pem", cert.public_bytes(pem)),
        "key": write("worker.key", key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption())),
    }


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_worker(pki):
    server = DraftWorkerServer(NgramDrafter, DraftWorkerConfig(
        token=TOKEN, tls_cert_file=pki["cert"], tls_key_file=pki["key"])).start()
    yield server
    server.stop()


def _draft_call(address: str, creds, metadata, name: str | None = SERVER_NAME):
    """Open one Draft stream, send an Open + Step, return the first response or the RpcError."""
    opts = [("grpc.ssl_target_name_override", name)] if (creds is not None and name) else []
    channel = grpc.secure_channel(address, creds, options=opts) if creds is not None else grpc.insecure_channel(address)
    prompt = [1, 2, 3, 1, 2]
    msgs = [
        draft_pb2.DraftRequest(open=draft_pb2.Open(request_id="r1", prompt_token_ids=prompt,
                                                   options=draft_pb2.DrafterOptions(kind="ngram", block_len=3))),
        draft_pb2.DraftRequest(step=draft_pb2.Step(request_id="r1", step_id=1, new_token_ids=prompt,
                                                   context_len=len(prompt), anchor_token_id=3, block_len=3)),
    ]
    try:
        call = draft_pb2_grpc.DraftServiceStub(channel).Draft(iter(msgs), metadata=metadata, timeout=20)
        return next(iter(call))
    except grpc.RpcError as exc:
        return exc
    finally:
        channel.close()


def _ca_creds(pki):
    with open(pki["ca"], "rb") as f:
        return grpc.ssl_channel_credentials(root_certificates=f.read())


def test_tls_with_token_drafts(tls_worker, pki):
    resp = _draft_call(tls_worker.address, _ca_creds(pki), (("authorization", f"Bearer {TOKEN}"),))
    assert not isinstance(resp, grpc.RpcError), resp
    assert resp.WhichOneof("kind") == "block" and list(resp.block.draft_token_ids) == [1, 2, 3]


@pytest.mark.parametrize("metadata", [None, (("authorization", "Bearer wrong"),), (("authorization", TOKEN),),
                                      (("authorization", f"Bearer {TOKEN}x"),)],
                         ids=["missing", "wrong", "no-scheme", "longer"])
def test_wrong_or_missing_token_is_unauthenticated(tls_worker, pki, metadata):
    resp = _draft_call(tls_worker.address, _ca_creds(pki), metadata)
    assert isinstance(resp, grpc.RpcError) and resp.code() == grpc.StatusCode.UNAUTHENTICATED, resp


def test_plaintext_and_untrusted_clients_cannot_connect(tls_worker, tmp_path):
    md = (("authorization", f"Bearer {TOKEN}"),)
    plain = _draft_call(tls_worker.address, None, md)
    assert isinstance(plain, grpc.RpcError) and plain.code() == grpc.StatusCode.UNAVAILABLE
    other_ca = make_pki(tmp_path)  # a certificate chain the worker's does not belong to
    untrusted = _draft_call(tls_worker.address, _ca_creds(other_ca), md)
    assert isinstance(untrusted, grpc.RpcError) and untrusted.code() == grpc.StatusCode.UNAVAILABLE


def test_remote_drafter_over_tls(tls_worker, pki):
    """The verifier-side client drafts through the TLS worker (the name override is used)."""
    cfg = RemoteDrafterConfig(kind="ngram", token=TOKEN, tls_ca_file=pki["ca"], tls_server_name=SERVER_NAME)
    drafter = RemoteDrafter([tls_worker.address], cfg, block_len=3)
    seq = Sequence(request_id="tls-1", prompt_ids=[5, 6, 7, 5, 6], params=SamplingParams(), generator=None)
    try:
        seq.output_ids = [7]  # after prefill: the prompt is cached, the first token is the anchor
        seq.num_cached = 5
        drafter.observe(seq, [5, 6, 7, 5, 6], None)
        deadline = time.monotonic() + 20
        block = None
        while block is None and time.monotonic() < deadline:
            block = drafter.propose([seq], 3)[0]
            if block is None:
                drafter.wait_for_blocks(0.1)
        assert block is not None and seq.draft_enabled, "no block over TLS"
        assert block.token_ids == [5, 6, 7]
    finally:
        drafter.release(seq.request_id)
        drafter.close()


def test_tls_config_needs_both_files(pki):
    with pytest.raises(ValueError, match="both"):
        DraftWorkerConfig(tls_cert_file=pki["cert"]).server_credentials()


# ---------------------------------------------------------------------------- Redis secrets
def test_redis_password_never_logged(caplog):
    """A password in the Redis URL appears in no log line, repr or error, connected or not."""
    from dspark.cluster.redis_server import RedisServer
    from dspark.cluster.redis_state import RedisState, StateConfig

    password = "pw-" + "x7Q2" * 4
    server = RedisServer().start()
    try:
        import redis

        redis.Redis(host="127.0.0.1", port=server.port).config_set("requirepass", password)
        url = f"redis://:{password}@127.0.0.1:{server.port}/0"

        async def run() -> list[str]:
            seen = []
            async with RedisState(StateConfig(url=url.replace(password, "wrong-pw"), prefix="sec")) as bad:
                assert not await bad.ping()
                try:
                    await bad.alive("router")
                except Exception as exc:  # noqa: BLE001
                    seen.append(str(exc))
            async with RedisState(StateConfig(url=url, prefix="sec")) as st:
                assert await st.ping()  # logs "reachable at <url>"
                await st.heartbeat("router", "r1", {"x": 1})
                server.kill()
                assert not await st.ping()  # logs "unreachable"
                seen.append(repr(st.config))
                try:
                    await st.alive("router")
                except Exception as exc:  # noqa: BLE001
                    seen.append(str(exc))
            return seen

        with caplog.at_level(logging.DEBUG):
            seen = asyncio.run(run())
        text = "\n".join([r.getMessage() for r in caplog.records] + seen)
        assert "reachable at redis://:***@127.0.0.1" in text and "unreachable" in text
        assert password not in text and "wrong-pw" not in text
    finally:
        server.close()
