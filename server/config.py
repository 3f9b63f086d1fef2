"""Server settings: defaults < environment (FACESVC_*) < command-line flags.

Every setting is declared once in `SETTINGS`; the flag parser, the env reader,
the start-up printout and the README's configuration table all come from it.
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, fields

from server.vision.models.manifest import DEFAULT_MANIFEST, DEFAULT_MODEL_DIR


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {v!r}")


@dataclass(frozen=True)
class Settings:
    host: str = "0.0.0.0"
    port: int = 50051
    workers: int = 8
    max_message_mb: int = 32
    grace_seconds: float = 10.0
    log_level: str = "INFO"
    log_format: str = "text"
    metrics_port: int = 0
    device: str = "auto"
    ort_threads: int = 0
    model_dir: str = str(DEFAULT_MODEL_DIR)
    model_manifest: str = str(DEFAULT_MANIFEST)
    detector: str = "scrfd_500m"
    recognizer: str = "w600k_mbf"
    recognizer_flip: bool = False
    embed_micro_batch: bool = False
    liveness: str = "minifasnet_pair"
    age_model: str = "age_dlib"
    gender_model: str = "gender_dlib"
    match_threshold: float = 0.0
    liveness_threshold: float = 0.5
    detect_max_side: int = 640
    min_face_size: int = 20
    max_faces: int = 20
    max_image_mb: float = 20.0
    max_image_pixels: int = 40_000_000
    data_dir: str = "data"
    db_url: str = ""
    db_pool_size: int = 8
    redis_url: str = ""
    redis_prefix: str = "facesvc:"
    staging_ttl_seconds: int = 600
    staging_max_entries: int = 10_000
    max_faces_per_subject: int = 10
    enrol_min_face_size: int = 48
    enrol_min_quality: float = 0.3
    match_threshold_floor: float = 0.15
    search_threshold: float = 0.0
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 0
    hnsw_segment_size: int = 500_000
    hnsw_search_threads: int = 0
    hnsw_pca_dims: int = 0
    hnsw_pca_min_faces: int = 300_000
    huge_pages: bool = True
    index_dir: str = ""
    index_snapshots: bool = True
    index_snapshot_seconds: float = 300.0
    index_sync_seconds: float = 1.0
    index_warmup: bool = True
    change_log_retention_hours: float = 168.0
    crop_key: str = ""
    auth: bool = True
    admin_api_key: str = ""
    auth_cache_seconds: float = 10.0
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    max_streams_per_key: int = 2
    max_streams: int = 0
    max_calls_per_key: int = 0
    stream_first_message_seconds: float = 5.0
    stream_idle_seconds: float = 30.0
    max_request_pixels: int = 48_000_000
    max_jpeg_scans: int = 32
    staging_max_per_collection: int = 1000
    auth_lookups_per_second: float = 200.0
    metrics_host: str = "127.0.0.1"
    metrics_token: str = ""


HELP = {
    "host": "bind address",
    "port": "gRPC port",
    "workers": "gRPC worker threads (concurrent RPCs)",
    "max_message_mb": "largest gRPC message accepted or sent, MiB",
    "grace_seconds": "on SIGTERM/SIGINT, seconds in-flight calls get to finish",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "log_format": "text, or json (one object per line: ts, level, logger, request_id, msg)",
    "metrics_port": "serve Prometheus metrics on this HTTP port (bound to metrics_host); 0 = off",
    "device": "auto (CUDA if onnxruntime-gpu sees a GPU, else CPU), cpu or cuda",
    "ort_threads": "onnxruntime intra-op threads per model; 0 = one per core",
    "model_dir": "directory holding the fetched ONNX files",
    "model_manifest": "model manifest (names, files, sha256, params)",
    "detector": "detector model name: scrfd_500m, scrfd_2.5g or yunet",
    "recognizer": "recognizer model name: w600k_mbf, w600k_mbf_int8 or mobilefacenet_128",
    "recognizer_flip": "average each face's embedding with its mirror image's (test-time augmentation)",
    "embed_micro_batch": "embed concurrent requests' faces in one recognizer call (no added wait); for GPUs: on CPU a batch of 8 costs 8 single runs",
    "liveness": "comma-separated liveness models, fused by mean: minifasnet_pair, minifasnet_se128",
    "age_model": "age model name",
    "gender_model": "gender model name",
    "match_threshold": "cosine match threshold; 0 = the recognizer's calibrated value from the manifest",
    "liveness_threshold": "P(live) threshold",
    "detect_max_side": "detection runs on a copy downscaled to this long side, px",
    "min_face_size": "default minimum face size, px (FaceOptions.min_face_size = 0)",
    "max_faces": "default maximum faces per image (FaceOptions.max_faces = 0)",
    "max_image_mb": "largest encoded image accepted, MiB",
    "max_image_pixels": "largest decoded image accepted, pixels",
    "data_dir": "directory for the embedded database (when db_url is empty)",
    "db_url": "subjects/faces database: sqlite:///path/to.db or mysql://user:pass@host:port/db; empty = data_dir/facesvc.db",
    "db_pool_size": "database connections per server process",
    "redis_url": "staging cache: redis://host:port/db; empty = in-process (one replica only)",
    "redis_prefix": "prefix of every Redis key this server writes",
    "staging_ttl_seconds": "how long a face staged by Process waits for Register",
    "staging_max_entries": "in-process staging cache bound (the oldest entry is evicted when full)",
    "max_faces_per_subject": "most faces one subject may hold",
    "enrol_min_face_size": "smallest enrolment face (shorter box side), px",
    "enrol_min_quality": "lowest enrolment face quality score (size x sharpness x pose)",
    "match_threshold_floor": "lowest per-request Verify threshold accepted",
    "search_threshold": "default Search min_similarity; 0 = the recognizer's calibrated 1:N value from the manifest",
    "hnsw_m": "search index: HNSW links per node",
    "hnsw_ef_construction": "search index: HNSW build-time candidate list",
    "hnsw_ef_search": "search index: HNSW query-time candidate list; 0 = grow with each graph (64 up to 200 k faces, 96 at 500 k, 256 at 1 M); a query uses at least top_k x faces per subject",
    "hnsw_segment_size": "search index: most faces in one HNSW graph; a larger collection gets more graphs, searched side by side and merged",
    "hnsw_search_threads": "search index: threads searching a collection's graphs side by side; 0 = one per CPU",
    "hnsw_pca_dims": "search index: a large graph walks a PCA projection of the faces to this many dimensions (192 holds recall; 128 stops at 0.99) and re-ranks its candidates on the full vectors: rebuilds 2-3.5x faster, exact similarities, +2 KB a face, p99 no better; 0 = full vectors in every graph",
    "hnsw_pca_min_faces": "search index: with hnsw_pca_dims set, a graph is projected when built for this many faces (a rebuild from the database) or started in a collection that holds them",
    "huge_pages": "back the search graphs with transparent huge pages (Linux, glibc 2.35+, THP madvise): the server restarts itself once at start-up with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (false: without it); searches ~1.3x faster",
    "index_dir": "where index snapshots are written; empty = data_dir/index (one directory per server process)",
    "index_snapshots": "write index snapshots and start from them (false = always rebuild from the database)",
    "index_snapshot_seconds": "how often changed indexes are snapshotted (and once more on shutdown)",
    "index_sync_seconds": "how often the change log is polled for other replicas' changes (the bound on their delay)",
    "index_warmup": "load every collection's index at start-up instead of on its first search",
    "change_log_retention_hours": "how long change-log rows are kept; older snapshots are not used",
    "crop_key": "base64 AES-256 key; when set, an encrypted aligned crop of each registered face is stored for re-embedding",
    "auth": "require API keys (x-api-key); false = open server for local use only",
    "admin_api_key": "admin API key (at least 16 characters); required when auth is on",
    "auth_cache_seconds": "how long a key lookup is cached; a key revoked elsewhere works at most this long",
    "tls_cert": "PEM server certificate chain; set with tls_key to serve TLS",
    "tls_key": "PEM private key of tls_cert",
    "tls_client_ca": "PEM CA bundle; when set, clients must present a certificate it signed (mTLS)",
    "max_streams_per_key": "open streams (StreamFrames, ProcessBatch, RegisterBatch) one API key (or, without auth, one peer) may hold, counted from the moment a stream opens",
    "max_streams": "open streams in all; 0 = half the workers (each holds a worker thread; the rest stay for unary calls and health)",
    "max_calls_per_key": "concurrent calls (unary and streams) one collection key may hold; 0 = half the workers; the admin key is not limited",
    "stream_first_message_seconds": "a stream that sends no first message within this time is closed (STREAM_IDLE)",
    "stream_idle_seconds": "a stream that sends nothing for this long is closed (STREAM_IDLE)",
    "max_request_pixels": "decoded pixels one request may cost in all (a DetectBatch sums its photos), at least this and 16 per byte sent",
    "max_jpeg_scans": "most scans a JPEG may have (cameras write 1, progressive encoders about 10); a large image gets fewer",
    "staging_max_per_collection": "faces one collection may hold staged at once (Process); more are refused with STAGING_LIMIT_REACHED",
    "auth_lookups_per_second": "database lookups of API keys never seen before, per second; beyond, RATE_LIMITED",
    "metrics_host": "bind address of the metrics endpoint (loopback by default: it lists collection ids)",
    "metrics_token": "when set, /metrics needs `Authorization: Bearer <token>`",
}

SECRET_WORDS = ("key", "password", "secret", "token")


def env_name(field: str) -> str:
    return "FACESVC_" + field.upper()


def load(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    values = {}
    for f in fields(Settings):
        raw = environ.get(env_name(f.name))
        if raw is not None and raw != "":
            values[f.name] = _convert(f, raw)
    parser = argparse.ArgumentParser(prog="python -m server", description="facesvc gRPC server")
    for f in fields(Settings):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=_bool if f.type in (bool, "bool") else _pytype(f),
            default=None,
            help=f"{HELP[f.name]} (env {env_name(f.name)}, default {f.default})",
        )
    args = parser.parse_args(argv)
    for f in fields(Settings):
        v = getattr(args, f.name)
        if v is not None:
            values[f.name] = v
    return Settings(**values)


def _pytype(f):
    t = f.type if not isinstance(f.type, str) else {"int": int, "float": float, "str": str, "bool": bool}[f.type]
    return t


def _convert(f, raw: str):
    t = _pytype(f)
    try:
        return _bool(raw) if t is bool else t(raw)
    except ValueError as exc:
        raise SystemExit(f"invalid {env_name(f.name)}={raw!r}: {exc}") from None


def describe(settings: Settings) -> str:
    """One line per setting for the start-up log, secrets redacted."""
    lines = []
    for f in fields(Settings):
        v = getattr(settings, f.name)
        if any(w in f.name for w in SECRET_WORDS) and v:
            v = "***"
        elif isinstance(v, str) and "://" in v:
            v = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", v)  # a password inside a URL
        lines.append(f"  {f.name:<20} = {v}")
    return "\n".join(lines)
