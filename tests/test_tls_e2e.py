"""gRPC over TLS end to end: a real tritonserver serving certificates this test makes with
`openssl` (a CA, a server certificate for 127.0.0.1 and localhost, a client certificate, and
a second, untrusted CA), reached through the SDK, the CLI and the web UI's backend."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cases import make_case

from sdserve_client import InpaintClient, SdserveError, cli
from sdserve_client.tls import TlsSettings
from sdserve_client.webui.backend import Backend
from sdserve_pipeline.server_security import TlsConfig
from sdserve_pipeline.triton_server import TritonServer

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command"),
]
PROMPT = "a red bicycle"
EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


def make_ca(folder: Path, name: str) -> Pair:
    """A self-signed CA certificate and its key."""
    pair = Pair(folder / f"{name}.pem", folder / f"{name}.key")
    _openssl(
        "req", "-x509", *EC_KEY, "-keyout", str(pair.key), "-out", str(pair.cert),
        "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip
    return pair


def issue(folder: Path, ca: Pair, name: str, extensions: str) -> Pair:
    """A certificate signed by `ca` with the given X.509v3 extensions, and its key."""
    pair = Pair(folder / f"{name}.pem", folder / f"{name}.key")
    csr, ext = folder / f"{name}.csr", folder / f"{name}.ext"
    ext.write_text(extensions + "\n")
    _openssl(
        "req", "-new", *EC_KEY, "-keyout", str(pair.key), "-out", str(csr),
        "-subj", f"/CN={name}", cwd=folder,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
        "-CAcreateserial", "-out", str(pair.cert), "-days", "2", "-extfile", str(ext),
        cwd=folder,
    )  # fmt: skip
    return pair


@dataclass(frozen=True)
class Certificates:
    ca: Pair
    server: Pair
    client: Pair
    wrong_ca: Pair
    stranger: Pair  # a client certificate signed by the wrong CA


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    folder = tmp_path_factory.mktemp("certs")
    ca, wrong_ca = make_ca(folder, "sdserve-test-ca"), make_ca(folder, "untrusted-ca")
    server_ext = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"
    return Certificates(
        ca=ca,
        server=issue(folder, ca, "server", server_ext),
        client=issue(folder, ca, "client", "extendedKeyUsage=clientAuth"),
        wrong_ca=wrong_ca,
        stranger=issue(folder, wrong_ca, "stranger", "extendedKeyUsage=clientAuth"),
    )


def _serve(repository: Path, build: Path, tls: TlsConfig):
    server = TritonServer(
        repository, http_port=0, grpc_port=0, metrics_port=0, build_dir=build, tls=tls
    )
    server.start()
    try:
        server.wait_ready(timeout_s=300)  # over HTTP, which has no TLS
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def tls_server(repository, certs, tmp_path_factory):
    server = _serve(
        repository,
        tmp_path_factory.mktemp("triton-tls"),
        TlsConfig(certs.server.cert, certs.server.key),
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mutual_server(repository, certs, tmp_path_factory):
    tls = TlsConfig(certs.server.cert, certs.server.key, client_ca=certs.ca.cert)
    server = _serve(repository, tmp_path_factory.mktemp("triton-mtls"), tls)
    yield server
    server.stop()


def _inpaint(client: InpaintClient, seed: int = 3) -> np.ndarray:
    image, mask = make_case(64, 64, seed=1)
    result = client.inpaint(image, mask, PROMPT, steps=2, seed=seed, timeout=60)
    assert result.seeds == [seed]
    return result.arrays


def test_a_request_succeeds_over_tls(tls_server, certs):
    with InpaintClient(tls_server.grpc_url, ssl=TlsSettings(certs.ca.cert)) as client:
        assert client.is_ready()
        first = _inpaint(client)
    assert first.shape == (1, 64, 64, 3)
    by_name = tls_server.grpc_url.replace("127.0.0.1", "localhost")  # the certificate names both
    with InpaintClient(by_name, ssl=TlsSettings(certs.ca.cert)) as client:
        np.testing.assert_array_equal(_inpaint(client), first)


def test_a_plaintext_client_is_refused_with_a_clear_error(tls_server):
    with InpaintClient(tls_server.grpc_url, timeout=10) as client:
        assert not client.is_ready()
        with pytest.raises(SdserveError) as info:
            _inpaint(client)
    assert info.value.status == "StatusCode.UNAVAILABLE"
    assert info.value.message.startswith(
        f"{tls_server.grpc_url} closed the connection while it was being set up: the server "
        "may require TLS"
    )


def test_a_client_trusting_another_ca_is_refused_with_a_clear_error(tls_server, certs):
    settings = TlsSettings(certs.wrong_ca.cert)
    client = InpaintClient(tls_server.grpc_url, ssl=settings, timeout=10)
    with client, pytest.raises(SdserveError) as info:
        _inpaint(client)
    assert info.value.message.startswith(
        f"TLS handshake with {tls_server.grpc_url} failed: the server's certificate is not signed"
        f" by a CA in the root certificates in {certs.wrong_ca.cert}"
    )
    assert "CERTIFICATE_VERIFY_FAILED" in info.value.message  # gRPC's own words follow


def test_cli_over_tls(tls_server, certs, tmp_path, capsys):
    tls = ["--server", tls_server.grpc_url, "--root-certs", str(certs.ca.cert)]
    out = tmp_path / "t2i.png"
    argv = ["txt2img", *tls, "--prompt", PROMPT, "--height", "64", "--width", "64"]
    assert cli.main([*argv, "--steps", "2", "--seed", "5", "--out", str(out)]) == 0
    assert out.is_file() and "seed=5" in capsys.readouterr().out
    assert cli.main(["models", "--server", tls_server.grpc_url, "--timeout", "10"]) == 1
    assert "may require TLS" in capsys.readouterr().err


def test_the_model_index_needs_the_operators_key_and_the_checkpoint_listing_does_not(
    tls_server, certs, capsys
):
    tls = ["--server", tls_server.grpc_url, "--root-certs", str(certs.ca.cert)]
    assert cli.main(["models", *tls]) == 0  # the checkpoint listing model is open
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("checkpoint budget:")
    assert any(line.startswith("inpaint\t") for line in lines)
    settings = TlsSettings(certs.ca.cert)
    with (
        InpaintClient(tls_server.grpc_url, ssl=settings) as client,
        pytest.raises(SdserveError, match="keeps its model-repository API closed"),
    ):
        client.list_models()  # Triton's repository index: a control API
    key = tls_server.admin_key.value
    with InpaintClient(tls_server.grpc_url, ssl=settings, admin_key=key) as client:
        assert "inpaint" in client.list_models()


def test_web_ui_backend_over_tls(tls_server, certs):
    settings = TlsSettings(certs.ca.cert)
    locked = Backend(tls_server.grpc_url, ssl=settings, model="inpaint")
    assert locked.models() == ["inpaint"]  # index closed without the key: the page's model
    assert locked.model_info("inpaint").max_steps > 0  # the config stays open
    locked.close()
    backend = Backend(tls_server.grpc_url, ssl=settings, admin_key=tls_server.admin_key.value)
    assert "inpaint" in backend.models()
    assert backend.status("inpaint").queue.ready
    image, mask = make_case(64, 64, seed=1)
    result = backend.client("inpaint").inpaint(image, mask, PROMPT, steps=2, seed=3)
    assert result.seeds == [3]
    backend.close()


def test_mutual_tls_admits_a_client_with_a_certificate_of_the_ca(mutual_server, certs):
    settings = TlsSettings(certs.ca.cert, certs.client.key, certs.client.cert)
    with InpaintClient(mutual_server.grpc_url, ssl=settings) as client:
        assert _inpaint(client).shape == (1, 64, 64, 3)


def test_mutual_tls_refuses_a_client_without_a_certificate(mutual_server, certs):
    client = InpaintClient(mutual_server.grpc_url, ssl=TlsSettings(certs.ca.cert), timeout=10)
    with client, pytest.raises(SdserveError) as info:
        _inpaint(client)
    assert info.value.message.startswith(
        f"{mutual_server.grpc_url} closed the TLS connection while it was being set up: the "
        "server may require a client certificate"
    )


def test_mutual_tls_refuses_a_certificate_of_another_ca(mutual_server, certs):
    settings = TlsSettings(certs.ca.cert, certs.stranger.key, certs.stranger.cert)
    client = InpaintClient(mutual_server.grpc_url, ssl=settings, timeout=10)
    with client, pytest.raises(SdserveError) as info:
        _inpaint(client)
    assert info.value.status == "StatusCode.UNAVAILABLE"
    assert "closed the TLS connection while it was being set up" in info.value.message
