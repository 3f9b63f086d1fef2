"""The Python client (clients/python) and the `facesvc` CLI, end to end against a live server."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid

import cv2
import grpc
import pytest

from facesvc_client import FaceClient, InvalidArgument, NotFound, PermissionDenied, Unauthenticated, Unavailable, to_image
from tests.conftest import ADMIN_KEY, FACES, ROOT, ServerProcess, face_path


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = ServerProcess(log_path=tmp_path_factory.mktemp("client") / "server.log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(srv):
    with FaceClient(srv.target, api_key=ADMIN_KEY) as c:
        yield c


def cli(srv, *args, key: str | None = ADMIN_KEY, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "FACESVC_TARGET": srv.target, "FACESVC_API_KEY": key or ""}
    p = subprocess.run(
        [sys.executable, "-m", "facesvc_client.cli", *args], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT
    )
    if check:
        assert p.returncode == 0, f"facesvc {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def test_every_image_form_gives_the_same_faces(client):
    path = face_path("dev/img1.jpg")
    raw = path.read_bytes()
    frame = cv2.imread(str(path))
    forms = {
        "path": path,
        "str path": str(path),
        "bytes": raw,
        "base64": base64.b64encode(raw).decode(),
        "data url": "data:image/jpeg;base64," + base64.b64encode(raw).decode(),
        "numpy": frame,
    }
    boxes = {name: client.detect(v).faces[0].box for name, v in forms.items()}
    ref = boxes["path"]
    for name, box in boxes.items():
        assert abs(box.x - ref.x) < 2 and abs(box.width - ref.width) < 2, name
    with pytest.raises(TypeError):
        to_image(12345)


def test_typed_errors_carry_the_reason(srv, client):
    with pytest.raises(InvalidArgument) as e:
        client.compare(face_path("dev/noface_rocket.jpg"), face_path("dev/img1.jpg"))
    assert e.value.reason == "NO_FACE_DETECTED" and e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(NotFound) as e:
        client.get_collection("no-such-collection")
    assert e.value.reason == "COLLECTION_NOT_FOUND"
    with FaceClient(srv.target) as anonymous, pytest.raises(Unauthenticated) as e:
        anonymous.detect(face_path("dev/img1.jpg"))
    assert e.value.reason == "API_KEY_MISSING"


def test_identity_flow_and_management_through_the_client(client):
    coll = "cl-" + uuid.uuid4().hex[:6]
    client.create_collection(coll, display_name="client test")
    staged = client.process(coll, "person_01", face_path("dev/img1.jpg"))
    reg = client.register(coll, "person_01", staging_token=staged.staging_token, metadata={"team": "a"})
    assert reg.subject_created and reg.subject.metadata["team"] == "a"
    assert client.verify(coll, "person_01", face_path("dev/img2.jpg")).match
    assert not client.verify(coll, "person_01", face_path("dev/img13.jpg")).match
    assert client.search(coll, face_path("dev/img6.jpg")).results[0].matches[0].subject_id == "person_01"
    assert [s.subject_id for s in client.list_subjects(coll, page_size=1)] == ["person_01"]
    key = client.create_api_key(coll, "scoped")
    with FaceClient(client_target(client), api_key=key.secret) as scoped, pytest.raises(PermissionDenied):
        scoped.list_subjects("other-" + coll).__next__()
    assert client.delete_subject(coll, "person_01") == 1
    client.delete_collection(coll)


def client_target(c: FaceClient) -> str:
    return c.channel._channel.target().decode()


def test_retries_unavailable_until_the_server_is_up(tmp_path):
    """A call made before the server has started succeeds once it is up: UNAVAILABLE is retried with backoff."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result: dict = {}

    def call():
        with FaceClient(f"127.0.0.1:{port}", api_key=ADMIN_KEY, retries=30, backoff=0.25, timeout=120) as c:
            t0 = time.monotonic()
            result["faces"] = len(c.detect(face_path("dev/img1.jpg")).faces)
            result["waited"] = time.monotonic() - t0

    t = threading.Thread(target=call)
    t.start()
    time.sleep(1.0)  # nothing listens yet: the first attempts fail with UNAVAILABLE
    srv = ServerProcess("--port", str(port), log_path=tmp_path / "late.log")
    try:
        t.join(120)
        assert result.get("faces") == 1 and result["waited"] > 1.0
    finally:
        srv.stop()
    with FaceClient(f"127.0.0.1:{port}", retries=2, backoff=0.05, timeout=5) as c, pytest.raises(Unavailable):
        c.health()  # the server is gone: retried twice, then a typed error


