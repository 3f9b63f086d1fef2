"""The HTTP face: the same FaceService as Connect (JSON and binary), gRPC-Web and plain JSON POST,
from the same handlers, auth, limits, deadlines and error model as gRPC (server/web)."""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.protocol import ProtocolType
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2

from facesvc.v1 import face_service_pb2 as pb
from facesvc.v1 import face_service_pb2_grpc as pb_grpc
from facesvc.v1.face_service_connect import FaceServiceClientSync
from tests.conftest import ADMIN_KEY, ROOT, ServerProcess, face_path, image, keyed_channel
from tests.test_security import pki  # noqa: F401  (the test CA, server and client certificates)

ORIGIN = "https://console.example"
IDLE_S = 4  # the server's stream idle time: a body stalled this long is cut off


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = ServerProcess(
        "--http-port",
        "0",
        env={"FACESVC_HTTP_CORS_ORIGINS": ORIGIN, "FACESVC_STREAM_IDLE_SECONDS": str(IDLE_S)},
        log_path=tmp_path_factory.mktemp("http") / "server.log",
    )
    yield s
    assert s.stop() == 0


def post(srv, rpc: str, body, headers=None, key: str | None = ADMIN_KEY, context=None) -> tuple[int, dict, dict]:
    """A plain HTTP POST of JSON, as curl sends it: (status, response headers, JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(
        f"{srv.http_url}/facesvc.v1.FaceService/{rpc}",
        data=data,
        headers={"content-type": "application/json", **({"x-api-key": key} if key else {}), **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=60, context=context) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())


def b64(rel: str) -> str:
    return base64.b64encode(face_path(rel).read_bytes()).decode()


def reason(doc: dict) -> str:
    """The ErrorInfo reason of a Connect error body, read from the detail's bytes (what a Connect client
    decodes) and checked against the JSON `debug` copy the server adds for people."""
    (detail,) = [d for d in doc["details"] if d["type"] == "google.rpc.ErrorInfo"]
    info = error_details_pb2.ErrorInfo.FromString(base64.b64decode(detail["value"] + "=="))
    assert detail["debug"]["reason"] == info.reason and info.domain == "facesvc"
    return info.reason


def client(srv, protocol=ProtocolType.CONNECT, key: str | None = ADMIN_KEY, **kw) -> FaceServiceClientSync:
    c = FaceServiceClientSync(srv.http_url, protocol=protocol, **kw)
    c.headers = {"x-api-key": key} if key else {}
    return c


def test_json_detect_finds_the_six_faces_of_the_group_photo(srv):
    status, headers, doc = post(srv, "Detect", {"image": {"encoded": b64("dev/group_t1.jpg")}}, {"x-request-id": "curl-1"})
    assert status == 200, doc
    assert len(doc["faces"]) == 6
    face = doc["faces"][0]
    assert face["box"]["width"] > 0 and set(face["landmarks"]) >= {"leftEye", "rightEye", "nose"}
    assert 0 < face["quality"]["score"] <= 1
    assert headers["x-request-id"] == "curl-1"  # the caller's request id comes back, as on gRPC


def test_json_errors_carry_the_errorinfo_reason(srv):
    status, headers, doc = post(srv, "Detect", {"image": {"encoded": base64.b64encode(b"not a photo").decode()}})
    assert (status, doc["code"]) == (400, "invalid_argument") and reason(doc) == "INVALID_IMAGE"
    assert headers["x-request-id"]
    status, _, doc = post(srv, "GetCollection", {"collection": "no-such-collection"})
    assert (status, doc["code"], reason(doc)) == (404, "not_found", "COLLECTION_NOT_FOUND")
    for body in (b"{not json", b'{"image": {"encoded": 5}}'):  # the Connect library's own refusals
        status, _, doc = post(srv, "Detect", body)
        assert (status, doc["code"], reason(doc)) == (400, "invalid_argument", "VALIDATION_FAILED"), doc
    # the library quotes a bad value whole: a 200 000-character one came back in a 200 KB message
    status, _, doc = post(srv, "SearchByEmbedding", {"collection": "c", "embedding": ["x" * 200_000]})
    assert (status, reason(doc)) == (400, "VALIDATION_FAILED") and len(doc["message"]) < 400, len(doc["message"])
    # a field or an enum value the request does not have is refused, not skipped: a mistyped selection
    # ran without the single-face check, and a mistyped policy made the default collection
    for rpc, body in (
        ("Detect", {"image": {"encoded": b64("dev/img5.jpg")}, "faceOptions": {"selection": "FACE_SELECTION_REQUIRE_SINGL"}}),
        ("CreateCollection", {"collection": "typo", "livenessPolicy": "NOPE"}),
        ("CreateCollection", {"collection": "typo", "livenesPolicy": "LIVENESS_POLICY_OPTIONAL"}),
    ):
        status, _, doc = post(srv, rpc, body)
        assert (status, reason(doc)) == (400, "VALIDATION_FAILED"), (rpc, body, doc)
    assert post(srv, "GetCollection", {"collection": "typo"})[0] == 404


def test_what_no_rpc_takes_gets_a_reason_not_an_empty_500(srv):
    """Another method than POST, a content type that is not the method's (gRPC's own belongs to the
    gRPC port): the Connect library answered them with an empty 500."""
    img = {"image": {"encoded": b64("dev/img5.jpg")}}
    for kind in ("text/plain", "application/xml", "application/grpc", "application/connect+json", ""):
        status, headers, doc = post(srv, "Detect", img, {"content-type": kind})
        assert (status, reason(doc)) == (415, "VALIDATION_FAILED"), (kind, doc)
        assert "application/json" in headers["accept-post"]
    status, _, doc = post(srv, "ProcessBatch", img)  # a streaming method takes Connect's streaming encoding
    assert (status, reason(doc)) == (415, "VALIDATION_FAILED") and "connect+json" in doc["message"]
    req = urllib.request.Request(f"{srv.http_url}/facesvc.v1.FaceService/Detect", headers={"x-api-key": ADMIN_KEY})
    with pytest.raises(urllib.error.HTTPError) as get:
        urllib.request.urlopen(req, timeout=10)
    assert get.value.code == 405 and reason(json.loads(get.value.read())) == "VALIDATION_FAILED"
    assert post(srv, "Detect", img)[0] == 200


def post_bytes(srv, rpc: str, body: bytes, kind: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(
        f"{srv.http_url}/facesvc.v1.FaceService/{rpc}",
        data=body,
        headers={"content-type": kind, "x-api-key": ADMIN_KEY, **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def envelope(flag: int, payload: bytes) -> bytes:
    return bytes([flag]) + len(payload).to_bytes(4, "big") + payload


def test_a_path_that_names_no_method_is_unimplemented_with_a_reason(srv):
    """It reached the Connect library, which answered an empty 500 and logged a traceback each time."""
    for rpc in ("NoSuchMethod", "getSubject", "GetSubject/extra", ""):
        status, _, doc = post(srv, rpc, {})
        assert (status, doc["code"], reason(doc)) == (404, "unimplemented", "VALIDATION_FAILED"), rpc
    # gRPC-Web and Connect clients read HTTP 404 as UNIMPLEMENTED
    message = envelope(0, pb.GetSubjectRequest().SerializeToString())
    assert post_bytes(srv, "NoSuchMethod", message, "application/grpc-web+proto")[0] == 404


def test_grpc_web_bodies_the_library_cannot_read_get_the_grpc_ports_reason(srv):
    """The Connect library's own gRPC-Web errors came without status details, and a compressed message
    as INTERNAL: they now carry VALIDATION_FAILED, and a compressed message is UNIMPLEMENTED, as the
    gRPC port answers the same bytes."""
    message = pb.GetSubjectRequest(collection="c", subject_id="s").SerializeToString()
    cases = {
        "compressed": (envelope(1, message), "12"),
        "bad flags": (b"\x80\x00\x00\x00\x00", "3"),
        "cut short": (b"\x00\x00\x00\x00\x09\x0a", "3"),
        "not the message": (envelope(0, b"\xff\xff\xff"), "3"),
        "no message": (b"", "3"),  # the library said UNIMPLEMENTED
    }
    for label, (body, code) in cases.items():
        status, _, data = post_bytes(srv, "GetSubject", body, "application/grpc-web+proto")
        assert status == 200 and data[0] == 0x80, label
        trailers = dict(line.split(": ", 1) for line in data[5:].decode("latin-1").split("\r\n") if ": " in line)
        assert trailers["grpc-status"] == code, (label, trailers)
        rich = status_pb2.Status.FromString(base64.b64decode(trailers["grpc-status-details-bin"] + "=="))
        assert error_details_pb2.ErrorInfo.FromString(rich.details[0].value).reason == "VALIDATION_FAILED", label
    # refused from the headers, before any message (a grpc-timeout of an unknown unit): the answer is
    # in the headers alone, which an empty body held back (an empty 500 and a traceback in the log)
    before = srv.output().count("Traceback")
    status, headers, data = post_bytes(
        srv, "GetSubject", envelope(0, message), "application/grpc-web+proto", {"grpc-timeout": "5Q"}
    )
    assert (status, headers.get("grpc-status"), data) == (200, "3", b""), (status, headers)
    rich = status_pb2.Status.FromString(base64.b64decode(headers["grpc-status-details-bin"] + "=="))
    assert error_details_pb2.ErrorInfo.FromString(rich.details[0].value).reason == "VALIDATION_FAILED"
    time.sleep(0.5)
    assert srv.output().count("Traceback") == before


def test_a_connect_stream_with_a_message_that_does_not_parse_ends_with_validation_failed(srv):
    """The reader took the library's error for the stream's end: the batch answered the item before
    it, left out the one after, and ended with OK. As on the gRPC port, it now ends with the error."""
    item = pb.ProcessBatchRequest(item_id="a", process=pb.ProcessRequest(collection="nowhere", subject_id="s"))
    # bytes that are not the message; a message flagged compressed with no encoding announced (as on
    # gRPC-Web and the gRPC port: UNIMPLEMENTED)
    for bad, code in (
        (envelope(0, b"\xff\xff\xff"), "invalid_argument"),
        (envelope(1, item.SerializeToString()), "unimplemented"),
    ):
        body = envelope(0, item.SerializeToString()) + bad + envelope(0, item.SerializeToString())
        status, _, data = post_bytes(srv, "ProcessBatch", body, "application/connect+proto")
        assert status == 200
        frames, at = [], 0
        while at < len(data):
            size = int.from_bytes(data[at + 1 : at + 5], "big")
            frames.append((data[at], data[at + 5 : at + 5 + size]))
            at += 5 + size
        assert [flag for flag, _ in frames] == [0, 2]  # the first item's answer, then the end of the stream
        end = json.loads(frames[-1][1])["error"]
        (detail,) = end["details"]
        info = error_details_pb2.ErrorInfo.FromString(base64.b64decode(detail["value"] + "=="))
        assert end["code"] == code and info.reason == "VALIDATION_FAILED", end


def test_a_gzip_body_inflates_a_bounded_number_of_times(srv):
    """Connect clients gzip their bodies. The work budget grows with the bytes sent, so a body may
    inflate at most 8 times: a frame of zero pixels (2 MB in 2 KB) is refused, a photo is served."""
    img = {"image": {"encoded": b64("dev/img5.jpg")}}
    status, _, doc = post(srv, "Detect", gzip.compress(json.dumps(img).encode()), {"content-encoding": "gzip"})
    assert status == 200 and doc["faces"], doc
    raw = {
        "image": {
            "raw": {
                "width": 1000,
                "height": 700,
                "format": "PIXEL_FORMAT_BGR",
                "data": base64.b64encode(bytes(2_100_000)).decode(),
            }
        }
    }
    zipped = gzip.compress(json.dumps(raw).encode())
    assert len(zipped) < 20_000
    status, _, doc = post(srv, "Detect", zipped, {"content-encoding": "gzip"})
    assert (status, doc["code"]) == (429, "resource_exhausted") and "inflate" in doc["message"], (status, doc)
    status, _, doc = post(srv, "Detect", raw)  # sent as it is, the same frame pays its way
    assert status == 200 and "faces" not in doc, doc  # no face in it, and no error


def raw_post(srv, rpc: str, headers: dict[str, str] | list[tuple[str, str]]) -> socket.socket:
    """A connection that sends a POST's headers and none of its body (as a slow or hostile client)."""
    host, port = srv.http_url.split("//")[1].rsplit(":", 1)
    conn = socket.create_connection((host, int(port)), timeout=5)
    path = rpc if rpc.startswith("/") else f"/facesvc.v1.FaceService/{rpc}"
    lines = [f"POST {path} HTTP/1.1", f"host: {host}", "content-type: application/json"]
    pairs = headers.items() if isinstance(headers, dict) else headers
    conn.sendall(("\r\n".join(lines + [f"{k}: {v}" for k, v in pairs]) + "\r\n\r\n").encode())
    return conn


