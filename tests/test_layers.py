"""The layers of server/ (see server/__init__.py) import only downwards, and FaceService is served whole."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from server import errors
from server.rpc.servicer import SERVICE, FaceServicer

ROOT = Path(__file__).resolve().parents[1]
# lower numbers are lower layers; a module may import its own layer and those below
LAYERS = {
    "server.errors": 0,
    "server.records": 0,
    "server.context": 0,
    "server.telemetry": 0,
    "server.hugepages": 0,
    "server.cpus": 0,
    "server.vision": 1,
    "server.storage": 1,
    "server.index": 1,
    "server.domain": 2,
    "server.rpc": 3,
    "server.web": 3,
    "server.config": 4,
    "server.app": 4,
    "server.assembly": 4,
    "server.reembed": 5,
    "server.healthcheck": 5,
    "server.__main__": 5,
    "server": 5,
}


def layer(module: str) -> int | None:
    found = [(len(k), v) for k, v in LAYERS.items() if module == k or (k != "server" and module.startswith(k + "."))]
    return max(found)[1] if found else None


def test_imports_point_downwards():
    upward = []
    for path in (ROOT / "server").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        own = layer(module)
        assert own is not None, f"{module} belongs to no layer: add it to LAYERS and server/__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("server"):
                targets = [f"server.{a.name}" for a in node.names] if node.module == "server" else [node.module]
                upward += [f"{module} -> {t}" for t in targets if (layer(t) or 0) > own]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_every_rpc_is_served_by_exactly_one_handler_group():
    class Group:
        RPCS = tuple(m.name for m in SERVICE.methods)[:-1]

        def __getattr__(self, name):
            return lambda request, context: None

    with pytest.raises(ValueError, match="no handler"):
        FaceServicer().attach(Group())
    with pytest.raises(ValueError, match="two handler groups"):
        FaceServicer().attach(Group(), Group())


def test_every_rpc_has_an_access_scope():
    from facesvc.v1 import face_service_pb2 as pb
    from server.rpc.auth import COLLECTION, SCOPES

    assert set(SCOPES) == {m.name for m in SERVICE.methods}
    for method in SERVICE.methods:
        if SCOPES[method.name] == COLLECTION:
            request = getattr(pb, method.input_type.name)
            assert "collection" in request.DESCRIPTOR.fields_by_name, method.name


def test_every_reason_the_server_uses_is_in_the_contract():
    used = {v for k, v in vars(errors).items() if k.isupper() and isinstance(v, str) and k not in ("DOMAIN",)}
    assert used <= errors.REASONS and errors.REASONS - used == set(), sorted(errors.REASONS ^ used)
