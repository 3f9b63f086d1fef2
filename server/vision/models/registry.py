"""Build model wrappers from the manifest: the model choice is configuration, not code.

Each manifest entry names an `arch`; `ARCHS` maps it to the wrapper class and
the manifest's `params` become its keyword arguments. Reduced precision is per model: int8 for
the models with an `int8` IR, bf16 (where the CPU has it) for those marked `bf16`; the small
models whose scores the thresholds were calibrated on (liveness, age, gender) stay f32.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from server.vision.models.age_gender import AgeEstimator, GenderClassifier
from server.vision.models.liveness import MiniFasNet, MiniFasNetPair, MiniFasNetSE128
from server.vision.models.manifest import ModelSpec, int8_path, verified_path
from server.vision.models.recognizer import ArcFaceRecognizer
from server.vision.models.runtime import RuntimeOptions, create_session
from server.vision.models.scrfd import ScrfdDetector
from server.vision.models.yunet import YunetDetector

log = logging.getLogger(__name__)

ARCHS = {
    "scrfd": ScrfdDetector,
    "yunet": YunetDetector,
    "arcface": ArcFaceRecognizer,
    "minifasnet": MiniFasNet,
    "minifasnet_se128": MiniFasNetSE128,
    "dlib_age": AgeEstimator,
    "dlib_gender": GenderClassifier,
}

# Logical ensembles that are configured by one name.
ENSEMBLES = {"minifasnet_pair": ("minifasnet_v2", "minifasnet_v1se")}


class ModelLoader:
    def __init__(self, manifest: dict[str, ModelSpec], model_dir: Path, runtime: RuntimeOptions, providers: list[str]):
        self.manifest = manifest
        self.model_dir = Path(model_dir)
        self.runtime = runtime
        self.providers = providers
        self.loaded: list[dict[str, str]] = []  # where each model runs, for the start-up log, metrics and GetIndexStats

    def spec(self, name: str, kind: str | tuple[str, ...]) -> ModelSpec:
        kinds = (kind,) if isinstance(kind, str) else kind
        if name not in self.manifest:
            raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(self.manifest))}")
        spec = self.manifest[name]
        if spec.kind not in kinds:
            raise ValueError(f"model {name!r} is a {spec.kind}, not a {'/'.join(kinds)}")
        return spec

    def build(self, name: str, kind: str, **overrides):
        spec = self.spec(name, kind)
        t0 = time.perf_counter()
        quantized = self.runtime.precision == "int8" and bool(spec.int8)
        path = int8_path(spec, self.model_dir) if quantized else verified_path(spec, self.model_dir)
        runtime = self.runtime if quantized or spec.bf16 else replace(self.runtime, precision="f32")
        arch = ARCHS[spec.arch]
        session = create_session(str(path), runtime, self.providers, name, quantized, getattr(arch, "pixels", None))
        model = arch(session, name, **{**spec.params, **overrides})
        where = {"model": name, "kind": spec.kind, "runtime": session.runtime, "precision": session.precision}
        self.loaded.append(where | {"device": session.device})
        log.info(
            "loaded model=%s kind=%s file=%s runtime=%s precision=%s device=%s in %.0f ms",
            name,
            spec.kind,
            path.name,
            session.runtime,
            session.precision,
            session.device,
            (time.perf_counter() - t0) * 1000,
        )
        return model

    def build_liveness(self, name: str):
        if name in ENSEMBLES:
            return MiniFasNetPair(*(self.build(m, "liveness") for m in ENSEMBLES[name]), name=name)
        return self.build(name, "liveness")
