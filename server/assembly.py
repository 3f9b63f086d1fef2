"""The vision stack from settings: every model loaded once into one FacePipeline.

Kept apart from server.app (the gRPC wiring, storage and the index) so that what needs only the
pipeline (the evaluations, the benchmarks, the GPU bench, re-embedding) imports none of the
server's machinery, and runs where only the model runtime and OpenCV are installed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from server.config import Settings
from server.vision.models.manifest import LivenessDefaults, load_liveness_defaults, load_manifest
from server.vision.models.registry import ModelLoader
from server.vision.models.runtime import RuntimeOptions, choose_providers
from server.vision.pipeline import FacePipeline

log = logging.getLogger("facesvc")


def model_loader(settings: Settings) -> ModelLoader:
    providers = choose_providers(settings.device)
    log.info("execution providers: %s", providers)
    runtime = RuntimeOptions(
        device=settings.device,
        intra_op_threads=settings.ort_threads,
        runtime=settings.runtime,
        precision=settings.precision,
        hint=settings.openvino_hint,
    )
    return ModelLoader(load_manifest(Path(settings.model_manifest)), Path(settings.model_dir), runtime, providers)


def liveness_defaults(settings: Settings) -> LivenessDefaults:
    """The liveness ensemble and threshold: the operator's where set, else those chosen from data
    (scripts/eval_liveness.py wrote them to the manifest). A threshold belongs to its ensemble, so an
    operator who changes the ensemble without a threshold gets 0.5, not a value tuned for other models."""
    chosen = load_liveness_defaults(Path(settings.model_manifest))
    ensemble = settings.liveness or chosen.ensemble
    own = settings.liveness_threshold or (chosen.threshold if ensemble == chosen.ensemble else 0.5)
    return LivenessDefaults(ensemble, own, chosen.min_face_px)


def build_pipeline(settings: Settings) -> FacePipeline:
    """Load every model once (and warm it where the runtime asks: FacePipeline.warm_up); the returned
    pipeline is shared by all worker threads."""
    loader = model_loader(settings)
    live = liveness_defaults(settings)
    liveness = [loader.build_liveness(n.strip()) for n in live.ensemble.split(",") if n.strip()]
    if not liveness:
        raise ValueError("at least one liveness model is required (FACESVC_LIVENESS)")
    log.info("liveness: %s, P(live) >= %s, faces from %d px", live.ensemble, live.threshold, live.min_face_px)
    pipeline = FacePipeline(
        detector=loader.build(settings.detector, "detector"),
        recognizer=loader.build(
            settings.recognizer, "recognizer", flip=settings.recognizer_flip, micro_batch=settings.embed_micro_batch
        ),
        liveness=liveness,
        attribute_models=[loader.build(n.strip(), ("age", "gender")) for n in settings.attribute_models.split(",") if n.strip()],
        detect_max_side=settings.detect_max_side,
        liveness_threshold=live.threshold,
        min_liveness_face=live.min_face_px,
        runtimes=loader.loaded,
    )
    pipeline.warm_up()
    return pipeline