def answer(conn: socket.socket, timeout: float = 5) -> tuple[int, dict]:
    """The status and JSON body of the answer on `conn` (which need not wait for the request's body)."""
    conn.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
        re.search(rb"content-length: (\d+)", data.lower()).group(1)
    ):
        chunk = conn.recv(65536)
        assert chunk, data
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body)


def test_the_headers_decide_before_a_body_is_held(srv):
    """The WSGI app saw a request only with its whole body read, so connections without a key could
    each make the server hold 32 MB. From the headers alone: no key or an unknown one, a body larger
    than a message, or a body on a path that takes none, is answered before a byte of it is read."""
    big = str(30 * 1024 * 1024)
    for rpc, headers, status, why in (
        ("Detect", {"content-length": big}, 401, "API_KEY_MISSING"),
        ("Detect", {"content-length": big, "x-api-key": "fsk_" + "0" * 16 + "_" + "B" * 43}, 401, "API_KEY_INVALID"),
        ("Detect", {"content-length": str(64 * 1024 * 1024), "x-api-key": ADMIN_KEY}, 413, "VALIDATION_FAILED"),
        ("/", {"content-length": big}, 413, "VALIDATION_FAILED"),  # the console's path
        ("/facesvc.v1.FaceService", {"transfer-encoding": "chunked"}, 413, "VALIDATION_FAILED"),
        # two keys are no key (gRPC refuses them too), whichever comes first
        ("Detect", [("content-length", big), ("x-api-key", ADMIN_KEY), ("x-api-key", ADMIN_KEY)], 401, "API_KEY_INVALID"),
    ):
        with raw_post(srv, rpc, headers) as conn:
            got, doc = answer(conn)
            assert (got, reason(doc)) == (status, why), (rpc, headers, doc)