def test_cli_commands_end_to_end(srv, tmp_path):
    assert cli(srv, "health").stdout.strip() == "SERVING"
    det = json.loads(cli(srv, "detect", str(face_path("dev/group_t1.jpg"))).stdout)
    assert len(det["faces"]) == 6
    live = json.loads(cli(srv, "liveness", str(face_path("liveness/spoof_replay_01_minivision_F2.jpg"))).stdout)
    assert live["liveness"].get("isLive", False) is False
    cmp_ = json.loads(cli(srv, "compare", str(face_path("dev/img1.jpg")), str(face_path("dev/img2.jpg"))).stdout)
    assert cmp_["match"] is True
    coll = "cli-" + uuid.uuid4().hex[:6]
    assert json.loads(cli(srv, "collections", "create", coll, "--liveness-optional").stdout)["collection"] == coll
    token = json.loads(cli(srv, "process", coll, "person_01", str(face_path("dev/img1.jpg"))).stdout)["stagingToken"]
    reg = json.loads(cli(srv, "register", coll, "person_01", "--token", token, "--metadata", "site=hq").stdout)
    assert reg["subject"]["metadata"] == {"site": "hq"}
    assert json.loads(cli(srv, "verify", coll, "person_01", str(face_path("dev/img2.jpg"))).stdout)["match"] is True
    found = json.loads(cli(srv, "search", coll, str(face_path("dev/img6.jpg"))).stdout)
    assert found["results"][0]["matches"][0]["subjectId"] == "person_01"
    assert [s["subjectId"] for s in json.loads(cli(srv, "subjects", "list", coll).stdout)] == ["person_01"]
    # the proto3 JSON mapping (grpcurl's names) by default; --proto-names keeps the .proto names
    assert json.loads(cli(srv, "subjects", "get", coll, "person_01").stdout)["faceCount"] == 1
    snake = json.loads(cli(srv, "--proto-names", "subjects", "get", coll, "person_01").stdout)
    assert snake["face_count"] == 1 and snake["subject_id"] == "person_01" and "faceCount" not in snake
    keys = json.loads(cli(srv, "keys", "create", coll, "--description", "cli").stdout)
    assert keys["secret"].startswith("fsk_")
    assert coll in [c["collection"] for c in json.loads(cli(srv, "collections", "list").stdout)]
    err = cli(srv, "verify", coll, "nobody", str(face_path("dev/img2.jpg")), check=False)
    assert err.returncode == 1 and "SUBJECT_NOT_FOUND" in err.stderr
    assert cli(srv, "health", key=None).returncode == 0  # health needs no key
    denied = cli(srv, "detect", str(face_path("dev/img1.jpg")), key=None, check=False)
    assert denied.returncode == 1 and "API_KEY_MISSING" in denied.stderr
    assert json.loads(cli(srv, "subjects", "delete", coll, "person_01").stdout)["deletedFaces"] == 1
    cli(srv, "collections", "delete", coll)


def test_cli_enroll_a_folder_with_a_corrupt_file_and_a_no_face_photo(srv, tmp_path):
    coll = "enroll-" + uuid.uuid4().hex[:6]
    cli(srv, "collections", "create", coll)
    tree = tmp_path / "people"
    for person, photos in {
        "person_01": ["img1.jpg", "img2.jpg"],
        "person_04": ["img13.jpg"],
        "person_07": ["img20.jpg"],
        "rocket": ["noface_rocket.jpg"],
    }.items():
        (tree / person).mkdir(parents=True)
        for p in photos:
            shutil.copy(face_path(f"dev/{p}"), tree / person / p)
    (tree / "person_04" / "broken.jpg").write_bytes(face_path("dev/img14.jpg").read_bytes()[:2000])  # truncated JPEG
    (tree / "person_04" / "notes.txt").write_text("not a photo: skipped")
    p = cli(srv, "enroll", coll, str(tree), check=False)
    assert p.returncode == 1, p.stdout + p.stderr  # some items failed
    assert "enrolled 4 of 6 photos: 3 subjects" in p.stdout
    assert "person_04/broken.jpg: INVALID_IMAGE" in p.stdout and "rocket/noface_rocket.jpg: NO_FACE_DETECTED" in p.stdout
    assert "6/6" in p.stderr  # the progress bar reached the end
    subjects = {s["subjectId"]: s["faceCount"] for s in json.loads(cli(srv, "subjects", "list", coll).stdout)}
    assert subjects == {"person_01": 2, "person_04": 1, "person_07": 1}


def test_cli_stream_a_video_file(srv, tmp_path):
    out = tmp_path / "annotated.mp4"
    p = cli(srv, "stream", str(FACES / "video" / "single_closeup_720p.mp4"), "--frames", "30", "--annotate", str(out))
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("frame")]
    assert len(lines) >= 10 and all("faces 1" in ln for ln in lines)
    assert len({ln.split("[track ")[1].split("]")[0] for ln in lines}) == 1  # one track for the one face
    assert "processed" in p.stderr
    cap = cv2.VideoCapture(str(out))
    assert cap.isOpened() and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == len(lines)
    cap.release()
    js = cli(srv, "stream", str(FACES / "video" / "single_closeup_720p.mp4"), "--frames", "5", "--json", "--no-pace")
    answers = [json.loads(ln) for ln in js.stdout.splitlines()]
    assert answers and answers[-1]["frameId"] == "5"


