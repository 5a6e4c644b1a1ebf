"""Offline checks of DSpark's deployment files, without a Kubernetes or Ray cluster.

    python deploy/validate.py      # from the repository root, in the project's virtualenv

* Every RayService (kuberay/rayservice*.yaml: the default and the DeepSeek-V4 variant) against
  the KubeRay CRD's openAPIV3Schema, made strict the way `kubectl apply` is (unknown fields are
  errors). The CRD is read from the project's shared folder: DSPARK_SHARED_DIR, else `shared/`
  beside the repository.
* The Ray Serve configs (each RayService's serveConfigV2 and serve_config.yaml) against Ray
  Serve's ServeDeploySchema, the checks Serve runs when it creates replicas (placement group
  strategy, replica actor inside bundle 0), and unknown keys, which ServeDeploySchema drops.
* Placement: each deployment asks for a custom resource only its pod group provides, fits in
  one pod, and the deployments' maxima fit in the groups' maxima, with each group's Ray
  resources computed by Ray's own KubeRay autoscaler code.
* The application: its arguments are accepted by dspark's own parser; the config sizes exactly
  the deployments the app creates for them (no DraftWorker without remote drafting, no
  Scheduler without adaptive verification); one GPU bundle per tensor-parallel rank with
  device cuda, the verifier pod's GPUs equal to the group size; a model path lies on a volume
  mounted in every pod group that reads it, and a claimed volume is defined beside it.

tests/deploy/test_deploy.py runs the same checks, plus negative controls that prove each one bites.
Needs pyyaml, jsonschema and ray[serve] (the project's `serve` and `test` extras).
"""

from __future__ import annotations

import copy
import math
import os
import sys
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent
REPO = DEPLOY.parent
KUBERAY = DEPLOY / "kuberay"
RAYSERVICE = KUBERAY / "rayservice.yaml"  # the default; variants are rayservice-<name>.yaml
RAYSERVICES = sorted(KUBERAY.glob("rayservice*.yaml"))
SERVE_CONFIG = DEPLOY / "serve_config.yaml"
CRD_NAME = "ray.io_rayservices.yaml"
# Ray's predefined resources; any other key in a bundle or in ray_actor_options is custom.
BUILTIN_RESOURCES = {"CPU", "GPU", "TPU", "memory", "object_store_memory"}


def shared_dir() -> Path:
    """The project's shared folder: DSPARK_SHARED_DIR, else a sibling of the repository."""
    env = os.environ.get("DSPARK_SHARED_DIR")
    return Path(env) if env else REPO.parent / "shared"


def crd_path() -> Path:
    return shared_dir() / "schemas" / CRD_NAME


# ------------------------------------------------------------------ loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML keeps the last one silently)."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen and key != "<<":
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_all(text: str) -> list:
    return [doc for doc in yaml.load_all(text, Loader=_UniqueKeyLoader) if doc is not None]


def load_docs(path: Path) -> list[dict]:
    return load_all(path.read_text())


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d.get("kind") == kind}


def the_rayservice(path: Path = RAYSERVICE) -> dict:
    (service,) = by_kind(load_docs(path), "RayService").values()
    return service


def serve_config_of(rayservice: dict) -> dict:
    return load_all(rayservice["spec"]["serveConfigV2"])[0]


def the_app(serve_cfg: dict) -> dict:
    (app,) = serve_cfg["applications"]
    return app


def deployments_of(serve_cfg: dict) -> dict[str, dict]:
    return {d["name"]: d for d in the_app(serve_cfg)["deployments"]}


