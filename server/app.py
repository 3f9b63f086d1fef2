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
from server import errors
from server.assembly import build_pipeline
from server.config import Settings
from server.domain.audit import AuditLog
from server.domain.collections import CollectionService, ServerThresholds
from server.domain.identity import EnrolmentPolicy, IdentityService
from server.domain.retention import RetentionJob
from server.domain.search import SearchService
from server.index import HnswEngine, HnswParams, IndexRegistry
from server.index.snapshot import SnapshotStore
from server.index.sync import ChangeNotifier, IndexSync
from server.rpc import reflection
from server.rpc.audit import AuditInterceptor, AuditRecorder
from server.rpc.auth import SERVICE_PREFIX, Authenticator, AuthInterceptor
from server.rpc.handlers.identity import IdentityHandlers
from server.rpc.handlers.management import ManagementHandlers
from server.rpc.handlers.search import SearchHandlers
from server.rpc.handlers.stateless import StatelessHandlers
from server.rpc.handlers.streams import StreamHandlers
from server.rpc.limits import ConcurrencyLimiter, LimitInterceptor, ReceiveInterceptor
from server.rpc.messages import MessageInterceptor
from server.rpc.observability import ObservabilityInterceptor
from server.rpc.requests import Defaults, RequestParser
from server.rpc.servicer import FaceServicer
from server.storage.crypto import CropCipher
from server.storage.sql import open_store
from server.storage.staging import open_cache
from server.telemetry import MODEL_INFO, ServiceCollector, serve_metrics
from server.vision.imaging import ImageLimits

log = logging.getLogger("facesvc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FaceService"].full_name


