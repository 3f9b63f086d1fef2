#!/usr/bin/env python3
"""Obtain the ONNX weights listed in models/manifest.json, each checked by sha256.

For each model, in this order:
  1. keep the file already in the target directory if its sha256 matches;
  2. copy it from the mirror directory (FACESVC_MODEL_MIRROR, default ../shared/models);
  3. derive it (`derive` in the manifest: e.g. the default recognizer is its int8
     upstream file with the weights dequantized) from another model's file, obtained the
     same way: needs the `onnx` package (the `models` extra);
  4. download `url` (extracting `archive_member` from a zip or wheel), unless --offline.
A file whose sha256 differs from the manifest is refused and never left in the target
directory. A file that cannot be obtained is reported with its public origin (`origin`),
so an empty mirror without internet names every place to get the weights from.

    python models/fetch.py                 # every model
    python models/fetch.py scrfd_500m yunet
    python models/fetch.py --offline       # mirror and derivations only, no network
    FACESVC_MODEL_MIRROR=/mnt/weights python models/fetch.py

Standard library only, except a derivation step (models/derive.py imports `onnx`).
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
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _download(url: str, member: str | None, timeout: float, cache: dict[str, bytes]) -> bytes:
    if url not in cache:  # one archive serves several models (the age/gender wheel)
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (manifest URLs)
            cache[url] = resp.read()
    data = cache[url]
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


def _derive(step: str, source: Path, out: Path) -> None:
    sys.path.insert(0, str(HERE))
    try:
        from derive import STEPS  # imports onnx only when a file must be derived
    except ImportError as exc:
        raise FetchError(f"deriving needs the onnx package ({exc}): pip install -e '.[models]'") from exc
    try:
        STEPS[step](source, out)
    except Exception as exc:  # a malformed source model: report it with the others, not as a traceback
        raise FetchError(f"{step} of {source.name} failed: {exc}") from exc


def origin_of(name: str, models: dict) -> str:
    """Where a model comes from publicly, following derivations to the upstream file."""
    spec = models[name]
    text = spec["origin"]
    derive = spec.get("derive")
    if derive and derive["from"] in models:
        text += f"; derived ({derive['step']}) from {models[derive['from']]['file']}: {origin_of(derive['from'], models)}"
    return text


class Fetcher:
    def __init__(self, models: dict, target: Path, mirror: Path, timeout: float, offline: bool):
        self.models, self.target, self.mirror = models, target, mirror
        self.timeout, self.offline = timeout, offline
        self.done: dict[str, str] = {}
        self.downloads: dict[str, bytes] = {}

    def fetch(self, name: str) -> str:
        if name not in self.done:
            self.done[name] = self._fetch(name)
        return self.done[name]

    def _fetch(self, name: str) -> str:
        spec = self.models[name]
        dest = self.target / spec["file"]
        expected = spec["sha256"]
        if dest.exists() and sha256_of(dest) == expected:
            return "present"
        fd, tmp_name = tempfile.mkstemp(dir=self.target, prefix=f".{spec['file']}.")
        os.close(fd)
        tmp = Path(tmp_name)
        tried = []
        try:
            src = self.mirror / spec["file"]
            if src.is_file():
                shutil.copyfile(src, tmp)
                _install(tmp, dest, expected, str(src))
                return f"copied from {self.mirror}"
            tried.append(f"not in the mirror {self.mirror}")
            derive = spec.get("derive")
            if derive and derive["from"] not in self.models:
                tried.append(f"derived from {derive['from']}, which the manifest does not list")
            elif derive:
                try:
                    self.fetch(derive["from"])
                except FetchError:
                    tried.append(f"cannot derive it: {self.models[derive['from']]['file']} is not available either")
                else:
                    source = self.target / self.models[derive["from"]]["file"]
                    _derive(derive["step"], source, tmp)
                    _install(tmp, dest, expected, f"{derive['step']} of {source.name}")
                    return f"derived ({derive['step']}) from {source.name}"
            url = spec.get("url")
            if url and not self.offline:
                try:
                    tmp.write_bytes(_download(url, spec.get("archive_member"), self.timeout, self.downloads))
                except (OSError, zipfile.BadZipFile) as exc:
                    tried.append(f"download of {url} failed: {exc}")
                else:
                    _install(tmp, dest, expected, url)
                    return f"downloaded from {url}"
            elif url:
                tried.append(f"offline, not downloading {url}")
            elif not derive:
                tried.append("no download URL (see origin)")
            raise FetchError(
                f"{name}: {spec['file']} {'; '.join(tried)}. It comes from: {origin_of(name, self.models)}. "
                "Put the file in FACESVC_MODEL_MIRROR (or rerun with internet)."
            )
        finally:
            tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="logical model names (default: all)")
    ap.add_argument("--manifest", type=Path, default=Path(os.environ.get("FACESVC_MODEL_MANIFEST", DEFAULT_MANIFEST)))
    ap.add_argument("--target", type=Path, default=Path(os.environ.get("FACESVC_MODEL_DIR", DEFAULT_TARGET)))
    ap.add_argument("--mirror", type=Path, default=Path(os.environ.get("FACESVC_MODEL_MIRROR", DEFAULT_MIRROR)))
    ap.add_argument("--timeout", type=float, default=60.0, help="download timeout in seconds")
    ap.add_argument("--offline", action="store_true", help="never download: mirror and derivations only")
    args = ap.parse_args(argv)

    models = json.loads(args.manifest.read_text())["models"]
    names = args.names or list(models)
    unknown = [n for n in names if n not in models]
    if unknown:
        print(f"unknown model(s): {', '.join(unknown)}; known: {', '.join(models)}", file=sys.stderr)
        return 2
    args.target.mkdir(parents=True, exist_ok=True)
    fetcher = Fetcher(models, args.target, args.mirror, args.timeout, args.offline)
    failed = 0
    for name in names:
        try:
            how = fetcher.fetch(name)
            print(f"  {name:<18} {models[name]['file']:<38} {how}")
        except FetchError as exc:
            failed += 1
            print(f"  {name:<18} FAILED: {exc}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