def ray_groups(rayservice: dict) -> list[tuple[str, dict]]:
    """(name, group spec) for the head group and each worker group."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    return [("headgroup", cluster["headGroupSpec"])] + [
        (g["groupName"], g) for g in cluster["workerGroupSpecs"]
    ]


def ray_container(group: dict) -> dict:
    # KubeRay treats the first container of a Ray pod as the Ray container.
    return group["template"]["spec"]["containers"][0]


# ------------------------------------------------------------------ the KubeRay CRD


INT32 = (-(2**31), 2**31 - 1)
NOT_SCHEMAS = {"default", "enum", "example", "x-kubernetes-validations"}


def strict_schema(node):
    """A copy of an OpenAPI v3 structural schema for jsonschema, as the API server applies it.

    * objects with declared `properties` reject other fields (strict field validation),
      unless they say `x-kubernetes-preserve-unknown-fields`;
    * `nullable: true` admits null;
    * int32 fields get their range.
    Other `x-kubernetes-*` keys and formats (int-or-string comes with an explicit anyOf) are
    left to jsonschema, which ignores keywords and formats it does not know.
    """
    if isinstance(node, list):
        return [strict_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in NOT_SCHEMAS:
            out[key] = value
        elif key == "properties":
            out[key] = {name: strict_schema(sub) for name, sub in value.items()}
        else:
            out[key] = strict_schema(value)
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    if node.get("format") == "int32":
        out.setdefault("minimum", INT32[0])
        out.setdefault("maximum", INT32[1])
    return out



def crd_errors(validator, doc) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


def crd_validator(path: Path):
    """A jsonschema validator for RayService documents, from the CRD file at `path`."""
    import jsonschema

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is ~1 MB
    crd = yaml.load(path.read_text(), Loader=loader)
    if crd.get("kind") != "CustomResourceDefinition" or crd["spec"]["names"]["kind"] != "RayService":
        raise ValueError(f"{path} is not the RayService CRD")
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict_schema(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


# ------------------------------------------------------------------ Ray Serve


def _field_names(model) -> set[str]:
    fields = getattr(model, "model_fields", None)
    if fields is None:  # pydantic v1
        fields = model.__fields__
    names = set(fields)
    names |= {f.alias for f in fields.values() if getattr(f, "alias", None)}
    return names


def serve_config_problems(cfg: dict) -> list[str]:
    """What Ray Serve would refuse in a config, as readable lines (empty: acceptable)."""
    from ray.serve import schema
    from ray.serve._private.config import ReplicaConfig
    from ray.serve.config import AutoscalingConfig

    problems: list[str] = []
    check = getattr(schema.ServeDeploySchema, "model_validate", None) or schema.ServeDeploySchema.parse_obj
    try:
        check(cfg)
    except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
        problems.append(f"ServeDeploySchema: {exc}")

    # ServeDeploySchema ignores unknown keys; a misspelt option would silently not apply.
    def unknown(where: str, mapping, model) -> None:
        if isinstance(mapping, dict):
            extra = set(mapping) - _field_names(model)
            if extra:
                problems.append(f"{where}: unknown keys {sorted(extra)}")

    unknown("config", cfg, schema.ServeDeploySchema)
    unknown("http_options", cfg.get("http_options"), schema.HTTPOptionsSchema)
    unknown("grpc_options", cfg.get("grpc_options"), schema.gRPCOptionsSchema)
    for app in cfg.get("applications") or []:
        unknown(f"application {app.get('name')}", app, schema.ServeApplicationSchema)
        for dep in app.get("deployments") or []:
            where = f"deployment {dep.get('name')}"
            unknown(where, dep, schema.DeploymentSchema)
            unknown(f"{where} ray_actor_options", dep.get("ray_actor_options"), schema.RayActorOptionsSchema)
            unknown(f"{where} autoscaling_config", dep.get("autoscaling_config"), AutoscalingConfig)
            # What Serve checks when it creates the replicas: actor options, the placement
            # group (strategy, bundles) and that the replica actor fits in bundle 0.
            try:
                ReplicaConfig.create(
                    app.get("import_path", "module:attr"),
                    ray_actor_options=copy.deepcopy(dep.get("ray_actor_options")),
                    placement_group_bundles=copy.deepcopy(dep.get("placement_group_bundles")),
                    placement_group_strategy=dep.get("placement_group_strategy"),
                )
            except (ValueError, TypeError) as exc:
                problems.append(f"{where}: {exc}")
    return problems


# ------------------------------------------------------------------ placement on pod groups


def replica_demand(dep: dict) -> dict[str, float]:
    """What one replica reserves: its placement group's bundles (on one node under STRICT_PACK),
    else its actor."""
    bundles = dep.get("placement_group_bundles")
    if bundles:
        total: dict[str, float] = {}
        for bundle in bundles:
            for key, amount in bundle.items():
                total[key] = total.get(key, 0) + amount
        return total
    opts = dep.get("ray_actor_options") or {}
    demand = {"CPU": opts.get("num_cpus", 1), "GPU": opts.get("num_gpus", 0), **opts.get("resources", {})}
    return {k: v for k, v in demand.items() if v}


def group_resources(rayservice: dict) -> dict[str, dict]:
    """Ray resources per pod group, computed by Ray's own KubeRay autoscaler code."""
    from ray.autoscaler._private.kuberay import autoscaling_config as config

    cluster = rayservice["spec"]["rayClusterConfig"]
    derived = config._derive_autoscaling_config_from_ray_cr(
        {"metadata": {"name": rayservice["metadata"]["name"], "namespace": "default"}, "spec": cluster}
    )
    return derived["available_node_types"]


