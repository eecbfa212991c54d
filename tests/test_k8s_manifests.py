"""docker/'s deployment files against their schemas, and the entrypoint's security wiring.

- Every Kubernetes manifest under `docker/k8s` (the base, its components and patches, the
  KServe variant) is validated offline against the Kubernetes OpenAPI schemas that ship in
  the pinned `kubernetes-validate` wheel, for each version in `K8S_VERSIONS`, in strict mode
  (unknown fields are errors). The KServe `ServingRuntime` and `InferenceService` are
  validated against the KServe 0.20.0 CRD schemas vendored in `tests/data/schemas`, closed
  the same way; the compose files against the Compose specification's schema. Each kind of
  check is also shown to reject a broken copy.
- Where `kubectl` is installed, `kubectl kustomize` renders both kustomizations (with the
  TLS components on) and the rendered objects are validated again, references included.
- The entrypoint (`docker/entrypoint.sh`) with a stand-in `tritonserver`: where the admin
  key comes from, which keys and TLS settings it refuses; then with the real `tritonserver`
  of the `nvidia-pytriton` wheel: control APIs refused without the key on HTTP and gRPC,
  open with it, health and metadata open to all, gRPC TLS and mutual TLS.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
KSERVE = K8S / "kserve"
SCHEMAS = Path(__file__).resolve().parent / "data" / "schemas"
KSERVE_SCHEMAS = SCHEMAS / "kserve-v0.20.0"
# The oldest Kubernetes these manifests are meant for, and the newest the validator knows.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
ADMIN_HEADER = "sdserve-admin-key"  # the HTTP header; gRPC metadata carries Triton's prefix
GRPC_ADMIN_HEADER = "triton-grpc-protocol-" + ADMIN_HEADER  # seen on tritonserver 2.51
RESTRICTED = ("model-repository", "shared-memory", "statistics", "trace", "logging")
OPEN = ("inference", "health", "metadata", "model-config")
OUTSTANDING_STEPS = "sdserve_outstanding_steps"  # the pipeline's gauge


# ------------------------------------------------------------------------------- loading


def _documents(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _yaml_files() -> list[Path]:
    return sorted(K8S.rglob("*.yaml"))


def _kind(path: Path) -> str:
    """What a YAML file under docker/k8s is; every one must be one of these."""
    documents = _documents(path)
    if path.name == "kustomization.yaml":
        return "kustomization"
    if path.name == "kustomizeconfig.yaml":
        return "kustomize-config"
    if path.name == "prometheus-adapter-rules.yaml":
        return "helm-values"
    if documents and all(isinstance(d, list) for d in documents):
        return "json-patch"
    if documents and all("apiVersion" in d and "kind" in d for d in documents):
        return "manifest"
    return "unknown"


def _manifests() -> dict[str, dict]:
    """Every object in a manifest file under docker/k8s, by `Kind/name`."""
    found = {}
    for path in _yaml_files():
        if _kind(path) == "manifest":
            for document in _documents(path):
                key = f"{document['kind']}/{document['metadata']['name']}"
                assert key not in found, f"{key} defined twice"
                found[key] = document
    return found


def _pod_spec(document: dict) -> dict:
    if document["kind"] == "ServingRuntime":
        return document["spec"]
    return document["spec"]["template"]["spec"]


def _pod_container(document: dict) -> dict:
    (container,) = _pod_spec(document)["containers"]
    return container


def _kustomization(folder: Path) -> dict:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def _apply_patch(document: dict, operations: list[dict]) -> dict:
    """RFC 6902 `add` operations (all the patches here use), on a copy of `document`."""
    patched = copy.deepcopy(document)
    for operation in operations:
        assert operation["op"] == "add", operation
        *parents, last = operation["path"].lstrip("/").split("/")
        node = patched
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node.insert(len(node) if last == "-" else int(last), operation["value"])
        else:
            node[last] = operation["value"]
    return patched


def _component_patches(folder: Path) -> Iterator[tuple[dict, list[dict]]]:
    """(target, operations) of every patch of a kustomize Component."""
    for patch in _kustomization(folder).get("patches", []):
        operations = (
            yaml.safe_load(patch["patch"])
            if "patch" in patch
            else yaml.safe_load((folder / patch["path"]).read_text())
        )
        yield patch["target"], operations


def _patch_target(manifests: dict[str, dict], target: dict) -> dict:
    matches = [
        d
        for d in manifests.values()
        if d["kind"] == target["kind"]
        and d["metadata"]["name"] == target["name"]
        and d["apiVersion"].split("/")[0] == target.get("group", d["apiVersion"].split("/")[0])
    ]
    assert len(matches) == 1, f"patch target {target} matches {len(matches)} objects"
    return matches[0]


def _with_components(*names: str) -> dict[str, dict]:
    """The manifests with the patches of the named components applied, in order."""
    manifests = copy.deepcopy(_manifests())
    for name in names:
        for target, operations in _component_patches(K8S / name):
            key = f"{target['kind']}/{target['name']}"
            manifests[key] = _apply_patch(_patch_target(manifests, target), operations)
    return manifests


# ------------------------------------------------------------------------------ validation


def _closed(schema: object) -> object:
    """A CRD schema with every object that lists properties closed to unknown fields."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {k: _closed(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        closed["additionalProperties"] = False
    return closed


