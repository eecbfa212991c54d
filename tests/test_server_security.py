"""Triton's control APIs are closed without the operator's key; inference stays open.

Pure parts first (key resolution, flags), then a real tritonserver on loopback tried as an
attacker would: every control call, over gRPC and HTTP, without the key, then with it.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import ADD_ONE, infer_add_one, write_model

from sdserve_pipeline.server_security import (
    ADMIN_KEY_ENV,
    ADMIN_KEY_FILE_ENV,
    AdminKey,
    SecurityConfigError,
    TlsConfig,
    resolve_admin_key,
)
from sdserve_pipeline.triton_server import TritonServer

# --- Pure parts ----------------------------------------------------------------------------


def test_key_from_the_environment(tmp_path: Path) -> None:
    key = resolve_admin_key({ADMIN_KEY_ENV: "from-env"}, tmp_path / "generated")

    assert key.value == "from-env" and not (tmp_path / "generated").exists()


def test_key_from_both_the_environment_and_a_file_is_ambiguous(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    env = {ADMIN_KEY_ENV: "from-env", ADMIN_KEY_FILE_ENV: str(key_file)}

    with pytest.raises(SecurityConfigError, match="not both"):
        resolve_admin_key(env, tmp_path / "generated")


def test_key_from_a_file_is_stripped(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("  s3cret-Key_1  \n")

    key = resolve_admin_key({ADMIN_KEY_FILE_ENV: str(key_file)}, tmp_path / "generated")

    assert key == AdminKey("s3cret-Key_1", str(key_file))


def test_a_generated_key_is_random_and_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "build" / "admin-key"

    first = resolve_admin_key({}, path)
    second = resolve_admin_key({}, path)  # a new start replaces it

    assert first.value != second.value and len(second.value) == 64
    assert path.read_text().strip() == second.value
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert str(path) in second.source and second.value not in second.source


@pytest.mark.parametrize("bad", ["", "   \n", "tab\tkey", "naïve", "a:b", "a=b"])
def test_an_empty_or_malformed_key_is_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(SecurityConfigError, match=ADMIN_KEY_ENV if not bad.strip() else "key"):
        resolve_admin_key({ADMIN_KEY_ENV: bad or " "}, tmp_path / "generated")


def test_a_key_with_inner_spaces_is_accepted_as_in_the_entrypoint(tmp_path: Path) -> None:
    key = resolve_admin_key({ADMIN_KEY_ENV: "from a file with spaces"}, tmp_path / "g")

    assert key.value == "from a file with spaces"


def test_an_unreadable_key_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SecurityConfigError, match="cannot read the admin key file"):
        resolve_admin_key({ADMIN_KEY_FILE_ENV: str(tmp_path / "missing")}, tmp_path / "g")


def test_server_args_restrict_every_control_api_on_both_protocols() -> None:
    args = AdminKey("k", "test").server_args()

    apis = "model-repository,shared-memory,statistics,trace,logging"
    assert args == [
        f"--grpc-restricted-protocol={apis}:sdserve-admin-key=k",
        f"--http-restricted-api={apis}:sdserve-admin-key=k",
    ]
    assert AdminKey("k", "test").grpc_headers == {"triton-grpc-protocol-sdserve-admin-key": "k"}


def test_tls_args_and_mutual_tls(tmp_path: Path) -> None:
    cert, key, ca = (tmp_path / n for n in ("c.pem", "k.pem", "ca.pem"))
    for path in (cert, key, ca):
        path.write_text("x")

    plain = TlsConfig(cert, key).server_args()
    mutual = TlsConfig(cert, key, ca).server_args()

    assert plain == [
        "--grpc-use-ssl=true",
        f"--grpc-server-cert={cert}",
        f"--grpc-server-key={key}",
    ]
    assert mutual[3:] == [f"--grpc-root-cert={ca}", "--grpc-use-ssl-mutual=true"]
    with pytest.raises(SecurityConfigError, match="TLS key file .* missing"):
        TlsConfig(cert, tmp_path / "nope.pem").check()


def test_a_server_gets_the_restriction_flags_and_a_generated_key(tmp_path: Path) -> None:
    server = TritonServer(tmp_path, grpc_port=0, http_port=0, metrics_port=0, build_dir=tmp_path)

    key_file = tmp_path / f"admin-key-{server.ports.grpc}"
    assert key_file.read_text().strip() == server.admin_key.value
    assert server.security_args() == server.admin_key.server_args()


# --- End to end: an attacker's tries against a real tritonserver ---------------------------

# A model whose code proves it ran: it writes a file when loaded.
_PAYLOAD = """
from pathlib import Path


class TritonPythonModel:
    def initialize(self, args):
        Path({sentinel!r}).write_text("client code ran in the server")

    def execute(self, requests):
        return []
