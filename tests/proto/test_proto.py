"""Protocol: generated code is current, messages round-trip, tensors pack
safely, and an in-process grpc.aio server answers health and reflection."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
import torch

grpc = pytest.importorskip("grpc")
pytest.importorskip("grpc_tools")

from dspark.proto import generate as gen  # noqa: E402
from dspark.proto.dspark.v1 import (  # noqa: E402
    draft_pb2,
    draft_pb2_grpc,
    generate_pb2,
)
from dspark.proto.tensors import (  # noqa: E402
    SUPPORTED_DTYPES,
    tensor_from_proto,
    tensor_from_proto_bytes,
    tensor_to_proto,
    tensor_to_proto_bytes,
)

# The toolchain stamps its own version into the code it writes; a patch release of
# grpcio-tools changes nothing else. Staleness is judged on the code with the stamps blanked.
_STAMPS = (
    re.compile(rb"^(GRPC_GENERATED_VERSION = )'[^']*'$", re.M),
    re.compile(rb"^(# Protobuf Python Version: )\S+$", re.M),
    re.compile(rb"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,)\s*\d+,\s*\d+,\s*\d+,"),
)


def _unstamped(code: bytes) -> bytes:
    for stamp in _STAMPS:
        code = stamp.sub(rb"\1<version>", code)
    return code


def test_version_stamps_are_blanked_and_nothing_else() -> None:
    committed = Path(draft_pb2_grpc.__file__).read_bytes()
    assert b"<version>" in _unstamped(committed)
    bumped = re.sub(rb"GRPC_GENERATED_VERSION = '[^']*'", b"GRPC_GENERATED_VERSION = '9.99.9'", committed)
    assert bumped != committed and _unstamped(bumped) == _unstamped(committed)
    pb2 = Path(draft_pb2.__file__).read_bytes()
    assert _unstamped(pb2).count(b"<version>") == 2
    # A change to the code itself still shows.
    assert _unstamped(committed.replace(b"DraftService", b"DraftServise", 1)) != _unstamped(committed)


def test_regenerated_code_is_byte_identical(tmp_path: Path) -> None:
    written = gen.generate(tmp_path)
    assert len(written) == 3 * len(gen.proto_files()) >= 6
    for rel in gen.generated_names():
        fresh = (tmp_path / rel).read_bytes()
        committed_path = gen.PROTO_ROOT / rel
        assert committed_path.exists(), f"{rel} is not committed; run python -m dspark.proto.generate"
        committed = committed_path.read_bytes()
        assert _unstamped(committed) == _unstamped(fresh), f"{rel} is stale; run python -m dspark.proto.generate"


def test_generation_is_deterministic(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    gen.generate(a)
    gen.generate(b)
    for rel in gen.generated_names():
        assert (a / rel).read_bytes() == (b / rel).read_bytes()


def test_generated_modules_import_from_the_package() -> None:
    from dspark.proto.dspark.v1 import generate_pb2_grpc

    assert draft_pb2.DESCRIPTOR.package == "dspark.v1"
    assert draft_pb2.DESCRIPTOR.services_by_name["DraftService"].full_name == "dspark.v1.DraftService"
    assert hasattr(draft_pb2_grpc, "DraftServiceStub")
    assert hasattr(generate_pb2_grpc, "GenerationServiceStub")
    # The grpc module imports its messages through the package path, not a top-level one.
    src = Path(draft_pb2_grpc.__file__).read_text()
    assert "from dspark.proto.dspark.v1 import draft_pb2" in src


# ---------------------------------------------------------------- messages


def _roundtrip(msg):
    return type(msg).FromString(msg.SerializeToString())


def test_draft_request_oneof_roundtrip() -> None:
    open_ = draft_pb2.DraftRequest(
        open=draft_pb2.Open(
            request_id="r1",
            prompt_token_ids=[1, 2, 3],
            options=draft_pb2.DrafterOptions(
                kind="dspark", block_len=7, temperature=0.7, proposal_top_k=8, seed=42, extra={"a": "b"}
            ),
        )
    )
    back = _roundtrip(open_)
    assert back.WhichOneof("kind") == "open"
    assert back == open_
    assert back.open.options.HasField("seed") and back.open.options.seed == 42
    assert not draft_pb2.DrafterOptions().HasField("seed")

    feats = torch.randn(3, 16).to(torch.bfloat16)
    step = draft_pb2.DraftRequest(
        step=draft_pb2.Step(
            request_id="r1",
            step_id=2**40 + 5,
            new_token_ids=[9, 10, 11],
            features=tensor_to_proto(feats),
            context_len=6,
            anchor_token_id=12,
            block_len=4,
        )
    )
    back = _roundtrip(step)
    assert back.WhichOneof("kind") == "step"
    assert back.step.step_id == 2**40 + 5
    assert torch.equal(tensor_from_proto(back.step.features, ndim=2), feats)

    close = _roundtrip(draft_pb2.DraftRequest(close=draft_pb2.Close(request_id="r1", reason=draft_pb2.CLOSE_REASON_FINISHED)))
    assert close.WhichOneof("kind") == "close"
    assert close.close.reason == draft_pb2.CLOSE_REASON_FINISHED

    # Setting one member of the oneof clears the other.
    req = draft_pb2.DraftRequest(open=draft_pb2.Open(request_id="x"))
    req.close.request_id = "x"
    assert req.WhichOneof("kind") == "close" and not req.HasField("open")


def test_draft_block_sparse_proposals_roundtrip() -> None:
    k = 2
    block = draft_pb2.DraftBlock(
        request_id="r1",
        step_id=3,
        draft_token_ids=[5, 6],
        proposal_k=k,
        proposal_token_ids=[5, 7, 6, 0],
        proposal_probs=[0.75, 0.25, 1.0, 0.0],
        confidences=[0.9, 0.5],
        draft_time_us=1234,
    )
    back = _roundtrip(draft_pb2.DraftResponse(block=block)).block
    assert list(back.draft_token_ids) == [5, 6]
    rows = [
        dict(zip(back.proposal_token_ids[i * k : (i + 1) * k], back.proposal_probs[i * k : (i + 1) * k]))
        for i in range(len(back.draft_token_ids))
    ]
    assert rows == [{5: 0.75, 7: 0.25}, {6: 1.0, 0: 0.0}]
    assert back.confidences == pytest.approx([0.9, 0.5])
    # proposal_k == 0: one-hot proposals, nothing else sent.
    greedy = _roundtrip(draft_pb2.DraftBlock(request_id="r", draft_token_ids=[1]))
    assert greedy.proposal_k == 0 and not greedy.proposal_probs

    err = _roundtrip(draft_pb2.DraftResponse(error=draft_pb2.DraftError(request_id="r", step_id=1, message="boom")))
    assert err.WhichOneof("kind") == "error" and err.error.message == "boom"


def test_generate_messages_roundtrip() -> None:
    chat = generate_pb2.GenerateRequest(
        messages=generate_pb2.ChatMessages(items=[generate_pb2.ChatMessage(role="user", content="hi")]),
        max_tokens=32,
        temperature=0.0,
        stop=["\n\n"],
        model="smollm2-135m",
    )
    back = _roundtrip(chat)
    assert back.WhichOneof("input") == "messages"
    assert back.messages.items[0].content == "hi"
    # temperature=0 (greedy) is distinguishable from "unset".
    assert back.HasField("temperature") and back.temperature == 0.0
    assert not back.HasField("top_p") and not back.HasField("seed")

    ids = _roundtrip(generate_pb2.GenerateRequest(prompt_token_ids=generate_pb2.TokenIds(ids=[1, 2])))
    assert ids.WhichOneof("input") == "prompt_token_ids" and list(ids.prompt_token_ids.ids) == [1, 2]
    assert _roundtrip(generate_pb2.GenerateRequest(prompt="p")).WhichOneof("input") == "prompt"

    resp = generate_pb2.GenerateResponse(
        request_id="r",
        text="hello",
        token_ids=[3, 4],
        finish_reason=generate_pb2.FINISH_REASON_LENGTH,
        usage=generate_pb2.Usage(prompt_tokens=5, completion_tokens=2),
        spec_metrics=generate_pb2.SpecMetrics(
            num_drafts=1, num_draft_tokens=7, num_accepted_tokens=1, mean_acceptance_length=2.0
        ),
    )
    assert _roundtrip(resp) == resp


# ---------------------------------------------------------------- tensors


@pytest.mark.parametrize("name", SUPPORTED_DTYPES)
def test_tensor_roundtrip_each_dtype(name: str) -> None:
    dtype = getattr(torch, name)
    x = (torch.randn(4, 5) * 100).to(dtype)
    data, got_name, shape = tensor_to_proto_bytes(x)
    assert got_name == name and shape == (4, 5)
    assert len(data) == 20 * x.element_size()
    y = tensor_from_proto_bytes(data, name, shape)
    assert y.dtype == dtype and torch.equal(x, y)
    assert torch.equal(tensor_from_proto_bytes(data, dtype, shape), x)  # torch.dtype accepted too


def test_tensor_bytes_are_little_endian_and_owned() -> None:
    data, _, _ = tensor_to_proto_bytes(torch.tensor([1.0], dtype=torch.float16))
    assert data == b"\x00\x3c"
    data, _, _ = tensor_to_proto_bytes(torch.tensor([1.0], dtype=torch.bfloat16))
    assert data == b"\x80\x3f"
    buf = bytearray(b"\x00\x3c")
    y = tensor_from_proto_bytes(buf, "float16", [1])
    buf[1] = 0
    assert y.item() == 1.0  # a copy, not a view of the caller's buffer


def test_tensor_noncontiguous_and_empty() -> None:
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # non-contiguous [4, 3]
    data, name, shape = tensor_to_proto_bytes(x)
    assert torch.equal(tensor_from_proto_bytes(data, name, shape), x)
    empty = torch.empty(0, 8, dtype=torch.float16)
    data, name, shape = tensor_to_proto_bytes(empty)
    assert data == b"" and shape == (0, 8)
    assert tensor_from_proto_bytes(data, name, shape).shape == (0, 8)


@pytest.mark.parametrize(
    "data, dtype, shape, kwargs",
    [
        (b"\x00" * 8, "float64", [1], {}),  # not whitelisted
        (b"\x00" * 8, "int64", [1], {}),
        (b"\x00" * 8, torch.int64, [1], {}),
        (b"\x00" * 8, "pickle", [1], {}),
        (b"\x00" * 6, "float32", [2], {}),  # too short
        (b"\x00" * 10, "float32", [2], {}),  # too long
        (b"\x00" * 8, "float32", [-1, -2], {}),  # negative dims
        (b"\x00" * 8, "float32", [True, 2], {}),  # bools are not dims
        (b"\x00" * 8, "float32", [2.0], {}),  # floats are not dims
        (b"\x00" * 8, "float32", "ab", {}),
        (b"\x00" * 8, "float32", [2], {"ndim": 2}),  # wrong rank
        (b"\x00" * 8, "float32", [2], {"max_bytes": 4}),  # over the limit
        (b"\x00" * 4, "float32", [1] * 9, {}),  # absurd rank
        ("text", "float32", [1], {}),  # not bytes
    ],
)
def test_tensor_from_bytes_rejects_bad_input(data, dtype, shape, kwargs) -> None:
    with pytest.raises(ValueError):
        tensor_from_proto_bytes(data, dtype, shape, **kwargs)


def test_tensor_to_bytes_rejects_other_dtypes() -> None:
    with pytest.raises(ValueError):
        tensor_to_proto_bytes(torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError):
        tensor_to_proto_bytes([1.0, 2.0])  # type: ignore[arg-type]


def test_tensor_proto_message_validation() -> None:
    msg = tensor_to_proto(torch.ones(2, 3, dtype=torch.float32))
    assert msg.dtype == draft_pb2.DTYPE_FLOAT32 and list(msg.shape) == [2, 3]
    with pytest.raises(ValueError):
        tensor_from_proto(draft_pb2.Tensor(dtype=draft_pb2.DTYPE_UNSPECIFIED, shape=[1], data=b"\0\0\0\0"))
    with pytest.raises(ValueError):
        tensor_from_proto(draft_pb2.Tensor(dtype=99, shape=[1], data=b"\0\0\0\0"))
    with pytest.raises(ValueError):
        tensor_from_proto(draft_pb2.Tensor(dtype=draft_pb2.DTYPE_FLOAT32, shape=[3], data=b"\0" * 8))


# ---------------------------------------------------------------- in-process server


class _EchoDrafter(draft_pb2_grpc.DraftServiceServicer):
    """Answers each Step with a block of `block_len` copies of the anchor."""

    async def Draft(self, request_iterator, context):
        async for req in request_iterator:
            if req.WhichOneof("kind") == "step":
                s = req.step
                yield draft_pb2.DraftResponse(
                    block=draft_pb2.DraftBlock(
                        request_id=s.request_id,
                        step_id=s.step_id,
                        draft_token_ids=[s.anchor_token_id] * s.block_len,
                        confidences=[1.0] * s.block_len,
                    )
                )


async def _health_reflection_and_stream() -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from dspark.proto.health import DRAFT_SERVICE, add_health_and_reflection, bind_loopback, set_serving

    server = grpc.aio.server()
    draft_pb2_grpc.add_DraftServiceServicer_to_server(_EchoDrafter(), server)
    port = bind_loopback(server)
    health = await add_health_and_reflection(server, [DRAFT_SERVICE])
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            hstub = health_pb2_grpc.HealthStub(channel)
            for name in ("", DRAFT_SERVICE):
                resp = await hstub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await hstub.Check(health_pb2.HealthCheckRequest(service="nope.Service"), timeout=5)
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

            await set_serving(health, [DRAFT_SERVICE], serving=False)
            resp = await hstub.Check(health_pb2.HealthCheckRequest(service=DRAFT_SERVICE), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING

            rstub = reflection_pb2_grpc.ServerReflectionStub(channel)
            call = rstub.ServerReflectionInfo(timeout=5)
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol=DRAFT_SERVICE))
            await call.done_writing()
            replies = [r async for r in call]
            listed = {s.name for s in replies[0].list_services_response.service}
            assert {DRAFT_SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= listed
            assert replies[1].file_descriptor_response.file_descriptor_proto  # descriptor is served

            # The bidi stream multiplexes requests by request_id.
            dstub = draft_pb2_grpc.DraftServiceStub(channel)
            stream = dstub.Draft(timeout=5)
            await stream.write(draft_pb2.DraftRequest(open=draft_pb2.Open(request_id="a")))
            await stream.write(draft_pb2.DraftRequest(step=draft_pb2.Step(request_id="a", step_id=1, anchor_token_id=7, block_len=3)))
            await stream.write(draft_pb2.DraftRequest(step=draft_pb2.Step(request_id="b", step_id=1, anchor_token_id=8, block_len=2)))
            await stream.done_writing()
            blocks = {r.block.request_id: list(r.block.draft_token_ids) async for r in stream}
            assert blocks == {"a": [7, 7, 7], "b": [8, 8]}
    finally:
        await server.stop(grace=None)


def test_health_reflection_and_draft_stream_in_process() -> None:
    asyncio.run(asyncio.wait_for(_health_reflection_and_stream(), timeout=30))