def test_bodies_count_as_they_arrive_and_a_stalled_one_is_cut_off(srv):
    """Bodies in flight are bounded in all and per key by the bytes that arrived, not the bytes
    announced (a connection that only announces holds nothing), and a body whose next part does not
    come within the stream idle time is answered 408 and let go."""
    admin = pb_grpc.FaceServiceStub(srv.channel)
    admin.CreateCollection(pb.CreateCollectionRequest(collection="http-gate"), timeout=10)
    key = admin.CreateApiKey(pb.CreateApiKeyRequest(collection="http-gate"), timeout=10).secret
    mb = 1024 * 1024
    announced = [raw_post(srv, "Detect", {"content-length": str(30 * mb), "x-api-key": key}) for _ in range(3)]
    sending = [raw_post(srv, "Detect", {"content-length": str(30 * mb), "x-api-key": key}) for _ in range(3)]
    try:
        for conn in sending[:2]:  # 40 MB of this key's bodies arrive
            conn.sendall(bytes(20 * mb))
        time.sleep(0.5)
        pushed = threading.Thread(target=lambda: sending[2].sendall(bytes(25 * mb)), daemon=True)
        pushed.start()
        got, doc = answer(sending[2])  # past two messages' worth for one key
        assert (got, reason(doc)) == (429, "CALL_LIMIT_REACHED"), doc
        # a small call of the same key while 40 MB of it are in flight still fits
        status, _, doc = post(srv, "GetCollection", {"collection": "http-gate"}, key=key)
        assert status == 200, doc
        for conn in sending[:2]:  # stalled: cut off after the idle time
            got, doc = answer(conn, timeout=IDLE_S + 10)
            assert (got, reason(doc)) == (408, "STREAM_IDLE"), doc
    finally:
        for conn in announced + sending:
            conn.close()
    status, _, doc = post(srv, "Detect", {"image": {"encoded": b64("dev/img5.jpg")}}, key=key)
    assert status == 200 and doc["faces"], doc


def test_refusals_reach_grpc_web_and_connect_stream_clients_with_their_reason(srv):
    """A gRPC-Web client reads the code in grpc-status headers, a Connect stream's in its end-of-stream
    message: the gate answers each so (an HTTP error status would read as UNKNOWN or UNAVAILABLE)."""
    for protocol in (ProtocolType.GRPC_WEB, ProtocolType.CONNECT):
        c = client(srv, protocol, key=None)
        with pytest.raises(ConnectError) as unary:
            c.detect(pb.DetectRequest(image=image("dev/img5.jpg")), headers=c.headers)
        with pytest.raises(ConnectError) as stream:
            list(c.process_batch(iter([pb.ProcessBatchRequest(item_id="a")]), headers=c.headers))
        for err in (unary.value, stream.value):
            assert err.code == Code.UNAUTHENTICATED, (protocol, err)
            (detail,) = err.details
            assert error_details_pb2.ErrorInfo.FromString(detail.message_bytes).reason == "API_KEY_MISSING"


def test_auth_is_the_grpc_sides(srv):
    img = {"image": {"encoded": b64("dev/img5.jpg")}}
    status, _, doc = post(srv, "Detect", img, key=None)
    assert (status, doc["code"], reason(doc)) == (401, "unauthenticated", "API_KEY_MISSING")
    status, _, doc = post(srv, "Detect", img, key="fsk_0123456789abcdef_" + "x" * 43)
    assert (status, doc["code"], reason(doc)) == (401, "unauthenticated", "API_KEY_INVALID")
    admin = client(srv)
    admin.create_collection(pb.CreateCollectionRequest(collection="http-auth-a"), headers=admin.headers)
    admin.create_collection(pb.CreateCollectionRequest(collection="http-auth-b"), headers=admin.headers)
    secret = admin.create_api_key(pb.CreateApiKeyRequest(collection="http-auth-a"), headers=admin.headers).secret
    status, _, doc = post(srv, "GetCollection", {"collection": "http-auth-b"}, key=secret)
    assert (status, doc["code"], reason(doc)) == (403, "permission_denied", "PERMISSION_DENIED")
    status, _, doc = post(srv, "CreateCollection", {"collection": "http-auth-c"}, key=secret)
    assert (status, reason(doc)) == (403, "PERMISSION_DENIED")
    assert post(srv, "GetCollection", {"collection": "http-auth-a"}, key=secret)[0] == 200


