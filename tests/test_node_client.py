"""The Node.js client (clients/node: @grpc/grpc-js + @grpc/proto-loader on protos/) against a live server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid

import pytest

from facesvc.v1 import face_service_pb2 as pb
from facesvc.v1 import face_service_pb2_grpc as pb_grpc
from tests.conftest import ADMIN_KEY, ROOT, ServerProcess, face_path, image

NODE_DIR = ROOT / "clients" / "node"


@pytest.fixture(scope="module")
def node_client():
    """npm ci into clients/node once (from the npm registry; package-lock.json pins every version)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("node/npm not found (CI=true: the second-language client must run)")
        pytest.skip("node/npm not installed")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--silent"], cwd=NODE_DIR, check=True, timeout=600)
    return node


def test_node_client_detects_and_verifies(node_client, tmp_path):
    srv = ServerProcess(log_path=tmp_path / "server.log")
    try:
        stub = pb_grpc.FaceServiceStub(srv.channel)
        coll = "node-" + uuid.uuid4().hex[:6]
        stub.CreateCollection(pb.CreateCollectionRequest(collection=coll), timeout=10)
        stub.Register(pb.RegisterRequest(collection=coll, subject_id="person_01", image=image("dev/img1.jpg")), timeout=60)
        env = {
            **os.environ,
            "FACESVC_TARGET": srv.target,
            "FACESVC_API_KEY": ADMIN_KEY,
            "FACESVC_COLLECTION": coll,
            "FACESVC_SUBJECT": "person_01",
            "PHOTO_SAME": str(face_path("dev/img2.jpg")),
            "PHOTO_OTHER": str(face_path("dev/img13.jpg")),
            "PHOTO_GROUP": str(face_path("dev/group_t1.jpg")),
            "PHOTO_NOFACE": str(face_path("dev/noface_coffee.jpg")),
        }
        p = subprocess.run([node_client, "smoke.js"], cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        lines = [json.loads(ln) for ln in p.stdout.splitlines()]
        print("\n" + "\n".join(map(json.dumps, lines)))
        detect, same, other, noface = lines
        assert detect == {"call": "Detect", "faces": 6, "detector": detect["detector"], "width": detect["width"]}
        assert same["match"] is True and same["similarity"] > same["threshold"]
        assert other["match"] is False and other["similarity"] < other["threshold"]
        assert noface == {"call": "VerifyNoFace", "code": "INVALID_ARGUMENT", "reason": "NO_FACE_DETECTED"}
    finally:
        srv.stop()
