"""Wire the gRPC server: FaceService, grpc.health.v1, reflection, model loading, shutdown.

Start-up order: the port opens with health NOT_SERVING (so orchestrators can
probe at once), models load (FaceService answers UNAVAILABLE/MODELS_LOADING
meanwhile), then health flips to SERVING.
"""
from __future__ import annotations

import logging
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from facesvc.v1 import face_service_pb2 as pb
from facesvc.v1 import face_service_pb2_grpc as pb_grpc
from server import reflection
from server.config import Settings
from server.models.manifest import load_manifest
from server.models.registry import ModelLoader
from server.models.runtime import RuntimeOptions, choose_providers
from server.pipeline import FacePipeline
from server.servicer import FaceServicer

log = logging.getLogger("facesvc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FaceService"].full_name


def build_pipeline(settings: Settings) -> FacePipeline:
    """Load every model once; the returned pipeline is shared by all worker threads."""
    providers = choose_providers(settings.device)
    log.info("execution providers: %s", providers)
    runtime = RuntimeOptions(device=settings.device, intra_op_threads=settings.ort_threads)
    loader = ModelLoader(load_manifest(Path(settings.model_manifest)), Path(settings.model_dir), runtime, providers)
    liveness = [loader.build_liveness(n.strip()) for n in settings.liveness.split(",") if n.strip()]
    if not liveness:
        raise ValueError("at least one liveness model is required (FACESVC_LIVENESS)")
    return FacePipeline(
        detector=loader.build(settings.detector, "detector"),
        recognizer=loader.build(settings.recognizer, "recognizer", flip=settings.recognizer_flip),
        liveness=liveness,
        age=loader.build(settings.age_model, "age"),
        gender=loader.build(settings.gender_model, "gender"),
        detect_max_side=settings.detect_max_side,
        liveness_threshold=settings.liveness_threshold,
    )


class FaceServer:
    """The running service. `start()` opens the port; `load_models()` makes it SERVING."""

    def __init__(self, settings: Settings):
        self.settings = settings
        max_bytes = settings.max_message_mb * 1024 * 1024
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="rpc"),
            options=[
                ("grpc.max_receive_message_length", max_bytes),
                ("grpc.max_send_message_length", max_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.servicer = FaceServicer(settings)
        pb_grpc.add_FaceServiceServicer_to_server(self.servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable(self.server, (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
        self.port = self.server.add_insecure_port(f"{settings.host}:{settings.port}")
        if self.port == 0:
            raise RuntimeError(f"cannot bind {settings.host}:{settings.port}")
        self._stopped = threading.Event()

    def start(self) -> None:
        self.server.start()
        log.info("listening on %s:%d (health NOT_SERVING until models are loaded)", self.settings.host, self.port)

    def load_models(self) -> None:
        self.servicer.pipeline = build_pipeline(self.settings)
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("ready: health SERVING")

    def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish within the grace period."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.settings.grace_seconds if grace is None else grace
        log.info("shutting down: finishing in-flight calls (grace %.1fs)", grace)
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        log.info("stopped")

    def wait(self) -> None:
        self.server.wait_for_termination()