def _list_map_keys(validator, keys, instance, schema):
    """`x-kubernetes-list-type: map`: no two items share their keys (env names, ports)."""
    if schema.get("x-kubernetes-list-type") != "map" or not isinstance(instance, list):
        return
    seen = set()
    for item in instance:
        key = tuple(item.get(k) for k in keys)
        if key in seen:
            yield jsonschema.ValidationError(
                f"duplicate item with {dict(zip(keys, key, strict=True))}"
            )
        seen.add(key)


CrdValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-list-map-keys": _list_map_keys}
)
CRD_SCHEMAS = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "servingruntime.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice.json",
}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def validate(document: dict, version: str) -> None:
    """Raises `jsonschema.ValidationError` unless `document` is valid for that Kubernetes."""
    name = document.get("metadata", {}).get("name", "")
    if not DNS_LABEL.match(name):
        raise jsonschema.ValidationError(f"metadata.name {name!r} is not a DNS-1123 label")
    crd = CRD_SCHEMAS.get((document.get("apiVersion"), document.get("kind")))
    if crd is None:
        kubernetes_validate.validate(document, version, strict=True)
        return
    schema = _closed(json.loads((KSERVE_SCHEMAS / crd).read_text()))
    CrdValidator(schema).validate(document)


# --------------------------------------------------------------------- what is in docker/k8s


def test_every_yaml_under_k8s_is_a_known_kind_of_file() -> None:
    kinds = {str(p.relative_to(K8S)): _kind(p) for p in _yaml_files()}
    assert "unknown" not in kinds.values(), kinds
    assert kinds["kserve/servingruntime.yaml"] == "manifest"
    assert kinds["tls/deployment-patch.yaml"] == "json-patch"


def test_base_kustomization_applies_every_top_level_manifest_and_no_kserve() -> None:
    base = _kustomization(K8S)
    top_level = {p.name for p in K8S.glob("*.yaml") if _kind(p) == "manifest"}
    assert set(base["resources"]) == top_level
    assert base["components"] == ["secrets"]  # closed by default: no key file, no deploy
    assert not any("kserve" in entry for entry in base["resources"] + base["components"])


def test_kserve_kustomization_applies_its_manifests_and_the_shared_key() -> None:
    kserve = _kustomization(KSERVE)
    assert set(kserve["resources"]) == {
        p.name for p in KSERVE.glob("*.yaml") if _kind(p) == "manifest"
    }
    assert kserve["components"] == ["../secrets"]
    assert all((KSERVE / c).is_file() for c in kserve["configurations"])


@pytest.mark.parametrize("component", ["secrets", "tls", "mutual-tls"])
def test_components_are_kustomize_components(component: str) -> None:
    kustomization = _kustomization(K8S / component)
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
    assert kustomization["kind"] == "Component"


def test_admin_key_secret_is_generated_from_an_uncommitted_file() -> None:
    (generator,) = _kustomization(K8S / "secrets")["secretGenerator"]
    assert generator["name"] == "sdserve-admin-key" and generator["files"] == ["admin-key"]
    secret_files = ["docker/k8s/secrets/admin-key", "docker/admin-key", "docker/tls/server.key"]
    git = ["git", "-C", str(ROOT)]
    ignored = subprocess.run([*git, "check-ignore", *secret_files], capture_output=True, text=True)
    assert ignored.stdout.split() == secret_files  # never committed by accident
    tracked = subprocess.run([*git, "ls-files", "docker"], capture_output=True, text=True).stdout
    secrets = [f for f in tracked.split() if f.endswith("/admin-key") or "docker/tls/" in f]
    assert not secrets
    dockerignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert {"docker/admin-key", "docker/tls", "docker/k8s/secrets/admin-key"} <= set(dockerignore)


# ----------------------------------------------------------------- schemas (kubernetes etc.)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_is_valid_for_kubernetes(version: str) -> None:
    manifests = _manifests()
    assert {
        "Deployment/sdserve",
        "Service/sdserve",
        "HorizontalPodAutoscaler/sdserve",
        "PersistentVolumeClaim/sdserve-build",
        "PersistentVolumeClaim/sdserve-models",
        "ServingRuntime/sdserve-triton",
        "InferenceService/sdserve",
        "HorizontalPodAutoscaler/sdserve-predictor",
    } <= set(manifests)
    for key, document in manifests.items():
        try:
            validate(document, version)
        except jsonschema.ValidationError as error:
            pytest.fail(f"{key} (Kubernetes {version}): {error.message} at {list(error.path)}")


