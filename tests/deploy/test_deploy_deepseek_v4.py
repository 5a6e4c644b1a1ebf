"""The DeepSeek-V4 RayService (deploy/kuberay/rayservice-deepseek-v4.yaml): what it serves and
how, and the application checks of deploy/validate.py on broken copies of it (each must fail,
naming the problem). The checks every RayService passes are in test_deploy.py.
"""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("yaml")
pytest.importorskip("jsonschema")

from helpers.deploy import load_validate  # noqa: E402

validate = load_validate()
load_docs, by_kind, the_app = validate.load_docs, validate.by_kind, validate.the_app
deployments_of, ray_groups, ray_container = validate.deployments_of, validate.ray_groups, validate.ray_container
V4 = validate.KUBERAY / "rayservice-deepseek-v4.yaml"


@pytest.fixture(scope="module")
def v4_docs() -> list[dict]:
    return load_docs(V4)


def test_v4_variant_serves_a_mounted_folder_with_mtp_on_8_gpus(v4_docs):
    rayservice = validate.the_rayservice(V4)
    serve = validate.serve_config_of(rayservice)
    args = the_app(serve)["args"]
    assert args["model"].startswith("/models/") and args["device"] == "cuda" and args["dtype"] == "bf16"
    assert (args["tp"], args["draft"], args["draft_workers"], args["compile"]) == (8, "mtp", 0, False)
    assert set(deployments_of(serve)) == {"Router", "Verifier"}, "mtp drafts in the verifier: no draft group"
    groups = dict(ray_groups(rayservice))
    assert set(groups) == {"headgroup", "verifier"}
    node = groups["verifier"]["template"]["spec"]["nodeSelector"]["cloud.google.com/gke-accelerator"]
    assert "h200" in node
    (claim,) = by_kind(v4_docs, "PersistentVolumeClaim").values()
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    for name in ("headgroup", "verifier"):
        mounts = {m["mountPath"]: m for m in ray_container(groups[name])["volumeMounts"]}
        assert mounts["/models"]["readOnly"] is True, name


def _v4_group(rs, name):
    return dict(ray_groups(rs))[name]


def _drop_head_models_mount(rs, serve):
    c = ray_container(_v4_group(rs, "headgroup"))
    c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] != "models"]


def _misspell_claim(rs, serve):
    for v in _v4_group(rs, "verifier")["template"]["spec"]["volumes"]:
        if v["name"] == "models":
            v["persistentVolumeClaim"]["claimName"] = "deepseek-v4-flsh"


def _seven_gpus(rs, serve):
    ray_container(_v4_group(rs, "verifier"))["resources"]["limits"]["nvidia.com/gpu"] = "7"


def _add_draft_worker(rs, serve):
    the_app(serve)["deployments"].append({"name": "DraftWorker", "num_replicas": 1})


@pytest.mark.parametrize(
    "mutate, expect",
    [
        (lambda rs, serve: the_app(serve)["args"].update(tp=4), "8 placement bundles for tp=4"),
        (lambda rs, serve: deployments_of(serve)["Verifier"]["placement_group_bundles"].pop(), "7 placement bundles"),
        (_seven_gpus, "7 GPUs for tp=8"),
        (lambda rs, serve: the_app(serve)["args"].update(device="cpu"), "0 GPU each with device cpu"),
        (lambda rs, serve: the_app(serve)["args"].update(draft="mtpp"), "application args"),
        (lambda rs, serve: the_app(serve)["args"].update(verify_policy="adaptive"), "creates deployment Scheduler"),
        (_add_draft_worker, "deployment DraftWorker is configured"),
        (lambda rs, serve: the_app(serve)["args"].update(model="/weights/DeepSeek-V4-Flash"), "no volume mounted"),
        (_drop_head_models_mount, "no volume mounted in the headgroup pods"),
        (_misspell_claim, "claim volume deepseek-v4-flsh"),
    ],
    ids=["tp-not-bundles", "bundle-missing", "pod-gpus", "cpu-device", "unknown-drafter", "scheduler-missing",
         "draft-worker-without-remote-drafting", "model-off-volume", "head-without-model", "unknown-claim"],
)
def test_v4_variant_checks_reject_broken_copies(v4_docs, mutate, expect):
    rayservice = copy.deepcopy(validate.the_rayservice(V4))
    serve = validate.serve_config_of(rayservice)
    mutate(rayservice, serve)
    problems = validate.app_problems(serve, rayservice, v4_docs)
    assert problems, "the app check accepted a broken V4 RayService"
    assert any(expect in p for p in problems), problems