"""


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    repository = tmp_path_factory.mktemp("locked") / "models"
    write_model(repository, "add_one", ADD_ONE)
    with TritonServer(
        repository,
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        build_dir=tmp_path_factory.mktemp("locked-build"),
        admin_key=AdminKey("operator-key-123", "test"),
    ) as server:
        server.wait_ready(120)
        yield server


def _payload_files(sentinel: Path) -> dict[str, bytes]:
    return {"file:1/model.py": _PAYLOAD.format(sentinel=str(sentinel)).encode()}


def _grpc_calls(server: TritonServer, sentinel: Path) -> dict[str, Callable[[Any, Any], Any]]:
    """Every restricted gRPC call, each taking (client, headers)."""
    from tritonclient.utils import shared_memory as shm

    files = _payload_files(sentinel)
    config_json = json.dumps({"backend": "python", "max_batch_size": 0})

    def register(client: Any, headers: Any) -> Any:
        region = shm.create_shared_memory_region("sdserve-test", "/sdserve-test-shm", 64)
        try:
            client.register_system_shared_memory("sdserve-test", "/sdserve-test-shm", 64,
                                                 headers=headers)  # fmt: skip
            client.unregister_system_shared_memory("sdserve-test", headers=headers)
        finally:
            shm.destroy_shared_memory_region(region)

    return {
        "repository index": lambda c, h: c.get_model_repository_index(headers=h),
        "load with a file override": lambda c, h: c.load_model(
            "payload", config=config_json, files=files, headers=h
        ),
        "unload": lambda c, h: c.unload_model("payload", headers=h),
        "system shared-memory status": lambda c, h: c.get_system_shared_memory_status(headers=h),
        "system shared-memory register": register,
        "cuda shared-memory status": lambda c, h: c.get_cuda_shared_memory_status(headers=h),
        "statistics": lambda c, h: c.get_inference_statistics(headers=h),
        "trace settings": lambda c, h: c.get_trace_settings(headers=h),
        "trace update": lambda c, h: c.update_trace_settings(
            settings={"trace_level": ["OFF"]}, headers=h
        ),  # fmt: skip
        "log settings": lambda c, h: c.get_log_settings(headers=h),
        "log update": lambda c, h: c.update_log_settings({"log_verbose_level": 0}, headers=h),
    }


def _http(server: TritonServer, method: str, path: str, body: Any, headers: dict) -> int:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://{server.http_url}{path}", data=data, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def _http_calls(sentinel: Path) -> dict[str, tuple[str, str, Any]]:
    code = base64.b64encode(_PAYLOAD.format(sentinel=str(sentinel)).encode()).decode()
    load = {"parameters": {"config": json.dumps({"backend": "python"}), "file:1/model.py": code}}
    return {
        "repository index": ("POST", "/v2/repository/index", {}),
        "load with a file override": ("POST", "/v2/repository/models/payload/load", load),
        "unload": ("POST", "/v2/repository/models/payload/unload", {}),
        "system shared-memory status": ("GET", "/v2/systemsharedmemory/status", None),
        "system shared-memory register": (
            "POST",
            "/v2/systemsharedmemory/region/r/register",
            {"key": "/sdserve-none", "offset": 0, "byte_size": 64},
        ),
        "cuda shared-memory status": ("GET", "/v2/cudasharedmemory/status", None),
        "statistics": ("GET", "/v2/models/stats", None),
        "trace settings": ("GET", "/v2/trace/setting", None),
        "trace update": ("POST", "/v2/trace/setting", {"trace_level": ["OFF"]}),
        "log settings": ("GET", "/v2/logging", None),
        "log update": ("POST", "/v2/logging", {"log_verbose_level": 0}),
    }


@pytest.mark.e2e
def test_no_control_call_is_accepted_without_the_key_over_grpc(
    locked: TritonServer, tmp_path: Path
) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    sentinel = tmp_path / "pwned"
    accepted, refused = [], []
    with grpcclient.InferenceServerClient(locked.grpc_url) as client:
        for kind, call in _grpc_calls(locked, sentinel).items():
            try:
                call(client, None)
                accepted.append(kind)
            except InferenceServerException as exc:
                assert "This protocol is restricted" in exc.message(), (kind, exc.message())
                refused.append(kind)

    assert accepted == [] and len(refused) == 11
    assert not sentinel.exists()


@pytest.mark.e2e
def test_no_control_call_is_accepted_without_the_key_over_http(
    locked: TritonServer, tmp_path: Path
) -> None:
    sentinel = tmp_path / "pwned"
    statuses = {
        kind: _http(locked, method, path, body, {"sdserve-admin-key": "wrong-key"})
        for kind, (method, path, body) in _http_calls(sentinel).items()
    }

    assert statuses == dict.fromkeys(statuses, 403)
    assert not sentinel.exists()


@pytest.mark.e2e
def test_inference_health_metadata_and_config_stay_open(locked: TritonServer) -> None:
    import tritonclient.grpc as grpcclient

    np.testing.assert_array_equal(infer_add_one(locked.grpc_url), [2.0, 3.5, -2.0])
    with grpcclient.InferenceServerClient(locked.grpc_url) as client:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("add_one")
        assert client.get_server_metadata().name == "triton"
        assert client.get_model_metadata("add_one").name == "add_one"
        assert client.get_model_config("add_one").config.name == "add_one"
    assert _http(locked, "GET", "/v2/models/add_one/config", None, {}) == 200


@pytest.mark.e2e
def test_with_the_key_every_control_call_works(locked: TritonServer, tmp_path: Path) -> None:
    import tritonclient.grpc as grpcclient

    sentinel = tmp_path / "operator-loaded"
    with grpcclient.InferenceServerClient(locked.grpc_url) as client:
        for kind, call in _grpc_calls(locked, sentinel).items():
            call(client, locked.admin_key.grpc_headers)  # raises if refused
            if kind == "load with a file override":
                assert sentinel.exists()  # the operator may load code: the key is the gate
    key = locked.admin_key.headers
    for kind, (method, path, body) in _http_calls(tmp_path / "http-loaded").items():
        if kind != "system shared-memory register":  # its region does not exist: 400
            assert _http(locked, method, path, body, key) == 200, kind
    assert os.environ.get(ADMIN_KEY_ENV) is None  # the fixture's key came from the argument
