"""The model manifest (models/manifest.json): where each logical model lives and how it is checked."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_MANIFEST = REPO_ROOT / "models" / "manifest.json"
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "weights"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    file: str
    sha256: str
    kind: str
    arch: str
    licence: str
    params: dict = field(default_factory=dict)


class ModelFileError(RuntimeError):
    pass


def load_manifest(path: Path = DEFAULT_MANIFEST) -> dict[str, ModelSpec]:
    raw = json.loads(Path(path).read_text())["models"]
    return {
        name: ModelSpec(name, m["file"], m["sha256"], m["kind"], m["arch"], m["licence"], dict(m.get("params", {})))
        for name, m in raw.items()
    }


def verified_path(spec: ModelSpec, model_dir: Path) -> Path:
    """Path of the model file after checking its sha256 against the manifest."""
    path = Path(model_dir) / spec.file
    if not path.is_file():
        raise ModelFileError(f"{spec.name}: {path} is missing; run `make models` (python models/fetch.py)")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != spec.sha256:
        raise ModelFileError(f"{spec.name}: {path} sha256 {h.hexdigest()} does not match the manifest ({spec.sha256})")
    return path