def placement_problems(serve_cfg: dict, rayservice: dict) -> list[str]:
    """Each deployment is pinned to a pod group by a custom resource, one replica fits in one
    pod, and at their maxima the deployments fit in their groups' maxReplicas pods."""
    groups = group_resources(rayservice)
    problems: list[str] = []
    pinned: dict[str, dict[str, float]] = {}
    for name, dep in deployments_of(serve_cfg).items():
        demand = replica_demand(dep)
        if dep.get("placement_group_bundles") and dep.get("placement_group_strategy") != "STRICT_PACK":
            problems.append(f"{name}: only STRICT_PACK keeps a replica's bundles (TP ranks) on one pod")
        custom = {k for k in demand if k not in BUILTIN_RESOURCES}
        if not custom:
            problems.append(f"{name} names no custom resource, so it may land on any pod group")
        for resource in sorted(custom):
            if not any(resource in g["resources"] for g in groups.values()):
                problems.append(f"{name} asks for {resource!r}, which no pod group provides")
        hosts = {
            group: math.floor(min(g["resources"].get(k, 0) / v for k, v in demand.items()) + 1e-9)
            for group, g in groups.items()
        }
        hosts = {group: per_pod for group, per_pod in hosts.items() if per_pod >= 1}
        if not hosts:
            problems.append(f"{name} needs {demand} on one pod; no pod group has that")
            continue
        scaling = dep.get("autoscaling_config")
        most = scaling.get("max_replicas") if scaling else dep.get("num_replicas", 1)
        if not isinstance(most, int):
            problems.append(f"{name}: give num_replicas or autoscaling_config.max_replicas as a number")
            continue
        room = sum(per_pod * max(groups[group]["max_workers"], 1 if group == "headgroup" else 0)
                   for group, per_pod in hosts.items())
        if most > room:
            problems.append(f"{name} may scale to {most} replicas but its pod groups hold {room}")
        if len(hosts) == 1:
            (group,) = hosts
            for key, amount in demand.items():
                pinned.setdefault(group, {}).setdefault(key, 0.0)
                pinned[group][key] += amount * most
    # Deployments pinned to the same group share its pods: their maxima must fit together.
    for group, needed in pinned.items():
        pods = max(groups[group]["max_workers"], 1 if group == "headgroup" else 0)
        for key, amount in needed.items():
            have = groups[group]["resources"].get(key, 0) * pods
            if amount > have + 1e-9:
                problems.append(
                    f"at their maxima the deployments on {group} need {amount} {key}, it has {have}"
                )
    return problems


# ------------------------------------------------------------------ the application


def app_deployments(args: dict) -> set[str]:
    """The deployments dspark's build_app creates for these application arguments."""
    from dspark.cluster.config import ClusterConfig

    cfg = ClusterConfig.from_args(args)
    return ({"Router", "Verifier"} | ({"DraftWorker"} if cfg.remote_draft else set())
            | ({"Scheduler"} if cfg.verify_policy == "adaptive" else set()))  # fmt: skip


def deployment_problems(serve_cfg: dict) -> list[str]:
    """The app's arguments are refused, or the config sizes other deployments than it creates."""
    try:
        expected = app_deployments(the_app(serve_cfg).get("args") or {})
    except (ValueError, TypeError) as exc:
        return [f"application args: {exc}"]
    listed = set(deployments_of(serve_cfg))
    extra = [f"deployment {n} is configured but the app does not create it with these args"
             for n in sorted(listed - expected)]
    return extra + [f"the app creates deployment {n}, which the config does not size" for n in sorted(expected - listed)]