def test_spaces_around_a_key_count_alike_on_both_ports(srv):
    """HTTP servers drop the spaces around a header's value (they are no part of it, RFC 9110);
    gRPC passed them on, so a key pasted with a space worked on one port and not the other."""
    admin = client(srv)
    admin.create_collection(pb.CreateCollectionRequest(collection="http-auth-spaces"), headers=admin.headers)
    secret = admin.create_api_key(pb.CreateApiKeyRequest(collection="http-auth-spaces"), headers=admin.headers).secret
    stub = pb_grpc.FaceServiceStub(keyed_channel(srv.target, None, srv.credentials))
    for sent in (f" {secret}", f"{secret} ", f"  {ADMIN_KEY} "):
        assert post(srv, "GetCollection", {"collection": "http-auth-spaces"}, key=sent)[0] == 200
        got = stub.GetCollection(
            pb.GetCollectionRequest(collection="http-auth-spaces"), metadata=[("x-api-key", sent)], timeout=10
        )
        assert got.collection.collection == "http-auth-spaces"
    status, _, doc = post(srv, "GetCollection", {"collection": "http-auth-spaces"}, key=f"{secret[:-1]} {secret[-1]}")
    assert (status, reason(doc)) == (401, "API_KEY_INVALID")  # inside the key a space is a wrong character


def test_deadline_from_connect_timeout_ms(srv):
    status, _, doc = post(srv, "Detect", {"image": {"encoded": b64("dev/group_t1.jpg")}}, {"connect-timeout-ms": "1"})
    assert (status, doc["code"], reason(doc)) == (504, "deadline_exceeded", "CALL_ENDED")


def test_grpc_web_and_grpc_get_the_same_answer(srv):
    request = pb.DetectRequest(image=image("dev/group_t1.jpg"))
    web = client(srv, ProtocolType.GRPC_WEB)
    over_web = web.detect(request, headers=web.headers)
    over_grpc = pb_grpc.FaceServiceStub(srv.channel).Detect(request, timeout=60)
    assert len(over_web.faces) == 6
    assert json_format.MessageToDict(over_web) == json_format.MessageToDict(over_grpc)
    with pytest.raises(ConnectError) as err:  # gRPC-Web errors carry the same rich status
        web.detect(pb.DetectRequest(), headers=web.headers)
    (detail,) = err.value.details
    info = error_details_pb2.ErrorInfo.FromString(detail.message_bytes)
    assert info.reason == "VALIDATION_FAILED" and info.metadata["field"] == "image"


def test_enrol_over_connect_verify_over_both(srv):
    """Process + Register over Connect (binary), then Verify over JSON and over gRPC: one store, one answer."""
    c = client(srv)
    cid = "http-enrol"
    c.create_collection(pb.CreateCollectionRequest(collection=cid), headers=c.headers)
    staged = c.process(pb.ProcessRequest(collection=cid, subject_id="erin", image=image("dev/img21.jpg")), headers=c.headers)
    reg = c.register(pb.RegisterRequest(collection=cid, subject_id="erin", staging_token=staged.staging_token), headers=c.headers)
    assert reg.subject.face_count == 1
    probe = {"collection": cid, "subjectId": "erin", "image": {"encoded": b64("dev/img20.jpg")}}
    status, _, doc = post(srv, "Verify", probe)
    assert status == 200 and doc["match"] is True
    over_grpc = pb_grpc.FaceServiceStub(srv.channel).Verify(json_format.ParseDict(probe, pb.VerifyRequest()), timeout=60)
    assert over_grpc.match and abs(over_grpc.similarity - doc["similarity"]) < 1e-6
    status, _, doc = post(srv, "ListSubjects", {"collection": cid})
    assert [s["subjectId"] for s in doc["subjects"]] == ["erin"]


def test_batches_stream_over_connect(srv):
    """A bidirectional RPC as a Connect stream over HTTP/1.1 (half-duplex: the answers follow the requests)."""
    c = client(srv)
    items = [
        pb.ProcessBatchRequest(
            item_id="a", process=pb.ProcessRequest(collection="http-enrol", subject_id="x", image=image("dev/img13.jpg"))
        ),
        pb.ProcessBatchRequest(item_id="b", process=pb.ProcessRequest(collection="http-enrol", subject_id="y")),
    ]
    out = list(c.process_batch(iter(items), headers=c.headers))
    assert [r.item_id for r in out] == ["a", "b"]
    assert out[0].result.staging_token and out[1].error.reason == "VALIDATION_FAILED"


def frames(raw: bytes) -> list[tuple[int, bytes]]:
    """The (flags, payload) envelopes of a Connect or gRPC-Web stream's body."""
    out, at = [], 0
    while at + 5 <= len(raw):
        n = int.from_bytes(raw[at + 1 : at + 5], "big")
        out.append((raw[at], raw[at + 5 : at + 5 + n]))
        at += 5 + n
    return out


def test_a_batch_past_its_deadline_ends_with_the_deadline_not_ok(srv):
    """Over HTTP a batch whose deadline passed mid-way answered the items it had done and ended with
    success: a client read the items it never got answers for as a clean end. gRPC says
    DEADLINE_EXCEEDED; so do Connect and gRPC-Web now, with the CALL_ENDED reason."""
    admin = client(srv)
    admin.create_collection(pb.CreateCollectionRequest(collection="http-deadline"), headers=admin.headers)
    photo = pb.Image(encoded=face_path("dev/img5.jpg").read_bytes())
    items = [
        pb.ProcessBatchRequest(
            item_id=f"i{n}", process=pb.ProcessRequest(collection="http-deadline", subject_id=f"s{n}", image=photo)
        )
        for n in range(200)  # far more than a second's work
    ]
    body = b"".join(envelope(0, item.SerializeToString()) for item in items)
    status, _, raw = post_bytes(srv, "ProcessBatch", body, "application/connect+proto", {"connect-timeout-ms": "1000"})
    got = frames(raw)
    answered = [f for f, _ in got if f == 0]
    end = json.loads(got[-1][1])
    assert status == 200 and got[-1][0] == 2 and len(answered) < len(items)
    assert end["error"]["code"] == "deadline_exceeded", end
    (detail,) = end["error"]["details"]
    assert error_details_pb2.ErrorInfo.FromString(base64.b64decode(detail["value"] + "==")).reason == "CALL_ENDED"
    status, headers, raw = post_bytes(srv, "ProcessBatch", body, "application/grpc-web+proto", {"grpc-timeout": "1000m"})
    trailers = [p.decode() for f, p in frames(raw) if f & 0x80]
    assert status == 200 and trailers and "grpc-status:4" in trailers[-1].replace(" ", ""), (headers, trailers)


