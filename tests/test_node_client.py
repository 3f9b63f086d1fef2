"""The Node.js client (clients/node: @grpc/grpc-js + @grpc/proto-loader on protos/) against a live server."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from tests.conftest import ADMIN_KEY, FACES, ROOT, ServerProcess

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


@pytest.fixture(scope="module")
def node_server(tmp_path_factory):
    srv = ServerProcess(log_path=tmp_path_factory.mktemp("node") / "server.log")
    yield srv
    srv.stop()


def node_env(srv) -> dict[str, str]:
    """Only where the server is: everything else the scripts default."""
    return {**os.environ, "FACESVC_TARGET": srv.target, "FACESVC_API_KEY": ADMIN_KEY, "FACESVC_FACES_DIR": str(FACES)}


def test_npm_run_smoke_with_defaults(node_client, node_server):
    """`npm run smoke`: the helpers (registerBatch, streamFrames), unary calls and a typed error."""
    npm = shutil.which("npm")
    p = subprocess.run(
        [npm, "run", "--silent", "smoke"], cwd=NODE_DIR, env=node_env(node_server), capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [json.loads(ln) for ln in p.stdout.splitlines()]
    print("\n" + "\n".join(map(json.dumps, lines)))
    enrolled, refused, detect, same, other, noface, stream = lines
    assert enrolled == {"call": "RegisterBatch", "item": "img1.jpg", "ok": True, "reason": ""}
    assert refused == {"call": "RegisterBatch", "item": "noface_coffee.jpg", "ok": False, "reason": "NO_FACE_DETECTED"}
    assert detect == {"call": "Detect", "faces": 6, "detector": detect["detector"], "width": detect["width"]}
    assert same["match"] is True and same["similarity"] > same["threshold"]
    assert other["match"] is False and other["similarity"] < other["threshold"]
    assert noface == {"call": "VerifyNoFace", "code": "INVALID_ARGUMENT", "reason": "NO_FACE_DETECTED", "typed": True}
    answers = stream["answers"]
    assert [a["frame"] for a in answers] == [1, 2, 3] and all(a["faces"] == 1 for a in answers)
    assert answers[0]["ids"] == ["person_01"] and answers[1]["ids"] == ["person_01"]


def test_the_readme_node_snippet_runs(node_client, node_server, tmp_path):
    """The README's Node block, verbatim, as example.mjs in the repository's root (here: a directory
    whose `clients` is the repository's), run from the root so `../shared/faces` resolves."""
    block = re.search(r"<!-- node-snippet:begin -->\s*```js\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README lost its Node block"
    (tmp_path / "clients").symlink_to(ROOT / "clients")
    (tmp_path / "example.mjs").write_text(block.group(1))
    if FACES.resolve() != (ROOT.parent / "shared" / "faces").resolve():
        pytest.skip("the snippet reads ../shared/faces; FACESVC_FACES_DIR points elsewhere")
    p = subprocess.run(
        [node_client, str(tmp_path / "example.mjs")],
        cwd=ROOT,
        env=node_env(node_server),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout.splitlines()
    assert out[0].startswith("img1.jpg ") and len(out[0].split()[1]) > 8  # the new face's id
    assert out[1] == "true"
    assert out[2].startswith("INVALID_ARGUMENT true {")
    assert out[3] == "1 [ 'alice' ]", out
    assert out[4].startswith("2 [") and "alice" not in out[4], out
