"""Start-up security settings: auth on/off, TLS and mutual TLS, secrets kept out of the log."""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from facesvc.v1 import face_service_pb2 as pb
from facesvc.v1 import face_service_pb2_grpc as pb_grpc
from server import config
from tests.conftest import ADMIN_KEY, PYTHON, ROOT, ServerProcess, image


def run_server(tmp_path, *args, env=None, timeout=60) -> subprocess.CompletedProcess:
    """A server that is expected to refuse to start."""
    return subprocess.run(
        [PYTHON, "-m", "server", "--host", "127.0.0.1", "--port", "0", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "FACESVC_DATA_DIR": str(tmp_path / "data"), **(env or {})},
    )


def test_auth_on_without_an_admin_key_refuses_to_start(tmp_path):
    proc = run_server(tmp_path, env={"FACESVC_ADMIN_API_KEY": ""})
    assert proc.returncode == 2 and "FACESVC_ADMIN_API_KEY is missing" in proc.stderr
    proc = run_server(tmp_path, env={"FACESVC_ADMIN_API_KEY": "short"})
    assert proc.returncode == 2


def test_unreachable_database_or_redis_is_a_clear_startup_error(tmp_path):
    proc = run_server(tmp_path, "--auth=false", env={"FACESVC_DB_URL": "mysql://root:hunter2@127.0.0.1:9/x"})
    assert proc.returncode == 2 and "cannot reach the database" in proc.stderr
    assert "hunter2" not in proc.stderr  # the password is redacted in the settings printout and the error
    proc = run_server(tmp_path, "--auth=false", env={"FACESVC_REDIS_URL": "redis://127.0.0.1:9/0"})
    assert proc.returncode == 2 and "staging cache (Redis) unavailable" in proc.stderr


def test_settings_printout_redacts_secrets():
    s = config.load(
        [
            "--admin-api-key",
            "s3cret-admin-key-xyz",
            "--crop-key",
            "AAAA",
            "--db-url",
            "mysql://app:pa55word@db:3306/faces",
            "--redis-url",
            "redis://:redispw@cache:6379/0",
        ],
        {},
    )
    text = config.describe(s)
    for secret in ("s3cret-admin-key-xyz", "AAAA", "pa55word", "redispw"):
        assert secret not in text
    assert "mysql://app:***@db:3306/faces" in text


def test_auth_off_warns_loudly_and_needs_no_key(tmp_path):
    srv = ServerProcess("--auth=false", log_path=tmp_path / "server.log", api_key=None)
    try:
        assert "AUTH IS DISABLED" in srv.output()
        stub = pb_grpc.FaceServiceStub(srv.channel)
        stub.CreateCollection(pb.CreateCollectionRequest(collection="open"), timeout=10)
        assert [c.collection for c in stub.ListCollections(pb.ListCollectionsRequest(), timeout=10).collections] == ["open"]
    finally:
        assert srv.stop() == 0


# -- TLS -------------------------------------------------------------------------
def _cert(subject: str, key, issuer_name, issuer_key, *, ca: bool, san_ip: str | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san_ip:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(san_ip))]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _pem(obj) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "facesvc test CA")])
    ca = _cert("facesvc test CA", ca_key, ca_name, ca_key, ca=True)
    srv_key, cli_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    files = {
        "ca.pem": _pem(ca),
        "server.key": _pem(srv_key),
        "client.key": _pem(cli_key),
        "server.pem": _pem(_cert("facesvc", srv_key, ca_name, ca_key, ca=False, san_ip="127.0.0.1")),
        "client.pem": _pem(_cert("camera-7", cli_key, ca_name, ca_key, ca=False)),
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


def test_tls_and_mutual_tls(pki, tmp_path):
    ca = (pki / "ca.pem").read_bytes()
    tls = ["--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key")]
    srv = ServerProcess(
        *tls,
        "--tls-client-ca",
        str(pki / "ca.pem"),
        log_path=tmp_path / "mtls.log",
        credentials=grpc.ssl_channel_credentials(ca, (pki / "client.key").read_bytes(), (pki / "client.pem").read_bytes()),
    )
    try:
        assert "with TLS + client certificates" in srv.output()
        ok = pb_grpc.FaceServiceStub(srv.channel).Detect(pb.DetectRequest(image=image("dev/img5.jpg")), timeout=30)
        assert len(ok.faces) == 1
        for creds in (grpc.ssl_channel_credentials(ca), None):  # no client certificate; plaintext
            with grpc.secure_channel(srv.target, creds) if creds else grpc.insecure_channel(srv.target) as ch:
                with pytest.raises(grpc.RpcError) as e:
                    pb_grpc.FaceServiceStub(ch).Detect(
                        pb.DetectRequest(image=image("dev/img5.jpg")), timeout=5, metadata=[("x-api-key", ADMIN_KEY)]
                    )
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        assert srv.stop() == 0
    # server-only TLS: any client that trusts the CA may connect
    srv = ServerProcess(*tls, log_path=tmp_path / "tls.log", credentials=grpc.ssl_channel_credentials(ca))
    try:
        assert (
            len(pb_grpc.FaceServiceStub(srv.channel).Detect(pb.DetectRequest(image=image("dev/img5.jpg")), timeout=30).faces) == 1
        )
    finally:
        assert srv.stop() == 0
    proc = run_server(tmp_path, "--auth=false", "--tls-cert", str(pki / "server.pem"))
    assert proc.returncode != 0 and "needs both" in proc.stderr