def _mounts(group: dict) -> dict[str, str]:
    """mountPath -> volume name of a pod group's Ray container."""
    return {m["mountPath"]: m["name"] for m in ray_container(group).get("volumeMounts", [])}


def app_problems(serve_cfg: dict, rayservice: dict, docs: list[dict]) -> list[str]:
    """What dspark's application would refuse or could not do with this RayService (see the
    module docstring), as readable lines."""
    args = the_app(serve_cfg).get("args") or {}
    problems = deployment_problems(serve_cfg)
    if problems:
        return problems
    expected = app_deployments(args)
    tp, gpu = args.get("tp", 1), args.get("device", "cpu") == "cuda"
    verifier = deployments_of(serve_cfg).get("Verifier", {})
    bundles = verifier.get("placement_group_bundles") or []
    if len(bundles) != tp:
        problems.append(f"Verifier has {len(bundles)} placement bundles for tp={tp} (one per rank)")
    if any(b.get("GPU", 0) != (1 if gpu else 0) for b in bundles):
        device = args.get("device", "cpu")
        problems.append(f"Verifier bundles must hold {1 if gpu else 0} GPU each with device {device}")
    groups = dict(ray_groups(rayservice))
    if gpu and "verifier" in groups:
        limits = ray_container(groups["verifier"])["resources"]["limits"]
        if int(limits.get("nvidia.com/gpu", 0)) != tp:
            have = limits.get("nvidia.com/gpu", 0)
            problems.append(f"a verifier pod has {have} GPUs for tp={tp} (one group per pod)")
    model = str(args.get("model") or "default")
    if model.startswith("/"):
        claims = {d["metadata"]["name"] for d in docs if d.get("kind") == "PersistentVolumeClaim"}
        readers = ["headgroup", "verifier"] + (["draft"] if "DraftWorker" in expected else [])
        for name in readers:
            if name not in groups:
                problems.append(f"model {model}: no pod group {name} to read it")
                continue
            mounted = [v for path, v in _mounts(groups[name]).items() if model.startswith(path.rstrip("/") + "/")]
            if not mounted:
                problems.append(f"model {model} is on no volume mounted in the {name} pods")
                continue
            volumes = {v["name"]: v for v in groups[name]["template"]["spec"].get("volumes", [])}
            claim = volumes.get(mounted[0], {}).get("persistentVolumeClaim", {}).get("claimName")
            if mounted[0] not in volumes:
                problems.append(f"the {name} pods mount volume {mounted[0]}, which they do not define")
            elif claim is not None and claim not in claims:
                problems.append(f"the {name} pods claim volume {claim}, which no PersistentVolumeClaim here defines")
    return problems


# ------------------------------------------------------------------ command line


def rayservice_problems(path: Path, validator) -> list[str]:
    """Every check on one RayService file (the CRD ones when ``validator`` is given)."""
    docs = load_docs(path)
    rayservice = the_rayservice(path)
    serve = serve_config_of(rayservice)
    report = [f"CRD: {e}" for e in crd_errors(validator, rayservice)] if validator is not None else []
    report += [f"serveConfigV2: {p}" for p in serve_config_problems(serve)]
    report += [f"placement: {p}" for p in placement_problems(serve, rayservice)]
    report += [f"app: {p}" for p in app_problems(serve, rayservice, docs)]
    return report


def main() -> int:
    validator = None
    if crd_path().is_file():
        validator = crd_validator(crd_path())
    else:
        print(f"note: {crd_path()} not found, RayService schema not checked (set DSPARK_SHARED_DIR)")
    report: list[str] = []
    for path in RAYSERVICES:
        report += [f"{path.name}: {p}" for p in rayservice_problems(path, validator)]
    local = load_docs(SERVE_CONFIG)[0]
    report += [f"serve_config.yaml: {p}" for p in serve_config_problems(local) + deployment_problems(local)]
    for line in report:
        print(line)
    names = ", ".join(p.name for p in RAYSERVICES)
    print(f"deploy/ ({names}, serve_config.yaml): ok" if not report else f"deploy/: {len(report)} problem(s)")
    return 1 if report else 0


if __name__ == "__main__":
    sys.exit(main())