def abandoned(url: str, key: str | None) -> None:
    """An h2c POST from a client that gives the answer no room (flow-control window 0) and closes."""
    import h2.config
    import h2.connection
    import h2.settings

    host, port = url.split("//")[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        sid, body = conn.get_next_available_stream_id(), b'{"collection":"none"}'
        headers = [(":method", "POST"), (":path", "/facesvc.v1.FaceService/GetCollection"), (":scheme", "http")]
        headers += [(":authority", host), ("content-type", "application/json"), ("content-length", str(len(body)))]
        conn.send_headers(sid, headers + ([("x-api-key", key)] if key else []))
        conn.send_data(sid, body, end_stream=True)
        sock.sendall(conn.data_to_send())
        time.sleep(0.02)


def test_answers_a_closed_connection_gave_no_room_are_dropped(tmp_path):
    """A client that gave its answer no flow-control room and closed its connection left the answer
    waiting in the HTTP server for ever: about 47 KB per connection, with or without a key, until a
    restart, whose shutdown then waited out its whole grace period. A send ends when its client goes."""
    idle = 2
    s = ServerProcess("--http-port", "0", log_path=tmp_path / "server.log", env={"FACESVC_STREAM_IDLE_SECONDS": str(idle)})
    try:
        for i in range(40):
            abandoned(s.http_url, None if i % 2 else ADMIN_KEY)
        time.sleep(idle + 2)
        assert post(s, "GetCollection", {"collection": "none"})[0] == 404  # still serving
    finally:
        t0 = time.monotonic()
        s.stop()
        stopped = time.monotonic() - t0
    log = (tmp_path / "server.log").read_text()
    assert "CancelledError" not in log and stopped < 8, (stopped, log[-2000:])


def slow_read(url: str, path: str, body: bytes, step: int, every: float, within: float = 30) -> tuple[int, bool]:
    """An h2c POST whose answer the client reads slowly and steadily: `step` bytes of flow-control room
    every `every` seconds. (bytes of the answer received, whether its stream ended)."""
    import h2.config
    import h2.connection
    import h2.events
    import h2.settings

    host, port = url.split("//")[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=0.05) as sock:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: step})
        sid = conn.get_next_available_stream_id()
        headers = [(":method", "POST"), (":path", path), (":scheme", "http"), (":authority", host), ("x-api-key", ADMIN_KEY)]
        conn.send_headers(sid, headers + [("content-type", "application/json"), ("content-length", str(len(body)))])
        sent = got = 0
        ended, t0, last = False, time.monotonic(), time.monotonic()
        while not ended and time.monotonic() - t0 < within:
            while sent < len(body) and conn.local_flow_control_window(sid) > 0:
                n = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, len(body) - sent)
                conn.send_data(sid, body[sent : sent + n], end_stream=sent + n == len(body))
                sent += n
            sock.sendall(conn.data_to_send())
            try:
                data = sock.recv(65536)
            except TimeoutError:
                data = None
            if data == b"":
                break
            for ev in conn.receive_data(data or b""):
                got += len(ev.data) if isinstance(ev, h2.events.DataReceived) else 0
                ended = ended or isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset))
            if time.monotonic() - last >= every:
                last = time.monotonic()
                conn.increment_flow_control_window(step, stream_id=sid)
                conn.increment_flow_control_window(step)
            sock.sendall(conn.data_to_send())
        return got, ended


def test_a_slow_steady_reader_gets_its_whole_answer(tmp_path):
    """The HTTP port gave up a send after the stream idle time, and hypercorn hands an answer's body
    over in one send: an answer that took longer than the idle time to reach a client that read it
    slowly but steadily was cut off, without an error. A send now ends when the client leaves, or
    takes too little while it waits (test_a_client_that_takes_no_answer_...)."""
    idle = 2
    s = ServerProcess("--http-port", "0", log_path=tmp_path / "server.log", env={"FACESVC_STREAM_IDLE_SECONDS": str(idle)})
    try:
        body = json.dumps({"image": {"encoded": b64("dev/group_t1.jpg")}}).encode()
        whole, ended = slow_read(s.http_url, "/facesvc.v1.FaceService/Embed", body, 65535, 0.01)
        assert ended and whole > 60_000  # six faces' embeddings and boxes as JSON
        t0 = time.monotonic()
        got, ended = slow_read(s.http_url, "/facesvc.v1.FaceService/Embed", body, 1300, 0.2)  # about 6.5 KB/s
        assert (got, ended) == (whole, True) and time.monotonic() - t0 > idle  # longer than the idle time, all of it
    finally:
        s.stop()


