"""The Dockerfile and the packaging, checked without Docker: what the image build relies on."""

from __future__ import annotations

import fnmatch
import re
import subprocess

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib

from tests.conftest import PYTHON, ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()
IGNORED = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def ignored(path: str) -> bool:
    return any(fnmatch.fnmatch(path, p.removeprefix("**/")) or path.startswith(p.rstrip("/") + "/") or path == p for p in IGNORED)


def test_every_copied_path_exists_and_reaches_the_build_context():
    copies = [args.split() for op, args in instructions() if op == "COPY" and "--from" not in args]
    assert copies
    for *sources, _dest in copies:
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: no such path"
            assert not ignored(src), f"COPY {src}: excluded by .dockerignore"


def test_dependencies_install_before_any_code_arrives():
    ops = instructions()
    deps_at = next(i for i, (op, args) in enumerate(ops) if op == "RUN" and "pip install -r" in args)
    code_at = min(
        i for i, (op, args) in enumerate(ops) if op == "COPY" and re.search(r"\b(server|protos|clients/python)\s", args + " ")
    )
    assert deps_at < code_at
    before = [args for op, args in ops[:deps_at] if op == "COPY"]
    assert all("pyproject" in a or "pyproject_deps.py" in a for a in before), before
    # the weights stage reads only the manifest and the fetch code
    fetch_copy = next(args for op, args in ops if op == "COPY" and "fetch.py" in args)
    assert fetch_copy.split()[:-1] == ["models/manifest.json", "models/fetch.py", "models/derive.py"]


def test_code_lands_once_and_the_tools_are_installed():
    final = DOCKERFILE.rsplit("\nFROM ", 1)[1]
    assert "COPY server" not in final and "COPY --from=build" not in final  # only pip puts the code in
    assert "pip install --no-deps /wheels/*.whl" in final
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    client = tomllib.loads((ROOT / "clients/python/pyproject.toml").read_text())["project"]["scripts"]
    assert {"facesvc-server", "facesvc-reembed"} <= set(scripts) and "facesvc" in client
    assert "pip wheel --no-deps --wheel-dir /wheels . ./clients/python" in DOCKERFILE


def test_base_pip_and_tools_are_pinned_and_the_healthcheck_follows_the_port():
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", DOCKERFILE, re.M).group(1)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), base
    assert re.search(r"^ARG PIP_VERSION=\d+(\.\d+)+$", DOCKERFILE, re.M)
    assert DOCKERFILE.count('"pip==${PIP_VERSION}"') == 2
    assert re.search(r'"onnx==[\d.]+"', DOCKERFILE)
    assert DOCKERFILE.startswith("# syntax=docker/dockerfile:") and "BuildKit" in DOCKERFILE
    health = next(args for op, args in instructions() if op == "HEALTHCHECK")
    assert "server.healthcheck" in health and not re.search(r"\b\d{4,5}\b", health)
    assert "GPU variant" in DOCKERFILE or "CUDA" in DOCKERFILE


def test_the_dependency_layer_installs_what_the_pyprojects_declare():
    def deps(*args: str) -> list[str]:
        out = subprocess.run([PYTHON, "scripts/pyproject_deps.py", *args], cwd=ROOT, capture_output=True, text=True, check=True)
        return out.stdout.split()

    server = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    cpu = deps("pyproject.toml", "clients/python/pyproject.toml:video")
    assert set(server["dependencies"]) <= set(cpu) and "opencv-python-headless>=4.9" in cpu
    gpu = deps("pyproject.toml:gpu", "--without", "onnxruntime")
    assert not [r for r in gpu if re.match(r"onnxruntime\b(?!-)", r)] and any(r.startswith("onnxruntime-gpu") for r in gpu)


def test_make_run_installs_no_test_tools_and_the_licence_is_spdx():
    """`make run` installs the server's runtime (grpcurl's x86-64-only wheel stays in `dev`, which
    only `make setup`/`make test` install); the licence is an SPDX expression with its files."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert [e for e, reqs in extras.items() if any(r.startswith("grpcurl") for r in reqs)] == ["dev"]
    makefile = (ROOT / "Makefile").read_text()
    run_prereqs = re.search(r"^run: (.*)$", makefile, re.M).group(1).split()
    assert "setup" not in run_prereqs and "$(VENV)/.stamp-install" not in run_prereqs
    runtime = re.search(r"^\$\(VENV\)/\.stamp-runtime:.*?\n((?:\t.*\n)+)", makefile, re.M).group(1)
    installed = re.findall(r"pip install --quiet -e '([^']+)'", runtime)
    assert installed == [".[codegen,models]", "clients/python[video]"]
    assert "editable_mode=compat" not in makefile
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE", "NOTICE"]
    assert all((ROOT / f).is_file() for f in project["license-files"])
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert build == ["setuptools>=77"]  # the first setuptools that reads an SPDX `license` string