@pytest.mark.parametrize("components", [("tls",), ("tls", "mutual-tls")])
def test_manifests_stay_valid_with_the_tls_components(components: tuple[str, ...]) -> None:
    patched = _with_components(*components)
    for key in ("Deployment/sdserve", "ServingRuntime/sdserve-triton"):
        validate(patched[key], K8S_VERSIONS[-1])
        env = {e["name"]: e["value"] for e in _pod_container(patched[key])["env"]}
        mounts = {m["name"]: m["mountPath"] for m in _pod_container(patched[key])["volumeMounts"]}
        assert env["SDSERVE_TLS_CERT"] == f"{mounts['tls']}/tls.crt"
        assert env["SDSERVE_TLS_KEY"] == f"{mounts['tls']}/tls.key"
        if "mutual-tls" in components:
            assert env["SDSERVE_TLS_CLIENT_CA"] == f"{mounts['tls']}/ca.crt"
        volumes = {v["name"]: v for v in _pod_spec(patched[key])["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == "sdserve-tls"


def _broken_copies() -> Iterator:
    manifests = _manifests()
    count = iter(range(100))

    def broken(key: str, change):
        document = copy.deepcopy(manifests[key])
        change(document)
        return pytest.param(key, document, id=f"{key}-{next(count)}")

    def container(document: dict) -> dict:
        return _pod_container(document)

    yield broken("Deployment/sdserve", lambda d: container(d).update(portz=[]))
    yield broken("Deployment/sdserve", lambda d: d["spec"].update(replicas="two"))
    yield broken("Service/sdserve", lambda d: d["spec"]["ports"][0].update(port="http"))
    yield broken(
        "HorizontalPodAutoscaler/sdserve",
        lambda d: d["spec"]["metrics"][0].update(type="Pods", pods={"target": {}}),
    )
    yield broken("PersistentVolumeClaim/sdserve-build", lambda d: d["spec"].update(size="1Gi"))
    yield broken("ServingRuntime/sdserve-triton", lambda d: container(d).update(portz=[]))
    yield broken(
        "ServingRuntime/sdserve-triton",
        lambda d: container(d)["ports"][0].update(containerPort="8000"),
    )
    yield broken(
        "ServingRuntime/sdserve-triton",
        lambda d: container(d)["env"].append(dict(container(d)["env"][0])),  # duplicate name
    )
    yield broken("ServingRuntime/sdserve-triton", lambda d: d["spec"].update(replica=1))
    yield broken("InferenceService/sdserve", lambda d: d["spec"].update(predictor=None))
    yield broken("InferenceService/sdserve", lambda d: d["spec"].pop("predictor"))
    yield broken(
        "InferenceService/sdserve",
        lambda d: d["spec"]["predictor"]["model"].update(storage_uri="x"),
    )
    yield broken("InferenceService/sdserve", lambda d: d["metadata"].update(name="SDServe"))


@pytest.mark.parametrize("key, document", list(_broken_copies()))
def test_a_broken_copy_is_rejected(key: str, document: dict) -> None:
    with pytest.raises(jsonschema.ValidationError):
        validate(document, K8S_VERSIONS[-1])


def test_vendored_kserve_schemas_name_their_source() -> None:
    for name in CRD_SCHEMAS.values():
        comment = json.loads((KSERVE_SCHEMAS / name).read_text())["$comment"]
        assert "github.com/kserve/kserve" in comment and "v0.20.0" in comment


# ------------------------------------------------------------------ kubectl kustomize render


def _kubectl_kustomize(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def k8s_copy(tmp_path: Path) -> Path:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    copy_dir = tmp_path / "k8s"
    shutil.copytree(K8S, copy_dir)
    return copy_dir


def test_kustomize_refuses_to_render_without_an_admin_key(k8s_copy: Path) -> None:
    (k8s_copy / "secrets" / "admin-key").unlink(missing_ok=True)
    for folder in (k8s_copy, k8s_copy / "kserve"):
        result = _kubectl_kustomize(folder)
        assert result.returncode != 0 and "admin-key" in result.stderr


@pytest.mark.parametrize("folder", [".", "kserve"])
def test_kustomize_renders_valid_objects_with_the_key_and_tls(k8s_copy: Path, folder: str) -> None:
    (k8s_copy / "secrets" / "admin-key").write_text("0123abcd\n")
    root = k8s_copy / folder
    prefix = "" if folder == "." else "../"
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text())
    kustomization["components"] += [f"{prefix}tls", f"{prefix}mutual-tls"]
    (root / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    result = _kubectl_kustomize(root)
    assert result.returncode == 0, result.stderr
    rendered = {
        f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(result.stdout)
    }
    for version in K8S_VERSIONS:
        for document in rendered.values():
            validate(document, version)
    (secret_name,) = [k.split("/")[1] for k in rendered if k.startswith("Secret/")]
    assert re.fullmatch(r"sdserve-admin-key-[a-z0-9]{10}", secret_name)  # content hash
    key = "Deployment/sdserve" if folder == "." else "ServingRuntime/sdserve-triton"
    volumes = {v["name"]: v for v in _pod_spec(rendered[key])["volumes"]}
    assert volumes["admin-key"]["secret"]["secretName"] == secret_name  # reference rewritten
    env = {e["name"] for e in _pod_container(rendered[key])["env"]}
    assert {"SDSERVE_ADMIN_KEY_FILE", "SDSERVE_TLS_CERT", "SDSERVE_TLS_CLIENT_CA"} <= env
    assert all(
        d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "sdserve" for d in rendered.values()
    )


# ------------------------------------------------------------------- wiring of the objects


def test_deployment_reads_the_admin_key_file_from_the_secret() -> None:
    manifests = _manifests()
    for key in ("Deployment/sdserve", "ServingRuntime/sdserve-triton"):
        container = _pod_container(manifests[key])
        env = {e["name"]: e for e in container["env"]}
        assert "SDSERVE_ADMIN_KEY" not in env  # the key never sits in the pod spec
        key_file = Path(env["SDSERVE_ADMIN_KEY_FILE"]["value"])
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(key_file.parent))
        assert mount["readOnly"] is True
        volume = next(v for v in _pod_spec(manifests[key])["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["secretName"] == "sdserve-admin-key"
        assert volume["secret"]["defaultMode"] == 0o400
        assert key_file.name == "admin-key"  # the generator's file name is the Secret's key


def test_serving_runtime_runs_the_image_as_the_deployment_does() -> None:
    manifests = _manifests()
    deployment = _pod_container(manifests["Deployment/sdserve"])
    runtime_doc = manifests["ServingRuntime/sdserve-triton"]
    runtime = _pod_container(runtime_doc)
    assert runtime["name"] == "kserve-container"  # the container KServe merges into
    for field in ("image", "resources", "startupProbe", "readinessProbe", "livenessProbe"):
        assert runtime[field] == deployment[field], field
    assert [(p["name"], p["containerPort"]) for p in runtime["ports"]] == [
        (p["name"], p["containerPort"]) for p in deployment["ports"]
    ]
    assert runtime["ports"][0]["containerPort"] == 8000  # KServe's Service port 80 → HTTP
    deployment_env = {e["name"]: e["value"] for e in deployment["env"]}
    runtime_env = {e["name"]: e["value"] for e in runtime["env"]}
    for name in ("SDSERVE_GPU_REPOSITORY", "SDSERVE_PLATFORM", "SDSERVE_ADMIN_KEY_FILE"):
        assert runtime_env[name] == deployment_env[name], name
    assert runtime_env["SDSERVE_SOURCE"] == "/mnt/models"  # where KServe puts storageUri
    # one build folder per InferenceService on the shared volume (KServe fills in the name)
    assert runtime_env["SDSERVE_BUILD_DIR"] == deployment_env["SDSERVE_BUILD_DIR"] + "/{{.Name}}"
    deployment_pod = _pod_spec(manifests["Deployment/sdserve"])
    assert runtime_doc["spec"]["tolerations"] == deployment_pod["tolerations"]
    volumes = {v["name"]: v for v in runtime_doc["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in runtime["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in volumes[mounts["/srv/sdserve"]]
    assert volumes[mounts["/workspace/build"]]["persistentVolumeClaim"]["claimName"] == (
        "sdserve-build"
    )
    annotations = runtime_doc["spec"]["annotations"]
    pod_annotations = manifests["Deployment/sdserve"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations == pod_annotations  # Prometheus scrapes it the same way
    assert {"v2", "grpc-v2"} == set(runtime_doc["spec"]["protocolVersions"])


def test_inference_service_uses_the_runtime_and_the_models_claim() -> None:
    manifests = _manifests()
    isvc = manifests["InferenceService/sdserve"]
    runtime = manifests["ServingRuntime/sdserve-triton"]
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {
        f["name"] for f in runtime["spec"]["supportedModelFormats"]
    }
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    claim, _, subpath = model["storageUri"].removeprefix("pvc://").partition("/")
    assert f"PersistentVolumeClaim/{claim}" in manifests and subpath
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "Standard"
    assert annotations["serving.kserve.io/autoscalerClass"] == "external"  # hpa.yaml scales


def test_kserve_hpa_scales_the_predictor_like_the_base_hpa() -> None:
    manifests = _manifests()
    base = manifests["HorizontalPodAutoscaler/sdserve"]["spec"]
    kserve = manifests["HorizontalPodAutoscaler/sdserve-predictor"]["spec"]
    predictor = manifests["InferenceService/sdserve"]["spec"]["predictor"]
    assert kserve["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "sdserve-predictor",  # KServe's Standard mode: <InferenceService>-predictor
    }
    for field in ("metrics", "behavior", "minReplicas", "maxReplicas"):
        assert kserve[field] == base[field], field
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (
        kserve["minReplicas"],
        kserve["maxReplicas"],
    )


def test_hpa_scales_first_on_outstanding_steps_from_the_adapter() -> None:
    hpa = _manifests()["HorizontalPodAutoscaler/sdserve"]
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]]
    assert names[0] == OUTSTANDING_STEPS
    assert hpa["spec"]["metrics"][0]["pods"]["target"] == {
        "type": "AverageValue",
        "averageValue": "400",
    }
    adapter = yaml.safe_load((K8S / "prometheus-adapter-rules.yaml").read_text())
    rules = {rule["name"]["as"]: rule for rule in adapter["rules"]["custom"]}
    assert set(names) == set(rules)  # every metric the HPA reads is served by a rule
    rule = rules[OUTSTANDING_STEPS]
    assert rule["seriesQuery"].startswith(OUTSTANDING_STEPS + "{")
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    # a gauge: summed as it is per pod (no rate), for the pipeline model only
    query = rule["metricsQuery"]
    assert f"sum({OUTSTANDING_STEPS}{{<<.LabelMatchers>>," in query and "rate(" not in query
    assert 'model="inpaint"' in query


# ---------------------------------------------------------------------------------- compose


def _interpolate(value: object, env: dict[str, str]) -> object:
    """Compose's `${NAME}` / `${NAME:-default}` interpolation, enough for these files."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value
    pattern = r"\$\{(\w+)(?::-([^}]*))?\}"
    return re.sub(pattern, lambda m: env.get(m.group(1)) or m.group(2) or "", value)


def _compose_schema_validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads((SCHEMAS / "compose-spec.json").read_text()))


@pytest.mark.parametrize("name", ["compose.yaml", "compose.tls.yaml"])
def test_compose_files_follow_the_compose_spec(name: str) -> None:
    document = _interpolate(yaml.safe_load((DOCKER / name).read_text()), {})
    _compose_schema_validator().validate(document)
    broken = copy.deepcopy(document)
    broken["services"]["sdserve"]["enviroment"] = {}
    with pytest.raises(jsonschema.ValidationError):
        _compose_schema_validator().validate(broken)


def test_compose_reads_the_admin_key_from_a_docker_secret() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    service = compose["services"]["sdserve"]
    (secret,) = service["secrets"]
    assert service["environment"]["SDSERVE_ADMIN_KEY_FILE"] == f"/run/secrets/{secret}"
    assert "SDSERVE_ADMIN_KEY" not in service["environment"]
    source = _interpolate(compose["secrets"][secret]["file"], {})
    assert (DOCKER / source).resolve() == DOCKER / "admin-key"
    assert "/admin-key" in (DOCKER / ".gitignore").read_text().split()


def test_compose_tls_override_mounts_the_certificates_it_names() -> None:
    tls = _interpolate(yaml.safe_load((DOCKER / "compose.tls.yaml").read_text()), {})
    service = tls["services"]["sdserve"]
    (volume,) = service["volumes"]
    host, target, mode = volume.split(":")
    assert mode == "ro" and (DOCKER / host).resolve() == DOCKER / "tls"
    for name in ("SDSERVE_TLS_CERT", "SDSERVE_TLS_KEY"):
        assert service["environment"][name].startswith(target + "/")
    assert service["environment"]["SDSERVE_TLS_CLIENT_CA"] == ""  # off unless set
    assert "/tls/" in (DOCKER / ".gitignore").read_text().split()


# ------------------------------------------------------------- entrypoint: key and TLS flags

FAKE_PYTHON = """#!/usr/bin/env bash
if [[ "$2" == sdserve_export && "$3" == repository ]]; then
    mkdir -p "$7/$9" && touch "$7/$9/config.pbtxt"
fi
printf '%s\\n' "python $*" >>"$CALLS"
"""
FAKE_TRITON = """#!/usr/bin/env bash
printf '%s\\n' "$@" >"$CALLS.triton"
"""


def _entrypoint(
    tmp_path: Path, env: dict[str, str], triton: Path | None = None, args: tuple[str, ...] = ()
) -> tuple[list[str], list[str]]:
    """Runs the entrypoint under `env` with a stand-in (or the given) tritonserver.

    Returns the flags tritonserver got (empty when it never ran) and the preparation
    commands run before it.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python3").write_text(FAKE_PYTHON)
    (bin_dir / "python3").chmod(0o755)
    if triton is None:
        (bin_dir / "tritonserver").write_text(FAKE_TRITON)
        (bin_dir / "tritonserver").chmod(0o755)
    calls = tmp_path / "calls.txt"
    for stale in (calls, Path(f"{calls}.triton")):
        stale.unlink(missing_ok=True)
    environment = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "CALLS": str(calls),
        "SDSERVE_BUILD_DIR": str(tmp_path / "build"),
        "SDSERVE_WATCHDOG": "0",  # its background start would race the calls recorded
        **env,
    }
    result = subprocess.run(
        ["bash", str(DOCKER / "entrypoint.sh"), *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    triton_args = Path(f"{calls}.triton")
    flags = triton_args.read_text().splitlines() if triton_args.exists() else []
    prepared = calls.read_text().splitlines() if calls.exists() else []
    _entrypoint.last = result  # type: ignore[attr-defined]
    return flags, prepared


def _restriction(flags: list[str]) -> dict[str, tuple[str, str]]:
    """{flag: (APIs, key)} of the restricted-API flags."""
    found = {}
    for flag in flags:
        name, _, value = flag.partition("=")
        if name in ("--grpc-restricted-protocol", "--http-restricted-api"):
            apis, _, header_key = value.partition(":")
            header, _, key = header_key.partition("=")
            assert header == ADMIN_HEADER
            found[name] = (apis, key)
    return found


def test_entrypoint_generates_a_key_per_start_into_a_private_file(tmp_path: Path) -> None:
    flags, _ = _entrypoint(tmp_path, {})
    restriction = _restriction(flags)
    assert set(restriction) == {"--grpc-restricted-protocol", "--http-restricted-api"}
    (apis,) = {apis for apis, _ in restriction.values()}
    assert apis.split(",") == list(RESTRICTED) and not set(apis.split(",")) & set(OPEN)
    (key,) = {key for _, key in restriction.values()}
    key_file = tmp_path / "build" / "admin-key"
    assert re.fullmatch(r"[0-9a-f]{64}", key) and key_file.read_text() == key + "\n"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    log = _entrypoint.last.stderr  # type: ignore[attr-defined]
    assert str(key_file) in log and key not in log
    # explicit: the watchdog reloads a model whose stub died; load/unload need the key
    assert "--model-control-mode=explicit" in flags and "--load-model=*" in flags
    again, _ = _entrypoint(tmp_path, {})
    assert _restriction(again)["--http-restricted-api"][1] != key  # a new key every start


def test_entrypoint_starts_the_stub_watchdog_beside_tritonserver(tmp_path: Path) -> None:
    flags, _ = _entrypoint(tmp_path, {"SDSERVE_WATCHDOG": "1", "SDSERVE_ADMIN_KEY": "k-1"})
    calls = tmp_path / "calls.txt"
    deadline = time.monotonic() + 10  # started in the background
    while "sdserve_pipeline.healing" not in (calls.read_text() if calls.exists() else ""):
        assert time.monotonic() < deadline, "the watchdog was not started"
        time.sleep(0.1)
    (watchdog,) = [c for c in calls.read_text().splitlines() if "sdserve_pipeline.healing" in c]
    assert re.fullmatch(r"python -m sdserve_pipeline.healing --server-pid \d+ --http "
                        r"127.0.0.1:8000", watchdog), watchdog  # fmt: skip
    assert "--http-port=8000" in flags


def test_entrypoint_takes_the_key_from_env_or_file(tmp_path: Path) -> None:
    flags, _ = _entrypoint(tmp_path, {"SDSERVE_ADMIN_KEY": "s3cret-Key_1"})
    assert {k for _, k in _restriction(flags).values()} == {"s3cret-Key_1"}
    assert "s3cret" not in _entrypoint.last.stderr  # type: ignore[attr-defined]
    key_file = tmp_path / "key"
    key_file.write_text("from a file with spaces\n")
    flags, _ = _entrypoint(tmp_path, {"SDSERVE_ADMIN_KEY_FILE": str(key_file)})
    assert {k for _, k in _restriction(flags).values()} == {"from a file with spaces"}
    assert not (tmp_path / "build" / "admin-key").exists()  # nothing generated


@pytest.mark.parametrize(
    "env",
    [
        {"SDSERVE_ADMIN_KEY": ""},
        {"SDSERVE_ADMIN_KEY": "   "},
        {"SDSERVE_ADMIN_KEY": " padded"},
        {"SDSERVE_ADMIN_KEY": "two\nlines"},
        {"SDSERVE_ADMIN_KEY": "tab\tkey"},
        {"SDSERVE_ADMIN_KEY": "naïve"},
        {"SDSERVE_ADMIN_KEY": "a:b"},
        {"SDSERVE_ADMIN_KEY": "a=b"},
        {"SDSERVE_ADMIN_KEY": "a", "SDSERVE_ADMIN_KEY_FILE": "/dev/null"},
        {"SDSERVE_ADMIN_KEY_FILE": "/nonexistent/admin-key"},
        {"SDSERVE_ADMIN_KEY_FILE": "EMPTY"},
        {"SDSERVE_ADMIN_KEY_FILE": "CRLF"},
        {"SDSERVE_ADMIN_KEY": "k", "SDSERVE_TLS_CERT": "CERT"},
        {"SDSERVE_ADMIN_KEY": "k", "SDSERVE_TLS_KEY": "KEY"},
        {"SDSERVE_ADMIN_KEY": "k", "SDSERVE_TLS_CLIENT_CA": "CA"},
        {"SDSERVE_ADMIN_KEY": "k", "SDSERVE_TLS_CERT": "CERT", "SDSERVE_TLS_KEY": "/nonexistent"},
    ],
    ids=lambda env: ",".join(f"{k}={v!r}" for k, v in env.items()),
)
def test_entrypoint_refuses_bad_keys_and_half_tls_before_preparing(
    tmp_path: Path, env: dict[str, str]
) -> None:
    files = {"EMPTY": "\n", "CRLF": "key\r\n", "CERT": "cert", "KEY": "key", "CA": "ca"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    env = {k: str(tmp_path / v) if v in files else v for k, v in env.items()}
    flags, prepared = _entrypoint(tmp_path, env)
    result = _entrypoint.last  # type: ignore[attr-defined]
    assert result.returncode == 64 and "[sdserve] error:" in result.stderr
    assert flags == [] and prepared == []  # fails before the (long) preparation
    assert not (tmp_path / "build" / "admin-key").exists()


def test_entrypoint_tls_flags(tmp_path: Path) -> None:
    for name in ("server.crt", "server.key", "ca.crt"):
        (tmp_path / name).write_text(name)
    base = {"SDSERVE_ADMIN_KEY": "k"}
    plain, _ = _entrypoint(tmp_path, base)
    assert not [f for f in plain if "ssl" in f or "cert" in f]
    tls = {
        **base,
        "SDSERVE_TLS_CERT": str(tmp_path / "server.crt"),
        "SDSERVE_TLS_KEY": str(tmp_path / "server.key"),
    }
    flags, _ = _entrypoint(tmp_path, tls, args=("--log-verbose=1",))
    assert flags[-1] == "--log-verbose=1"  # the caller's arguments come last
    assert {
        "--grpc-use-ssl=true",
        f"--grpc-server-cert={tmp_path}/server.crt",
        f"--grpc-server-key={tmp_path}/server.key",
    } <= set(flags)
    assert not [f for f in flags if "mutual" in f or "root-cert" in f]
    mutual, _ = _entrypoint(tmp_path, {**tls, "SDSERVE_TLS_CLIENT_CA": str(tmp_path / "ca.crt")})
    assert {f"--grpc-root-cert={tmp_path}/ca.crt", "--grpc-use-ssl-mutual=true"} <= set(mutual)


# --------------------------------------------------- entrypoint with the real tritonserver


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class RealServer:
    """The entrypoint exec'ing the wheel's tritonserver on an empty repository, on loopback."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        from sdserve_pipeline.triton_server import locate_distribution

        dist = locate_distribution()
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        (bin_dir / "python3").write_text(FAKE_PYTHON)
        (bin_dir / "python3").chmod(0o755)
        (bin_dir / "tritonserver").unlink(missing_ok=True)
        (bin_dir / "tritonserver").symlink_to(dist.server_binary)
        repository = tmp_path / "repository"
        repository.mkdir(exist_ok=True)
        self.http, self.grpc, metrics = _free_ports(3)
        environment = {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "LD_LIBRARY_PATH": str(dist.libs_dir),
            "CALLS": str(tmp_path / "calls.txt"),
            "SDSERVE_BUILD_DIR": str(tmp_path / "build"),
            "SDSERVE_GPU_REPOSITORY": str(repository),
            **env,
        }
        overrides = [  # after the entrypoint's own flags: the last one counts
            "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1",
            f"--http-port={self.http}",
            f"--grpc-port={self.grpc}",
            f"--metrics-port={metrics}",
            "--allow-gpu-metrics=false",
        ]
        self.log = tmp_path / "server.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                ["bash", str(DOCKER / "entrypoint.sh"), *overrides],
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"tritonserver exited: {self.log.read_text()[-3000:]}")
            if self.status("GET", "/v2/health/ready") == 200:
                return
            time.sleep(0.3)
        pytest.fail(f"tritonserver not ready in {timeout} s: {self.log.read_text()[-3000:]}")

    def status(self, method: str, path: str, key: str | None = None) -> int:
        headers = {ADMIN_HEADER: key} if key is not None else {}
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http}{path}", method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return 0

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def real_server(tmp_path: Path) -> Iterator:
    started = []

    def start(env: dict[str, str]) -> RealServer:
        server = RealServer(tmp_path, env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# Every control call over HTTP, one per restricted API (method, path).
HTTP_CONTROL = {
    "model-repository": ("POST", "/v2/repository/index"),
    "statistics": ("GET", "/v2/models/stats"),
    "trace": ("GET", "/v2/trace/setting"),
    "logging": ("GET", "/v2/logging"),
    "shared-memory": ("GET", "/v2/systemsharedmemory/status"),
}
HTTP_OPEN = [("GET", "/v2/health/ready"), ("GET", "/v2/health/live"), ("GET", "/v2")]


def _grpc_control_calls(client, headers: dict[str, str] | None, marker: Path) -> dict[str, object]:
    """One call per restricted gRPC API: name → result or the exception it raised.

    The load sends a model whose code would create `marker` if the server ran it.
    """
    calls = {
        "model-repository: index": lambda: client.get_model_repository_index(headers=headers),
        "model-repository: load": lambda: client.load_model(
            "x",
            headers=headers,
            config='{"backend": "python"}',
            files={"file:1/model.py": f"open({str(marker)!r}, 'w')\n".encode()},
        ),
        "model-repository: unload": lambda: client.unload_model("inpaint", headers=headers),
        "statistics": lambda: client.get_inference_statistics(headers=headers),
        "trace": lambda: client.get_trace_settings(headers=headers),
        "logging": lambda: client.get_log_settings(headers=headers),
        "shared-memory: status": lambda: client.get_system_shared_memory_status(headers=headers),
        "shared-memory: register": lambda: client.register_system_shared_memory(
            "region", "/sdserve_test_region", 64, headers=headers
        ),
    }
    results = {}
    for name, call in calls.items():
        try:
            results[name] = call()
        except Exception as error:  # tritonclient's InferenceServerException
            results[name] = error
    return results


@pytest.mark.e2e
def test_real_tritonserver_closes_control_apis_without_the_key(real_server, tmp_path: Path) -> None:
    import tritonclient.grpc as grpcclient

    key = "e2e-admin-key"
    server = real_server({"SDSERVE_ADMIN_KEY": key})
    for api, (method, path) in HTTP_CONTROL.items():
        assert server.status(method, path) == 403, api
        assert server.status(method, path, key="wrong") == 403, api
        assert server.status(method, path, key=key) == 200, api
    for method, path in HTTP_OPEN:
        assert server.status(method, path) == 200, path

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    marker = tmp_path / "written-by-client-code"
    refused = _grpc_control_calls(client, None, marker)
    for name, result in refused.items():
        assert isinstance(result, Exception), f"{name} accepted without the key"
        assert "restricted" in str(result) and GRPC_ADMIN_HEADER in str(result), (name, result)
    wrong = _grpc_control_calls(client, {GRPC_ADMIN_HEADER: "wrong"}, marker)
    assert all(isinstance(r, Exception) and "restricted" in str(r) for r in wrong.values())
    unprefixed = _grpc_control_calls(client, {ADMIN_HEADER: key}, marker)
    assert all(isinstance(r, Exception) and "restricted" in str(r) for r in unprefixed.values())
    assert not marker.exists()  # no client code ran
    allowed = _grpc_control_calls(client, {GRPC_ADMIN_HEADER: key}, marker)
    for name in ("model-repository: index", "statistics", "trace", "logging"):
        assert not isinstance(allowed[name], Exception), (name, allowed[name])
    assert not isinstance(allowed["shared-memory: status"], Exception)
    # with the key, the operator may load models (explicit model control: the watchdog
    # reloads crashed ones): the key is the gate. (This server has no Python backend, so
    # the load itself fails, past the key check.)
    load = str(allowed["model-repository: load"])
    assert "load failed for model 'x'" in load and "restricted" not in load, load
    assert allowed["model-repository: unload"] is None
    # (the failed load leaves "x" UNAVAILABLE, so strict readiness now says not ready)
    assert client.is_server_live() and client.get_server_metadata().version == "2.51.0"


@pytest.mark.e2e
def test_real_tritonserver_uses_the_generated_key(real_server, tmp_path: Path) -> None:
    server = real_server({})
    key = (tmp_path / "build" / "admin-key").read_text().strip()
    method, path = HTTP_CONTROL["model-repository"]
    assert server.status(method, path) == 403
    assert server.status(method, path, key=key) == 200


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def certificates(tmp_path: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all from the CA."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path / "pki"
    folder.mkdir()
    days = ("-days", "2")
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-subj", "/CN=sdserve test CA", *days, cwd=folder,
    )  # fmt: skip
    for name, extension in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN=sdserve test {name}", cwd=folder,
        )  # fmt: skip
        (folder / f"{name}.ext").write_text(extension + "\n")
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-extfile", f"{name}.ext", *days,
            cwd=folder,
        )  # fmt: skip
    return folder


def _grpc_live(port: int, **ssl_options: str | bool) -> bool | Exception:
    import tritonclient.grpc as grpcclient

    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}", **ssl_options)
        return client.is_server_live(client_timeout=5)
    except Exception as error:
        return error


@pytest.mark.e2e
def test_real_tritonserver_serves_grpc_over_tls(real_server, certificates: Path) -> None:
    pki = certificates
    server = real_server(
        {
            "SDSERVE_ADMIN_KEY": "k",
            "SDSERVE_TLS_CERT": str(pki / "server.crt"),
            "SDSERVE_TLS_KEY": str(pki / "server.key"),
        }
    )
    assert _grpc_live(server.grpc, ssl=True, root_certificates=str(pki / "ca.crt")) is True
    assert isinstance(_grpc_live(server.grpc), Exception)  # plaintext refused
    assert server.status("GET", "/v2/health/ready") == 200  # HTTP (probes) stays plain


@pytest.mark.e2e
def test_real_tritonserver_requires_client_certificates_with_mutual_tls(
    real_server, certificates: Path
) -> None:
    pki = certificates
    server = real_server(
        {
            "SDSERVE_ADMIN_KEY": "k",
            "SDSERVE_TLS_CERT": str(pki / "server.crt"),
            "SDSERVE_TLS_KEY": str(pki / "server.key"),
            "SDSERVE_TLS_CLIENT_CA": str(pki / "ca.crt"),
        }
    )
    trust = {"ssl": True, "root_certificates": str(pki / "ca.crt")}
    client_cert = {
        "private_key": str(pki / "client.key"),
        "certificate_chain": str(pki / "client.crt"),
    }
    assert _grpc_live(server.grpc, **trust, **client_cert) is True
    assert isinstance(_grpc_live(server.grpc, **trust), Exception)  # no client certificate


# ----------------------------------------------------------------------------------- README


def test_docker_readme_documents_key_tls_kserve_and_the_scaling_metric() -> None:
    readme = (DOCKER / "README.md").read_text()
    for needle in (
        "SDSERVE_ADMIN_KEY",
        "SDSERVE_ADMIN_KEY_FILE",
        f'headers={{"{ADMIN_HEADER}": key}}',
        "SDSERVE_TLS_CERT",
        "SDSERVE_TLS_CLIENT_CA",
        "compose.tls.yaml",
        "kubectl apply -k docker/k8s/kserve",
        "ServingRuntime",
        "InferenceService",
        OUTSTANDING_STEPS,
        "kubernetes-validate",
    ):
        assert needle in readme, needle