def test_cors_lets_the_configured_origin_only(srv):
    def preflight(origin):
        req = urllib.request.Request(
            f"{srv.http_url}/facesvc.v1.FaceService/Detect",
            method="OPTIONS",
            headers={"origin": origin, "access-control-request-method": "POST", "access-control-request-headers": "x-api-key"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, dict(resp.headers)
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers)

    status, headers = preflight(ORIGIN)
    assert status == 204 and headers["access-control-allow-origin"] == ORIGIN
    assert "x-api-key" in headers["access-control-allow-headers"]
    status, headers = preflight("https://elsewhere.example")
    assert status == 403 and "access-control-allow-origin" not in headers
    _, headers, _ = post(srv, "Detect", {}, {"origin": ORIGIN})
    assert headers["access-control-allow-origin"] == ORIGIN and "x-request-id" in headers["access-control-expose-headers"]


def test_http_calls_are_logged_by_the_grpc_interceptors(srv):
    """The gRPC side's interceptors served the HTTP calls: their log lines carry request ids."""
    post(srv, "Detect", {"image": {"encoded": "AAAA"}}, {"x-request-id": "http-log-check"})
    assert "[http-log-check]: rpc=Detect code=INVALID_ARGUMENT reason=INVALID_IMAGE" in srv.output()


def test_http_port_is_off_unless_set(server):
    with pytest.raises(RuntimeError, match="no HTTP port"):
        server.http_url  # noqa: B018


def test_models_loading_and_grpc_errors_map_to_connect_codes():
    from server.web.calls import connect_code

    for code in grpc.StatusCode:
        if code is not grpc.StatusCode.OK:
            assert connect_code(code).value.replace("canceled", "cancelled") == code.name.lower()


def readme_curl() -> list[tuple[str, str]]:
    """The README's curl block: (command, the output its trailing comment promises)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- curl-examples:begin -->\s*```sh\n(.*?)```", text, re.S)
    assert block, "README lost its curl example block"
    return [tuple(part.strip() for part in line.rsplit("    # ", 1)) for line in block.group(1).splitlines() if line.strip()]


@pytest.mark.parametrize("cmd,expected", readme_curl())
def test_readme_curl_example(srv, cmd, expected):
    assert shutil.which("curl") and shutil.which("jq"), "the README's curl examples need curl and jq"
    proc = subprocess.run(
        ["bash", "-o", "pipefail", "-c", cmd.replace("http://localhost:8080", srv.http_url)],
        cwd=ROOT,
        env={**os.environ, "FACESVC_API_KEY": ADMIN_KEY},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected


def test_tls_and_client_certificates_on_the_http_port(pki, tmp_path):  # noqa: F811
    """The HTTP port serves TLS with the gRPC side's certificate, and asks for a client certificate too."""
    ca = pki / "ca.pem"
    s = ServerProcess(
        "--http-port",
        "0",
        "--tls-cert",
        str(pki / "server.pem"),
        "--tls-key",
        str(pki / "server.key"),
        "--tls-client-ca",
        str(ca),
        log_path=tmp_path / "server.log",
        credentials=grpc.ssl_channel_credentials(
            ca.read_bytes(), (pki / "client.key").read_bytes(), (pki / "client.pem").read_bytes()
        ),
    )
    try:
        assert s.http_url.startswith("https://127.0.0.1:")
        with_cert = ssl.create_default_context(cafile=str(ca))
        with_cert.load_cert_chain(pki / "client.pem", pki / "client.key")
        status, _, doc = post(s, "Detect", {"image": {"encoded": b64("dev/img5.jpg")}}, context=with_cert)
        assert status == 200 and len(doc["faces"]) == 1
        with pytest.raises(OSError):  # no client certificate: the handshake (or the first read) fails
            post(s, "Detect", {"image": {"encoded": b64("dev/img5.jpg")}}, context=ssl.create_default_context(cafile=str(ca)))
    finally:
        assert s.stop() == 0


def test_a_long_grpc_timeout_is_passed_on_in_a_unit_it_fits_in():
    """The gate hands the handler what is left of a request's deadline; a gRPC-Web grpc-timeout of a
    day or more written in milliseconds took nine digits, and the protocol layer refused it."""
    from server.web.gate import _grpc_timeout

    assert _grpc_timeout(2.5) == "2500m"
    assert _grpc_timeout(108000) == "108000S" and _grpc_timeout(30 * 3600) == "108000S"
    assert _grpc_timeout(10**9) == "16666666M" and _grpc_timeout(10**12) == "99999999H"
    assert all(len(_grpc_timeout(s)) <= 9 for s in (0.0005, 1, 99999.999, 1e7, 1e9))


def h2_client(url: str, window: int):
    """An h2c connection whose streams give their answers `window` bytes of flow-control room."""
    import h2.config
    import h2.connection
    import h2.settings

    host, port = url.split("//")[1].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
    sock.sendall(conn.data_to_send())
    return sock, conn, [(":scheme", "http"), (":authority", host)]


def h2_status(sock, conn, timeout: float = 5) -> bytes:
    """The HTTP status of the first answer that comes on an h2c connection."""
    import h2.events

    sock.settimeout(timeout)
    while True:
        data = sock.recv(65536)
        assert data, "the connection closed without an answer"
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                return dict(ev.headers)[b":status"]
        sock.sendall(conn.data_to_send())


def test_a_client_that_takes_no_answer_holds_no_worker_and_loses_its_connection(tmp_path):
    """A client that never opened its streams' flow-control window kept their answers, and the worker
    threads sending them, for good: a few streams asking for the console's files (no key needed) held
    every HTTP worker, and a key's calls stopped counting against its limit once their handlers had
    returned, while their answers waited. Files and preflights are now made on the event loop, a
    key's call counts until its answer is sent, and a connection that takes nothing of its answers
    for the stream idle time is ended."""
    idle = 2
    s = ServerProcess(
        "--http-port",
        "0",
        log_path=tmp_path / "server.log",
        env={"FACESVC_STREAM_IDLE_SECONDS": str(idle), "FACESVC_MAX_CALLS_PER_KEY": "1"},
    )
    try:
        admin = pb_grpc.FaceServiceStub(s.channel)
        admin.CreateCollection(pb.CreateCollectionRequest(collection="http-stall"), timeout=10)
        key = admin.CreateApiKey(pb.CreateApiKeyRequest(collection="http-stall"), timeout=10).secret
        sock, conn, common = h2_client(s.http_url, 0)
        for _ in range(12):  # more than the server's worker threads
            conn.send_headers(conn.get_next_available_stream_id(), [(":method", "GET"), (":path", "/"), *common], end_stream=True)
        body = b'{"collection":"http-stall"}'
        rpc = [(":method", "POST"), (":path", "/facesvc.v1.FaceService/GetCollection"), *common]
        rpc += [("content-type", "application/json"), ("content-length", str(len(body))), ("x-api-key", key)]
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, rpc)
        conn.send_data(sid, body, end_stream=True)
        sock.sendall(conn.data_to_send())
        time.sleep(0.5)
        t0 = time.monotonic()
        with urllib.request.urlopen(s.http_url + "/", timeout=5) as r:  # the console, to someone else
            assert r.status == 200
        assert post(s, "GetCollection", {"collection": "none"})[0] == 404  # an RPC: a worker is free
        assert time.monotonic() - t0 < 1.5
        status, _, doc = post(s, "GetCollection", {"collection": "http-stall"}, key=key)
        assert (status, reason(doc)) == (429, "CALL_LIMIT_REACHED")  # its call holds the key's one slot
        sock.settimeout(idle + 3)
        ended = False
        try:
            while sock.recv(65536):  # settings and headers, no bodies; then the connection ends
                pass
            ended = True
        except ConnectionResetError:
            ended = True
        assert ended and time.monotonic() - t0 < idle + 3
        sock.close()
        assert post(s, "GetCollection", {"collection": "http-stall"}, key=key)[0] == 200  # the slot was given back
    finally:
        s.stop()
    assert (tmp_path / "server.log").read_text().count("HTTP connection ended: a client took 0 bytes of its answers") == 1


