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
    int8: str = ""  # the int8 OpenVINO IR models/quantize.py derives (FACESVC_PRECISION=int8); "" = none
    # runs in bf16 where the CPU computes it natively (FACESVC_PRECISION=auto or bf16): set only for models
    # whose answers were checked in bf16 against f32 (tests/test_runtimes.py); the others stay f32
    bf16: bool = False


class ModelFileError(RuntimeError):
    pass


def load_manifest(path: Path = DEFAULT_MANIFEST) -> dict[str, ModelSpec]:
    raw = json.loads(Path(path).read_text())["models"]
    return {
        name: ModelSpec(
            name,
            m["file"],
            m["sha256"],
            m["kind"],
            m["arch"],
            m["licence"],
            dict(m.get("params", {})),
            m.get("int8", ""),
            bool(m.get("bf16", False)),
        )
        for name, m in raw.items()
    }


@dataclass(frozen=True)
class LivenessDefaults:
    """The liveness ensemble, threshold and smallest judgeable face chosen by scripts/eval_liveness.py."""

    ensemble: str = "minifasnet_pair"
    threshold: float = 0.5
    min_face_px: int = 32


def load_liveness_defaults(path: Path = DEFAULT_MANIFEST) -> LivenessDefaults:
    raw = json.loads(Path(path).read_text()).get("liveness", {})
    keys = LivenessDefaults.__dataclass_fields__
    return LivenessDefaults(**{k: v for k, v in raw.items() if k in keys})


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verified_path(spec: ModelSpec, model_dir: Path) -> Path:
    """Path of the model file after checking its sha256 against the manifest."""
    path = Path(model_dir) / spec.file
    if not path.is_file():
        raise ModelFileError(f"{spec.name}: {path} is missing; run `make models` (python models/fetch.py)")
    digest = file_sha256(path)
    if digest != spec.sha256:
        raise ModelFileError(f"{spec.name}: {path} sha256 {digest} does not match the manifest ({spec.sha256})")
    return path


def int8_path(spec: ModelSpec, model_dir: Path) -> Path:
    """Path of the model's int8 IR (models/quantize.py) after checking it against its record: made
    from the float file the manifest names, and the files on disk the ones written then. Its bytes
    depend on the NNCF and OpenVINO versions, so it has no sha256 in the manifest."""
    if not spec.int8:
        raise ModelFileError(f"{spec.name} has no int8 version (manifest: no `int8` entry)")
    xml = Path(model_dir) / spec.int8
    redo = "run `make int8` (python -m models.quantize)"
    note_path = xml.with_suffix(".json")
    if not note_path.is_file():
        raise ModelFileError(f"{spec.name}: {xml} is missing; {redo}")
    note = json.loads(note_path.read_text())
    if note.get("source_sha256") != spec.sha256:
        raise ModelFileError(f"{spec.name}: {xml.name} was made from another float file than the manifest's; {redo}")
    files = note.get("files", {})
    if set(files) != {xml.name, xml.with_suffix(".bin").name}:
        raise ModelFileError(f"{spec.name}: {note_path.name} does not list {xml.name} and its weights; {redo}")
    for name, digest in files.items():
        path = xml.with_name(name)
        if not path.is_file() or file_sha256(path) != digest:
            raise ModelFileError(f"{spec.name}: {path} is missing or not the file quantize.py wrote; {redo}")
    return xml