def test_the_readme_cli_flow_runs(srv):
    """The README's CLI block, verbatim, with the venv's `facesvc` and jq on the PATH."""
    block = re.search(r"<!-- cli-flow:begin -->\s*```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README lost its CLI block"
    env = {
        **os.environ,
        "FACESVC_TARGET": srv.target,
        "FACESVC_API_KEY": ADMIN_KEY,
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
    }
    p = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", block.group(1)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert lines[0] == "SERVING" and lines[1] == "6" and lines[2] == "true"
    assert "alice" in lines and "enrolled" in p.stdout and "frame" in p.stdout
    subjects = [int(ln) for ln in lines[3:] if ln.isdigit()][-1]  # `subjects list | jq length`
    assert subjects > 100  # alice + the LFW people enrolled by `enroll`


def test_the_readme_python_snippet_runs(srv):
    """The README's Python block, verbatim, from the repository's root (it reads ../shared/faces)."""
    block = re.search(r"<!-- python-snippet:begin -->\s*```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README lost its Python block"
    if FACES.resolve() != (ROOT.parent / "shared" / "faces").resolve():
        pytest.skip("the snippet reads ../shared/faces; FACESVC_FACES_DIR points elsewhere")
    env = {**os.environ, "FACESVC_TARGET": srv.target, "FACESVC_API_KEY": ADMIN_KEY}
    p = subprocess.run([sys.executable, "-c", block.group(1)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert lines[:2] == ["True", "['alice']"] and lines[2].startswith("True {"), lines


def test_a_stream_error_is_reported_without_a_crash(srv):
    """`facesvc stream VIDEO --identify` on a collection that does not exist: the server's error, exit 1,
    never an abort from the video decoder racing the capture's release (it did, 5 times in 9)."""
    video = str(FACES / "video" / "single_closeup_720p.mp4")
    for _ in range(4):
        p = cli(
            srv, "stream", video, "--frames", "60", "--no-pace", "--collection", "no-such-collection", "--identify", check=False
        )
        assert p.returncode == 1, (p.returncode, p.stderr[-2000:])
        assert "COLLECTION_NOT_FOUND" in p.stderr


def test_every_cli_option_has_help():
    import argparse

    from facesvc_client.cli import build_parser

    missing, parsers = [], [("facesvc", build_parser())]
    while parsers:
        name, parser = parsers.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += [(f"{name} {n}", p) for n, p in action.choices.items()]
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{name} {action.dest}")
    assert not missing, missing


def test_cli_calibrate_update_similar_and_group(srv, tmp_path):
    """`facesvc calibrate` on LFW pairs (a CSV as LFW's pairs.csv), `collections update`, `similar`, `group`."""
    import csv

    coll = "cal-" + uuid.uuid4().hex[:6]
    cli(srv, "collections", "create", coll, "--liveness-optional")
    rows = list(csv.DictReader(open(FACES / "lfw" / "pairs.csv")))
    picked = [r for r in rows if r["same"] == "1"][:6] + [r for r in rows if r["same"] == "0"][:10]
    pairs = tmp_path / "pairs.csv"
    with open(pairs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_a", "file_b", "same"])
        w.writerows([FACES / "lfw" / r["file_a"], FACES / "lfw" / r["file_b"], r["same"]] for r in picked)
    p = cli(srv, "calibrate", coll, str(pairs), "--far", "0.1", "--apply", "search", check=False)
    r = json.loads(p.stdout[: p.stdout.index("\n}") + 2])
    assert r["genuinePairs"] + r["impostorPairs"] + r.get("skippedPairs", 0) == 16 and r["far"] <= 0.1
    if r.get("belowFloor"):  # LFW impostors at FAR 0.1 may sit below the server's floor: then nothing is applied
        assert p.returncode == 1 and "below the server's floor" in p.stderr
    else:
        assert p.returncode == 0
        applied = json.loads(cli(srv, "collections", "get", coll).stdout)
        assert applied["thresholds"]["searchThreshold"] == pytest.approx(r["threshold"], abs=1e-6)
    updated = json.loads(cli(srv, "collections", "update", coll, "--duplicate-policy", "off", "--search-threshold", "0").stdout)
    assert updated["duplicatePolicy"] == "DUPLICATE_POLICY_OFF" and "searchThreshold" not in updated.get("thresholds", {})
    face = json.loads(cli(srv, "register", coll, "a", "--image", str(face_path("dev/img1.jpg"))).stdout)["face"]["faceId"]
    cli(srv, "register", coll, "b", "--image", str(face_path("dev/img2.jpg")))  # the same person: duplicate policy off
    similar = json.loads(cli(srv, "similar", coll, face).stdout)
    assert [m["subjectId"] for m in similar["matches"]] == ["b"]
    groups = json.loads(cli(srv, "group", coll).stdout)["groups"]
    assert [sorted(m["subjectId"] for m in g["members"]) for g in groups] == [["a", "b"]]
    photos = [str(face_path(f"dev/{n}")) for n in ("img1.jpg", "img2.jpg", "img13.jpg")]
    grouped = json.loads(cli(srv, "group", coll, *photos).stdout)
    assert [[m["itemId"] for m in g["members"]] for g in grouped["groups"]] == [photos[:2]]
    assert [m["itemId"] for m in grouped["singletons"]] == photos[2:]
