"""The cluster's configuration: the application arguments and what is derived from them.

``ClusterConfig`` is the ``args`` of the Serve config (``deploy/serve_config.yaml``), one frozen
dataclass every role receives whole.  The helpers here turn it into what a role needs at start-up
(bind addresses, the internal token and TLS files from the environment, a draft worker's serving
settings, the Redis state client), so the roles' modules (``app``, ``router_app``,
``verifier_group``) import this module and never each other.  Importing it imports neither Ray
nor Redis.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dspark.workers.drafters import registry

if TYPE_CHECKING:
    from dspark.cluster.redis_state import RedisState
    from dspark.workers.draft_worker import DraftWorkerConfig


@dataclass(frozen=True)
class ClusterConfig:
    """Application arguments (the ``args`` of the Serve config); every field has a default."""

    model: str | None = None  # GGUF file or HF folder; None/"default" = embedded SmolLM2-135M-Instruct
    dtype: str = "bf16"  # bf16 | fp32 | fp16
    weights: str = "dense"  # dense | q4: the verifier multiplies a GGUF file's 4-bit blocks as stored
    device: str = "cpu"  # cpu | cuda
    tp: int = 1  # tensor-parallel ranks per verifier group
    draft: str = "dspark"  # "none" or a registered drafter kind (dspark.workers.drafters.registry)
    draft_workers: int = 2  # DraftWorker replicas (drafter kinds that can run remotely)
    block_len: int = 7  # draft block length (gamma)
    verify_policy: str = "fixed"  # fixed | adaptive (confidence-scheduled, global scheduler)
    # adaptive only: skip drafting on steps where measured throughput says speculation does not pay
    speculation_gate: bool = True
    redis_url: str | None = field(default=None, repr=False)  # Redis for heartbeats, discovery, demand, policy
    redis_url_env: str = "DSPARK_REDIS_URL"  # env var read when redis_url is not given
    redis_prefix: str = "dspark"  # key prefix (several clusters can share one Redis)
    n_slots: int = 32  # concurrent requests per verifier group (KV cache slots)
    max_seq: int = 2048  # longest request: prompt + output + one block
    max_prefill_tokens: int = 512  # chunked-prefill budget per step
    deterministic: bool = False  # row-invariant verifier kernels (RunnerConfig.deterministic)
    compile: bool = False  # the verifier's step through torch.compile (RunnerConfig.compile); `dspark serve` turns it on
    kv_layout: str = "slot"  # the verifier's KV cache: slot | paged (RunnerConfig.kv_layout)
    cuda_graphs: bool = False  # decode/verify steps from CUDA graphs (RunnerConfig.cuda_graphs); serve: on with CUDA
    torch_threads: int = 0  # threads per compute process; 0 = (cores - 1) / compute processes, at least 1
    grpc_port: int = 0  # router's GenerationService port; 0 = disabled
    http_body_timeout_s: float = 30.0  # an HTTP request body not received in full by then is answered 408
    http_header_timeout_s: float = 10.0  # request line + headers not received by then: 408 and close (Serve's proxy)
    bind_host: str = "127.0.0.1"  # where the router's gRPC API listens ("auto": node IP)
    internal_host: str = "127.0.0.1"  # where draft workers listen, apart from the public API ("auto": node IP)
    draft_options: dict = field(default_factory=dict)  # drafter settings (e.g. head=PATH)
    internal_token_env: str = "DSPARK_INTERNAL_TOKEN"  # verifier <-> draft worker shared secret
    internal_token: str | None = field(default=None, repr=False)  # the secret itself; build_app generates one if unset
    internal_tls_cert_env: str = "DSPARK_INTERNAL_TLS_CERT"  # draft workers' PEM certificate file (TLS when set)
    internal_tls_key_env: str = "DSPARK_INTERNAL_TLS_KEY"  # draft workers' PEM private key file
    internal_tls_ca_env: str = "DSPARK_INTERNAL_TLS_CA"  # PEM CA file verifiers trust for draft workers
    internal_tls_name_env: str = "DSPARK_INTERNAL_TLS_SERVER_NAME"  # name checked in workers' certificates
    api_key_env: str = "DSPARK_API_KEY"  # client API key (HTTP Bearer, gRPC metadata)
    block_timeout_s: float = 10.0  # a draft block later than this -> plain decoding for that request
    draft_stream_quota: int = 0  # requests one verifier may hold open on a draft worker (0: half its slots)
    # requests that arrive while a verifier (tp 1) drafts for fewer than this are drafted in its own process
    # (the round trip to a worker costs more than drafting there at one request); 0: always on workers
    local_draft_below: int = 1
    draft_idle_release_s: float = 60.0  # a draft worker frees a request with no step for this long
    scheduler_interval_s: float = 0.5  # global scheduler period (adaptive policy)
    target_tokens_per_s_per_user: float = 0.0  # per-user speed target for the scheduler (0: none)

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> "ClusterConfig":
        args = dict(args or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown application arguments: {', '.join(unknown)}")
        if args.get("model") in ("default", ""):
            args["model"] = None
        cfg = cls(**args)
        if cfg.verify_policy not in ("fixed", "adaptive"):
            raise ValueError("verify_policy must be fixed or adaptive")
        if cfg.tp < 1 or cfg.block_len < 0 or cfg.draft_workers < 0 or cfg.torch_threads < 0:
            raise ValueError("tp >= 1, block_len >= 0, draft_workers >= 0 and torch_threads >= 0 are required")
        if cfg.draft_stream_quota < 0 or cfg.draft_idle_release_s <= 0 or cfg.local_draft_below < 0:
            raise ValueError("draft_stream_quota >= 0, local_draft_below >= 0 and draft_idle_release_s > 0 are required")
        if cfg.kv_layout not in ("slot", "paged"):
            raise ValueError(f"kv_layout must be slot or paged, not {cfg.kv_layout!r}")
        if cfg.weights not in ("dense", "q4"):
            raise ValueError(f"weights must be dense or q4, not {cfg.weights!r}")
        if cfg.weights == "q4" and (cfg.device != "cpu" or cfg.tp > 1 or cfg.dtype not in ("bf16", "fp32")):
            raise ValueError("--weights q4 runs on the CPU, one rank, in bf16 or fp32")
        if cfg.cuda_graphs and (cfg.kv_layout != "slot" or cfg.deterministic or cfg.tp > 1):
            raise ValueError("--cuda-graphs serves one rank on the slot KV layout without --deterministic; "
                             "pass --no-cuda-graphs")
        if cfg.draft != "none":  # an unknown kind or option is refused here, naming it
            registry.parse_options(cfg.draft, cfg.draft_options)
        return cfg

    @property
    def remote_draft(self) -> bool:
        """Drafting happens on draft workers: the kind can run remotely and there are workers."""
        return self.draft != "none" and registry.get(self.draft).remote and self.draft_workers > 0

    @property
    def max_context(self) -> int:
        return self.max_seq - self.block_len - 1

    @property
    def draft_slots(self) -> int:
        """Requests one draft worker holds at once (its drafter's cache slots): four groups' worth."""
        return 4 * self.n_slots

    def redis(self) -> str:
        url = self.redis_url or os.environ.get(self.redis_url_env)
        if not url:
            raise RuntimeError(f"no Redis: set redis_url or ${self.redis_url_env}")
        return url

    def threads(self) -> int:
        """Torch threads of each compute process (verifier ranks, draft workers): ``torch_threads``,
        else the host's cores but one divided among them.  The core left over serves the roles
        around them (router, Serve's proxy, event loops), which wake at every step: measured on a
        2-core host, a verifier with both cores and no draft worker decoded one request at 17.9-20.6
        tok/s against 24.1-29.8 with one (docs/BENCHMARKS.md, "Threads of a verifier alone").
        The host's cores are those this process may use within its container's CPU limit
        (``dspark.omp.usable_cpus``), not the node's."""
        from dspark.omp import usable_cpus

        if self.torch_threads > 0:
            return self.torch_threads
        procs = self.tp + (self.draft_workers if self.remote_draft else 0)
        return max(1, (usable_cpus() - 1) // max(1, procs))

    def host(self) -> str:
        """Bind address of the public gRPC API."""
        return resolve_host(self.bind_host)

    def internal_bind(self) -> str:
        """Bind address of the draft workers' DraftService: ``internal_host``, never ``bind_host``."""
        return resolve_host(self.internal_host)

    def internal_secret(self) -> str | None:
        """The verifier <-> draft worker token: the configured one, else ``$internal_token_env``."""
        return self.internal_token or env_secret(self.internal_token_env)

    def with_internal_token(self) -> "ClusterConfig":
        """This config with a fresh random internal token when none is configured, so the internal
        link is authenticated by default.  Called once at start-up (``build_app``); the token then
        reaches every role through the application arguments and is never logged."""
        if self.internal_secret():
            return self
        return dataclasses.replace(self, internal_token=secrets.token_urlsafe(32))


def resolve_host(host: str) -> str:
    """``host`` itself, or for ``"auto"`` this node's IP (Ray's view of it when Ray is up)."""
    if host != "auto":
        return host
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        return socket.gethostbyname(socket.gethostname())


def env_secret(env: str) -> str | None:
    """The value of environment variable ``env``; None when it is unset or empty."""
    return os.environ.get(env) or None


@dataclass(frozen=True)
class InternalTLS:
    """TLS of the verifier <-> draft worker link, from the environment (all None: plaintext)."""

    cert_file: str | None = None  # draft worker side
    key_file: str | None = None
    ca_file: str | None = None  # verifier side
    server_name: str | None = None  # checked instead of the address (workers register IPs)

    @classmethod
    def from_env(cls, cfg: "ClusterConfig") -> "InternalTLS":
        tls = cls(env_secret(cfg.internal_tls_cert_env), env_secret(cfg.internal_tls_key_env),
                  env_secret(cfg.internal_tls_ca_env), env_secret(cfg.internal_tls_name_env))
        if bool(tls.cert_file) != bool(tls.key_file):
            raise ValueError(f"set both ${cfg.internal_tls_cert_env} and ${cfg.internal_tls_key_env}, or neither")
        return tls


def draft_worker_config(cfg: ClusterConfig) -> "DraftWorkerConfig":
    """How a draft worker of this cluster serves: internal bind address, token, TLS, quotas."""
    from dspark.workers.draft_worker import DraftWorkerConfig

    token = cfg.internal_secret()
    if not token:  # build_app always sets one; refuse to open the port without it
        raise ValueError(f"no internal token: set ${cfg.internal_token_env} or start the app through build_app")
    tls = InternalTLS.from_env(cfg)
    return DraftWorkerConfig(
        host=cfg.internal_bind(), port=0, token=token, tls_cert_file=tls.cert_file, tls_key_file=tls.key_file,
        max_requests=cfg.draft_slots, max_requests_per_stream=cfg.draft_stream_quota,
        idle_release_s=cfg.draft_idle_release_s,
    )


def cluster_state(cfg: ClusterConfig) -> "RedisState":
    """The Redis state client of this cluster (heartbeats, discovery, demand, policy)."""
    from dspark.cluster.redis_state import RedisState, StateConfig

    return RedisState(StateConfig(url=cfg.redis(), prefix=cfg.redis_prefix))


__all__ = ["ClusterConfig", "InternalTLS", "cluster_state", "draft_worker_config", "env_secret", "resolve_host"]
