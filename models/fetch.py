#!/usr/bin/env python3
"""Fetch the ONNX weights listed in models/manifest.json, verifying sha256.

For each model: keep the file already in the target directory if its sha256
matches; else copy it from the mirror directory; else download the upstream
URL (extracting `archive_member` from a zip). A file whose sha256 differs from
the manifest is refused and never left in the target directory.

    python models/fetch.py                 # every model
    python models/fetch.py scrfd_500m yunet
    FACESVC_MODEL_MIRROR=/mnt/weights python models/fetch.py

Standard library only: it runs before the virtual environment exists.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_MANIFEST = HERE / "manifest.json"
DEFAULT_TARGET = HERE / "weights"
DEFAULT_MIRROR = HERE.parent.parent / "shared" / "models"


class FetchError(RuntimeError):
    pass


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(url: str, member: str | None, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (manifest URLs)
        data = resp.read()
    if member:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = [n for n in zf.namelist() if n == member or n.endswith("/" + member)]
            if not names:
                raise FetchError(f"{url} has no member {member!r}")
            data = zf.read(names[0])
    return data


def _install(tmp: Path, dest: Path, expected: str, origin: str) -> None:
    actual = sha256_of(tmp)
    if actual != expected:
        tmp.unlink(missing_ok=True)
        raise FetchError(f"sha256 mismatch for {dest.name} from {origin}: got {actual}, manifest says {expected}")
    os.replace(tmp, dest)  # atomic: a reader never sees a partial file


def fetch_one(name: str, spec: dict, target: Path, mirror: Path, timeout: float) -> str:
    dest = target / spec["file"]
    expected = spec["sha256"]
    if dest.exists() and sha256_of(dest) == expected:
        return "present"
    fd, tmp_name = tempfile.mkstemp(dir=target, prefix=f".{spec['file']}.")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        src = mirror / spec["file"]
        if src.is_file():
            shutil.copyfile(src, tmp)
            _install(tmp, dest, expected, str(src))
            return f"copied from {mirror}"
        url = spec.get("url")
        if not url:
            raise FetchError(
                f"{name}: {spec['file']} is not in the mirror {mirror} and has no upstream URL "
                f"({spec.get('source', 'no source recorded')}); set FACESVC_MODEL_MIRROR to a directory holding it"
            )
        try:
            tmp.write_bytes(_download(url, spec.get("archive_member"), timeout))
        except (OSError, zipfile.BadZipFile) as exc:
            raise FetchError(f"{name}: download of {url} failed: {exc}") from exc
        _install(tmp, dest, expected, url)
        return f"downloaded from {url}"
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="logical model names (default: all)")
    ap.add_argument("--manifest", type=Path, default=Path(os.environ.get("FACESVC_MODEL_MANIFEST", DEFAULT_MANIFEST)))
    ap.add_argument("--target", type=Path, default=Path(os.environ.get("FACESVC_MODEL_DIR", DEFAULT_TARGET)))
    ap.add_argument("--mirror", type=Path, default=Path(os.environ.get("FACESVC_MODEL_MIRROR", DEFAULT_MIRROR)))
    ap.add_argument("--timeout", type=float, default=60.0, help="download timeout in seconds")
    args = ap.parse_args(argv)

    models = json.loads(args.manifest.read_text())["models"]
    names = args.names or list(models)
    unknown = [n for n in names if n not in models]
    if unknown:
        print(f"unknown model(s): {', '.join(unknown)}; known: {', '.join(models)}", file=sys.stderr)
        return 2
    args.target.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name in names:
        try:
            how = fetch_one(name, models[name], args.target, args.mirror, args.timeout)
            print(f"  {name:<18} {models[name]['file']:<38} {how}")
        except FetchError as exc:
            failed += 1
            print(f"  {name:<18} FAILED: {exc}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