def test_a_bodiless_request_left_unended_is_answered_after_the_idle_time(tmp_path):
    """Over HTTP/2 a GET whose stream never ends (no END_STREAM, no body) waited for its end for good,
    without a key: tens of thousands of them held hundreds of megabytes."""

    idle = 2
    s = ServerProcess("--http-port", "0", log_path=tmp_path / "server.log", env={"FACESVC_STREAM_IDLE_SECONDS": str(idle)})
    try:
        sock, conn, common = h2_client(s.http_url, 65535)
        conn.send_headers(conn.get_next_available_stream_id(), [(":method", "GET"), (":path", "/"), *common])
        sock.sendall(conn.data_to_send())
        t0 = time.monotonic()
        assert h2_status(sock, conn, idle + 3) == b"408" and idle - 0.5 < time.monotonic() - t0 < idle + 3
        sock.close()
    finally:
        s.stop()


def test_answers_not_taken_are_bounded_in_all(tmp_path):
    """Each stream of a client that never opens its window holds its answer until the connection is
    ended; many such connections held any amount of memory meanwhile. Past a message's worth per
    worker in all, the connection holding the most is ended at once (not the one about to send)."""
    idle = 20
    s = ServerProcess(
        "--http-port",
        "0",
        log_path=tmp_path / "server.log",
        env={"FACESVC_STREAM_IDLE_SECONDS": str(idle), "FACESVC_MAX_MESSAGE_MB": "1", "FACESVC_WORKERS": "2"},
    )
    (bundle,) = (ROOT / "web" / "dist" / "assets").glob("*.js")  # the console's script, 138 KB
    get = [(":method", "GET"), (":path", "/assets/" + bundle.name)]
    try:
        holding, conn, common = h2_client(s.http_url, 0)
        for _ in range(2 * 2**20 // bundle.stat().st_size):  # 2 MiB of them, less one
            conn.send_headers(conn.get_next_available_stream_id(), [*get, *common], end_stream=True)
        holding.sendall(conn.data_to_send())
        time.sleep(1)
        t0 = time.monotonic()
        with urllib.request.urlopen(s.http_url + "/assets/" + bundle.name, timeout=5) as r:  # goes over the bound
            assert r.status == 200 and len(r.read()) == bundle.stat().st_size
        holding.settimeout(5)
        ended = False
        try:
            while holding.recv(65536):
                pass
            ended = True
        except ConnectionResetError:
            ended = True
        assert ended and time.monotonic() - t0 < 5  # at once, not after the idle time
        holding.close()
    finally:
        s.stop()
    assert "HTTP connection ended: the server holds its most answers not yet taken" in (tmp_path / "server.log").read_text()


def test_one_stream_read_steadily_does_not_keep_the_others(tmp_path):
    """How much a connection took was counted for the whole connection: an HTTP/2 client opening one
    stream's window at 8 KB a second kept its other streams' answers, stuck, for as long as it liked.
    An answer whose own window the client keeps shut counts for itself."""

    idle = 2
    s = ServerProcess("--http-port", "0", log_path=tmp_path / "server.log", env={"FACESVC_STREAM_IDLE_SECONDS": str(idle)})
    (bundle,) = (ROOT / "web" / "dist" / "assets").glob("*.js")
    try:
        sock, conn, common = h2_client(s.http_url, 0)
        get = [(":method", "GET"), (":path", "/assets/" + bundle.name), *common]
        for _ in range(4):
            conn.send_headers(conn.get_next_available_stream_id(), get, end_stream=True)
        pump = conn.get_next_available_stream_id()
        conn.send_headers(pump, get, end_stream=True)
        sock.sendall(conn.data_to_send())
        t0 = time.monotonic()
        got, ended = h2_read(sock, conn, 4 * idle, {None: 32768, pump: 32768})
        assert got.get(pump) and ended and time.monotonic() - t0 < idle + 3
        sock.close()
    finally:
        s.stop()


def test_a_stop_does_not_wait_for_clients_that_are_not_reading(tmp_path):
    """A client holding an answer it gave no room held the stop for its whole grace period, whose end
    cancelled the send inside hypercorn and logged a traceback ("the HTTP server failed")."""
    s = ServerProcess("--http-port", "0", log_path=tmp_path / "server.log", env={"FACESVC_STREAM_IDLE_SECONDS": "30"})
    sock, conn, common = h2_client(s.http_url, 0)
    try:
        for _ in range(3):
            conn.send_headers(conn.get_next_available_stream_id(), [(":method", "GET"), (":path", "/"), *common], end_stream=True)
        sock.sendall(conn.data_to_send())
        time.sleep(2.5)  # served, and their sends waiting a check or more
        t0 = time.monotonic()
        assert s.stop() == 0
        assert time.monotonic() - t0 < 5
    finally:
        sock.close()
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log and "the server is stopping and its client had not taken its answer" in log


def h2_read(sock, conn, seconds: float, grant: dict[int | None, int] | None = None) -> tuple[dict[int, int], bool]:
    """Reads an h2c connection for `seconds`, granting each second `grant` bytes of flow-control room
    per stream id (None: the connection). (bytes received per stream, whether the connection ended)."""
    import h2.events

    got: dict[int, int] = {}
    t0, last = time.monotonic(), 0.0
    sock.settimeout(0.1)
    while time.monotonic() - t0 < seconds:
        if grant and time.monotonic() - last >= 1:
            last = time.monotonic()
            for sid, n in grant.items():
                if sid is None or not conn.streams.get(sid) or conn.streams[sid].open:  # not one answered whole
                    conn.increment_flow_control_window(n, stream_id=sid)
            sock.sendall(conn.data_to_send())
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return got, True
        if not data:
            return got, True
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.DataReceived):
                got[ev.stream_id] = got.get(ev.stream_id, 0) + len(ev.data)
        sock.sendall(conn.data_to_send())
    return got, False