def index_engine(s: Settings, store):
    """The search index engine the settings name (FACESVC_INDEX_ENGINE)."""
    if s.index_engine == "milvus":
        try:
            import pymilvus  # noqa: F401

            from server.index.milvus import MilvusEngine, MilvusParams
        except ImportError:
            raise ValueError("FACESVC_INDEX_ENGINE=milvus needs pymilvus: pip install 'facesvc[milvus]'") from None
        params = MilvusParams(
            uri=s.milvus_uri or str(Path(s.data_dir) / "milvus.db"),
            token=s.milvus_token,
            database=s.milvus_database,
            collection_prefix=s.milvus_collection_prefix,
            consistency=s.milvus_consistency,
            m=s.hnsw_m,
            ef_construction=s.hnsw_ef_construction,
            ef_search=s.hnsw_ef_search,
            partitions=s.milvus_partitions,
        )
        log.info("search index: milvus at %s (consistency %s)", params.where(), params.consistency)
        return MilvusEngine(params, store)
    snapshots = SnapshotStore(s.index_dir or Path(s.data_dir) / "index") if s.index_snapshots else None
    return HnswEngine(
        HnswParams(
            m=s.hnsw_m,
            ef_construction=s.hnsw_ef_construction,
            ef_search=s.hnsw_ef_search,
            segment_size=s.hnsw_segment_size,
            search_threads=s.hnsw_search_threads,
            pca_dims=s.hnsw_pca_dims,
            pca_min_faces=s.hnsw_pca_min_faces,
        ),
        snapshots,
    )


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path!r}: {exc}") from None


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS when tls_cert/tls_key are set; mTLS (client certificates required) when tls_client_ca is too."""
    if not (settings.tls_cert or settings.tls_key or settings.tls_client_ca):
        return None
    if not (settings.tls_cert and settings.tls_key):
        raise ValueError("TLS needs both FACESVC_TLS_CERT and FACESVC_TLS_KEY")
    ca = _read(settings.tls_client_ca, "client CA") if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(_read(settings.tls_key, "TLS key"), _read(settings.tls_cert, "TLS certificate"))],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def build_authenticator(settings: Settings, store) -> Authenticator | None:
    if not settings.auth:
        for line in (
            "*" * 72,
            "AUTH IS DISABLED: every caller may read, change and delete every collection.",
            "Use this only on a developer machine. Set FACESVC_AUTH=true and FACESVC_ADMIN_API_KEY",
            "for anything reachable by others.",
            "*" * 72,
        ):
            log.warning(line)
        return None
    if len(settings.admin_api_key) < 16:
        raise ValueError(
            "auth is on but FACESVC_ADMIN_API_KEY is missing or shorter than 16 characters: "
            "set one (e.g. `openssl rand -hex 32`), or run with --auth=false on a developer machine"
        )
    return Authenticator(
        store, settings.admin_api_key, settings.auth_cache_seconds, lookups_per_second=settings.auth_lookups_per_second
    )


class FaceServer:
    """The running service. `start()` opens the port; `load_models()` makes it SERVING.

    The store and the staging cache are connected (and the schema migrated)
    before the port opens: a server that cannot reach its database exits with
    a clear message instead of answering UNAVAILABLE forever.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        creds = server_credentials(settings)
        self.store = open_store(settings.db_url, settings.data_dir, settings.db_pool_size)
        log.info("store: %s", self.store.describe())
        self.cache = open_cache(
            settings.redis_url,
            prefix=settings.redis_prefix,
            max_entries=settings.staging_max_entries,
            per_collection=settings.staging_max_per_collection,
        )
        if hasattr(self.cache, "ping"):
            self.cache.ping()
        log.info("staging cache: %s, TTL %ds", self.cache.describe(), settings.staging_ttl_seconds)
        self.cipher = CropCipher(settings.crop_key) if settings.crop_key else None
        log.info("face crops: %s", "stored, AES-256-GCM encrypted" if self.cipher else "not stored (no crop key)")
        authenticator = build_authenticator(settings, self.store)
        self.audit = AuditLog(self.store, settings.audit_retention_days)
        self.audit_recorder = AuditRecorder(self.audit)
        self.retention = None
        max_bytes = settings.max_message_mb * 1024 * 1024
        half = max(1, settings.workers // 2)
        streams = ConcurrencyLimiter(
            settings.max_streams_per_key,
            settings.max_streams or half,
            errors.STREAM_LIMIT_REACHED,
            "streams (max_streams_per_key / max_streams)",
        )
        calls = (
            ConcurrencyLimiter(settings.max_calls_per_key or half, 0, errors.CALL_LIMIT_REACHED, "calls (max_calls_per_key)")
            if authenticator
            else None
        )
        # observability outermost, so it also sees (and times) calls the auth check refuses; the
        # limits after auth, so they count calls by the key that was checked. The HTTP port runs the
        # same instances (server/web), so a key's limits count its calls on both.
        self.interceptors = (
            [ObservabilityInterceptor(SERVICE_PREFIX)]
            # unary messages arrive on our code's watch: no key, no wait (server/rpc/limits.py)
            + [ReceiveInterceptor(authenticator, calls, settings.stream_idle_seconds, settings.stream_first_message_seconds)]
            + ([AuthInterceptor(authenticator)] if authenticator else [])
            # request messages that do not parse: refused after the key check (server/rpc/messages.py)
            + [MessageInterceptor(SERVICE_PREFIX)]
            + [
                LimitInterceptor(
                    streams,
                    calls,
                    settings.stream_first_message_seconds,
                    settings.stream_idle_seconds,
                    by_key=authenticator is not None,
                )
            ]
            # innermost: records the calls that reached their handler, with the key the auth check found
            + [AuditInterceptor(self.audit_recorder)]
        )
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="rpc"),
            interceptors=self.interceptors,
            options=[
                ("grpc.max_receive_message_length", max_bytes),
                ("grpc.max_send_message_length", max_bytes),
                ("grpc.so_reuseport", 0),
                # Only uncompressed request messages (bit 0: identity). A request's work budget grows
                # with the bytes it sends, and the handler sees only the message after decompression:
                # gzip would let a few KB on the wire buy the budget of megabytes (32 MB of zero
                # pixels fold to about 30 KB). Photos are compressed already; gRPC refuses a
                # compressed message with UNIMPLEMENTED before it is decompressed.
                ("grpc.compression_enabled_algorithms_bitset", 1),
            ],
        )
        self.streams, self.authenticator, self.indexes = streams, authenticator, None
        self.servicer = FaceServicer()  # MODELS_LOADING until load_models() attaches the handlers
        pb_grpc.add_FaceServiceServicer_to_server(self.servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable(self.server, (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
        addr = f"{settings.host}:{settings.port}"
        self.port = self.server.add_secure_port(addr, creds) if creds else self.server.add_insecure_port(addr)
        if self.port == 0:
            raise RuntimeError(f"cannot bind {settings.host}:{settings.port}")
        self.http = None
        if settings.http_port >= 0:
            from server.web.app import HttpServer  # only servers with an HTTP port import the HTTP stack

            self.http = HttpServer(settings, self.servicer, self.interceptors)
        self._stopped = threading.Event()
        self.index_sync = None

    def start(self) -> None:
        self.server.start()
        s = self.settings
        if self.http is not None:
            self.http.start()
            log.info(
                "HTTP on %s: Connect, gRPC-Web and JSON at /facesvc.v1.FaceService/<Method>, web console at /%s",
                self.http.url,
                "" if self.http.app.console_dir else " (not built: make web)",
            )
        if s.metrics_port:
            collector = ServiceCollector(lambda: self.indexes.sizes() if self.indexes else {}, self.streams.active)
            serve_metrics(s.metrics_port, s.metrics_host, collector, s.metrics_token)
            log.info(
                "Prometheus metrics on http://%s:%d/metrics%s",
                s.metrics_host,
                s.metrics_port,
                " (bearer token required)" if s.metrics_token else "",
            )
        log.info(
            "listening on %s:%d%s (health NOT_SERVING until models are loaded)",
            self.settings.host,
            self.port,
            " with TLS" + (" + client certificates" if self.settings.tls_client_ca else "") if self.settings.tls_cert else "",
        )

    def servicer_limits(self) -> ImageLimits:
        s = self.settings
        return ImageLimits(
            max_bytes=int(s.max_image_mb * 1024 * 1024),
            max_pixels=s.max_image_pixels,
            max_jpeg_scans=s.max_jpeg_scans,
            max_request_pixels=s.max_request_pixels,
        )

    def load_models(self) -> None:
        pipeline = build_pipeline(self.settings)
        for where in pipeline.runtimes:
            MODEL_INFO.labels(**where).set(1)
        s = self.settings
        policy = EnrolmentPolicy(
            staging_ttl_s=s.staging_ttl_seconds,
            max_faces_per_subject=s.max_faces_per_subject,
            min_face_size=s.enrol_min_face_size,
            min_quality=s.enrol_min_quality,
        )
        rec = pipeline.recognizer
        retention_s = s.change_log_retention_hours * 3600
        engine = index_engine(s, self.store)
        indexes = IndexRegistry(self.store, rec.model_id, rec.embedding_dim, engine, retention_s=retention_s)
        notifier = ChangeNotifier(s.redis_url, s.redis_prefix + "index-changes") if s.redis_url else None
        self.index_sync = IndexSync(
            indexes,
            self.store,
            sync_interval_s=s.index_sync_seconds,
            snapshot_interval_s=s.index_snapshot_seconds,
            retention_s=retention_s,
            warmup=s.index_warmup,
            notifier=notifier,
            compact_deleted_share=s.index_compact_deleted_share,
        )
        if self.authenticator is not None:  # a key of a collection deleted on another replica goes here too
            self.index_sync.on_drop = self.authenticator.forget
        defaults = Defaults(
            min_face_size=s.min_face_size,
            max_faces=s.max_faces,
            match_threshold=s.match_threshold or rec.match_threshold,
            search_threshold=s.search_threshold or rec.search_threshold,
            match_floor=s.match_threshold_floor,
            liveness_threshold=pipeline.liveness_threshold,
            max_analyzed_faces=s.max_analyzed_faces,
        )
        thresholds = ServerThresholds(
            defaults.match_threshold, defaults.search_threshold, defaults.liveness_threshold, defaults.match_floor
        )
        identity = IdentityService(pipeline, self.store, self.cache, policy, self.cipher, indexes, thresholds)
        collections = CollectionService(
            self.store,
            self.store,
            self.cache,
            indexes,
            on_keys_revoked=self.authenticator.forget if self.authenticator else lambda: None,
            thresholds=thresholds,
        )
        searcher = SearchService(identity, indexes, s.max_faces_per_subject)
        requests = RequestParser(self.servicer_limits(), defaults)
        identity_rpcs = IdentityHandlers(identity, requests)
        self.indexes = indexes
        self.servicer.attach(
            StatelessHandlers(pipeline, requests),
            identity_rpcs,
            ManagementHandlers(collections, self.audit),
            SearchHandlers(searcher, requests, s.max_group_faces, pipeline.runtimes),
            StreamHandlers(
                pipeline,
                identity_rpcs,
                collections,
                indexes,
                requests,
                self.authenticator,
                s.stream_first_message_seconds,
                s.stream_idle_seconds,
                s.max_faces_per_subject,
                self.audit_recorder,
            ),
        )
        self.retention = RetentionJob(self.store, identity, self.audit, s.retention_sweep_seconds)
        self.index_sync.start()
        self.audit.start()
        self.retention.start()
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
        grpc_stopped = self.server.stop(grace)
        if self.http is not None:
            self.http.stop(grace)
        grpc_stopped.wait()
        if self.retention is not None:
            self.retention.stop()
        if self.index_sync is not None:
            self.index_sync.stop()  # and a last snapshot of every changed index
            if hasattr(self.index_sync.registry.engine, "close"):
                self.index_sync.registry.engine.close()
        self.audit.stop()  # writes what is still buffered
        self.store.close()
        self.cache.close()
        log.info("stopped")

    def wait(self) -> None:
        self.server.wait_for_termination()
