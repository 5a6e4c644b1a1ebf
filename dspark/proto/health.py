"""Standard gRPC health checking and server reflection for grpc.aio servers.

Every dspark gRPC server (draft workers, the router's generation API)
registers both, so that load balancers and Kubernetes probes can ask
`grpc.health.v1.Health/Check`, and `grpcurl` can list and call services
without local .proto files.

    server = grpc.aio.server()
    draft_pb2_grpc.add_DraftServiceServicer_to_server(servicer, server)
    port = bind_loopback(server)
    health = await add_health_and_reflection(server, [DRAFT_SERVICE])
    await server.start()
    ...
    await set_serving(health, [DRAFT_SERVICE], serving=False)  # draining
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from dspark.proto.dspark.v1 import draft_pb2, generate_pb2

if TYPE_CHECKING:
    import grpc
    from grpc_health.v1.health import aio as health_aio

# Fully qualified service names, as health checks and reflection see them.
DRAFT_SERVICE: str = draft_pb2.DESCRIPTOR.services_by_name["DraftService"].full_name
GENERATION_SERVICE: str = generate_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
# The empty name reports the server as a whole (gRPC health-checking spec).
OVERALL: str = ""


def bind_loopback(server: "grpc.aio.Server", port: int = 0) -> int:
    """Listen on 127.0.0.1 only (plaintext); port 0 picks a free one. Returns the port."""
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    if bound == 0:
        raise OSError(f"could not bind 127.0.0.1:{port}")
    return bound


async def set_serving(
    health: "health_aio.HealthServicer", service_names: Iterable[str], serving: bool = True
) -> None:
    """Report each service (and the server as a whole) as SERVING or NOT_SERVING."""
    from grpc_health.v1 import health_pb2

    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in (OVERALL, *service_names):
        await health.set(name, status)


async def add_health_and_reflection(
    server: "grpc.aio.Server",
    service_names: Iterable[str],
    *,
    serving: bool = True,
    reflection: bool = True,
) -> "health_aio.HealthServicer":
    """Add grpc.health.v1 (and, by default, reflection) to a grpc.aio server.

    Call before `server.start()`. The given services and the overall server
    start as SERVING (or NOT_SERVING with serving=False, e.g. until a model
    has loaded); flip them later with `set_serving`. On shutdown call
    `await health.enter_graceful_shutdown()` so watchers see NOT_SERVING.
    Returns the health servicer.
    """
    # Lazy: grpcio-health-checking / grpcio-reflection are serving extras.
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1.health import aio as health_aio

    names = list(service_names)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await set_serving(health, names, serving)
    if reflection:
        from grpc_reflection.v1alpha import reflection as grpc_reflection

        exposed = [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        grpc_reflection.enable_server_reflection([*exposed, grpc_reflection.SERVICE_NAME], server)
    return health