def test_the_bound_on_answers_ends_who_holds_most_not_a_slow_reader(tmp_path):
    """The bound counted whole answers, not what was still to be taken: a client reading slowly but
    steadily was ended when connections that took nothing went over it, and a long stream read as
    it came counted against itself. What each answer still has in the server counts."""
    s = ServerProcess(
        "--http-port",
        "0",
        log_path=tmp_path / "server.log",
        env={"FACESVC_STREAM_IDLE_SECONDS": "20", "FACESVC_MAX_MESSAGE_MB": "1", "FACESVC_WORKERS": "2"},
    )
    (bundle,) = (ROOT / "web" / "dist" / "assets").glob("*.js")
    get = [(":method", "GET"), (":path", "/assets/" + bundle.name)]
    idle = []
    try:
        reader, conn, common = h2_client(s.http_url, 0)
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [*get, *common], end_stream=True)
        reader.sendall(conn.data_to_send())
        got, ended = h2_read(reader, conn, 3, {None: 8192, sid: 8192})  # 8 KB a second
        assert got.get(sid) and not ended
        for _ in range(2 * 2**20 // bundle.stat().st_size + 1):  # each holds a whole file, more than the reader
            sock, c, _ = h2_client(s.http_url, 0)
            c.send_headers(c.get_next_available_stream_id(), [*get, *common], end_stream=True)
            sock.sendall(c.data_to_send())
            idle.append(sock)
        time.sleep(1)  # their answers go over the bound while the reader still has some of its own to take
        got2, ended = h2_read(reader, conn, 2, {None: 1 << 20, sid: 1 << 20})  # the reader takes the rest
        assert not ended and got[sid] + got2.get(sid, 0) == bundle.stat().st_size
    finally:
        for sock in idle:
            sock.close()
        s.stop()
    assert (
        f"the server holds its most answers not yet taken, {bundle.stat().st_size} bytes of them"
        in (tmp_path / "server.log").read_text()
    )


def test_answers_sharing_a_connection_share_its_rate(tmp_path):
    """Each answer had to leave at 4 KB a second, so a client taking its connection steadily with
    eight answers in flight on a slow link (8 KB/s in all) lost the connection after the idle time."""
    idle = 3
    s = ServerProcess("--http-port", "0", log_path=tmp_path / "server.log", env={"FACESVC_STREAM_IDLE_SECONDS": str(idle)})
    (bundle,) = (ROOT / "web" / "dist" / "assets").glob("*.js")
    try:
        sock, conn, common = h2_client(s.http_url, 1 << 20)  # each stream may take it all: the connection is the bound
        for _ in range(8):
            conn.send_headers(
                conn.get_next_available_stream_id(),
                [(":method", "GET"), (":path", "/assets/" + bundle.name), *common],
                end_stream=True,
            )
        sock.sendall(conn.data_to_send())
        got, ended = h2_read(sock, conn, 2 * idle + 1, {None: 8192})
        assert not ended and len(got) == 8
        sock.close()
    finally:
        s.stop()


def test_a_body_on_a_path_that_takes_none_is_refused_over_http2_too(tmp_path):
    """Over HTTP/2 a body needs no header to announce it: a GET of the console with a body was served,
    and data sent after its answer left a hypercorn traceback in the log per connection."""

    s = ServerProcess("--http-port", "0", log_path=tmp_path / "server.log")
    try:
        for _ in range(3):
            sock, conn, common = h2_client(s.http_url, 65535)
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, [(":method", "GET"), (":path", "/"), *common])
            conn.send_data(sid, b"x" * 100)
            sock.sendall(conn.data_to_send())
            assert h2_status(sock, conn) == b"413"
            try:
                conn.send_data(sid, b"y" * 100, end_stream=True)  # after the answer
                sock.sendall(conn.data_to_send())
            except Exception:  # noqa: BLE001, S110 - the client's own library may know the stream is closed
                pass
            time.sleep(0.3)
            sock.close()
        # an empty DATA frame that ends the stream is no body (some clients and proxies end a GET so)
        sock, conn, common = h2_client(s.http_url, 65535)
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "GET"), (":path", "/"), *common])
        conn.send_data(sid, b"", end_stream=True)
        sock.sendall(conn.data_to_send())
        assert h2_status(sock, conn) == b"200"
        sock.close()
        assert post(s, "GetCollection", {"collection": "none"})[0] == 404
    finally:
        s.stop()
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log  # hypercorn's KeyError for data after an answer: one line each


def test_a_stop_ends_what_still_waits_for_a_trickling_client_before_its_grace_ends(tmp_path):
    """A client taking a few hundred bytes a second held the stop for its whole grace, at whose end
    hypercorn cancelled the sends and logged tracebacks."""
    s = ServerProcess(
        "--http-port",
        "0",
        log_path=tmp_path / "server.log",
        env={"FACESVC_STREAM_IDLE_SECONDS": "30", "FACESVC_GRACE_SECONDS": "3"},
    )
    (bundle,) = (ROOT / "web" / "dist" / "assets").glob("*.js")
    sock, conn, common = h2_client(s.http_url, 0)
    stop: list[float] = []
    try:
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "GET"), (":path", "/assets/" + bundle.name), *common], end_stream=True)
        sock.sendall(conn.data_to_send())
        h2_read(sock, conn, 2.5, {None: 200, sid: 200})
        stopping = threading.Thread(target=lambda: stop.append(time.monotonic()) or s.stop() or stop.append(time.monotonic()))
        stopping.start()
        h2_read(sock, conn, 6, {None: 200, sid: 200})  # trickling on while the server stops
        stopping.join(15)
    finally:
        sock.close()
    assert len(stop) == 2 and stop[1] - stop[0] < 5
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log and "HTTP connection failed" not in log and "had not taken its answer" in log
