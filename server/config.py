"""Server settings: defaults < environment (FACESVC_*) < command-line flags.

Each setting is declared once, below, with its type, default, group, help and
allowed range; the flag parser, the environment reader, the validation at
start-up, the start-up printout and the configuration table in
docs/configuration.md (`python -m server.config --markdown`, checked by a
test) all come from that one declaration.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import MISSING, dataclass, field, fields

from server.vision.models.manifest import DEFAULT_MANIFEST, DEFAULT_MODEL_DIR

GROUPS = {
    "server": "Server: listening, TLS, logs, metrics",
    "auth": "Authentication",
    "models": "Models and thresholds",
    "storage": "Storage: database, staging cache, enrolment",
    "index": "Search index",
    "limits": "Limits (see docs/security.md)",
}


def setting(
    default,
    group: str,
    help: str,
    *,
    low=None,
    high=None,
    choices: tuple = (),
    secret: bool = False,
    from_file: bool | None = None,
):
    """One setting's declaration: its default and what the docs, the parser and the validation need.

    `secret` redacts it in the start-up log. `from_file` (default: secret) lets FACESVC_<NAME>_FILE
    name a file holding the value (a Docker or Kubernetes secret), so the value itself never sits
    in the environment, where `docker inspect` and /proc/<pid>/environ show it."""
    assert group in GROUPS, group
    meta = {"group": group, "help": help, "low": low, "high": high, "choices": choices, "secret": secret}
    return field(default=default, metadata={**meta, "from_file": secret if from_file is None else from_file})


@dataclass(frozen=True)
class Settings:
    # -- server ------------------------------------------------------------------------------------
    host: str = setting("0.0.0.0", "server", "bind address")
    port: int = setting(50_051, "server", "gRPC port", low=0, high=65535)
    workers: int = setting(8, "server", "gRPC worker threads (concurrent RPCs)", low=2, high=1024)
    max_message_mb: int = setting(32, "server", "largest gRPC message accepted or sent, MiB", low=1, high=2047)
    grace_seconds: float = setting(10.0, "server", "on SIGTERM/SIGINT, seconds in-flight calls get to finish", low=0, high=3600)
    log_level: str = setting("INFO", "server", "DEBUG, INFO, WARNING or ERROR", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    log_format: str = setting(
        "text", "server", "text, or json (one object per line: ts, level, logger, request_id, msg)", choices=("text", "json")
    )
    metrics_port: int = setting(
        0, "server", "serve Prometheus metrics on this HTTP port (bound to metrics_host); 0 = off", low=0, high=65535
    )
    tls_cert: str = setting("", "server", "PEM server certificate chain; set with tls_key to serve TLS")
    tls_key: str = setting("", "server", "PEM private key of tls_cert")
    tls_client_ca: str = setting("", "server", "PEM CA bundle; when set, clients must present a certificate it signed (mTLS)")
    metrics_host: str = setting(
        "127.0.0.1", "server", "bind address of the metrics endpoint (loopback by default: it lists collection ids)"
    )
    metrics_token: str = setting("", "server", "when set, /metrics needs `Authorization: Bearer <token>`", secret=True)
    http_port: int = setting(
        -1,
        "server",
        "serve the same FaceService as Connect, gRPC-Web and JSON over HTTP, and the web console, on this port "
        "(TLS settings shared with gRPC); -1 = off, 0 = any free port",
        low=-1,
        high=65535,
    )
    http_host: str = setting("", "server", "bind address of the HTTP port; empty = the same as host")
    http_cors_origins: str = setting(
        "",
        "server",
        "browser origins (comma-separated, e.g. https://app.example.com; * = any) allowed to call the HTTP API "
        "from other sites; empty = same origin only",
    )
    # -- auth --------------------------------------------------------------------------------------
    auth: bool = setting(True, "auth", "require API keys (x-api-key); false = open server for local use only")
    admin_api_key: str = setting("", "auth", "admin API key (at least 16 characters); required when auth is on", secret=True)
    auth_cache_seconds: float = setting(
        10.0, "auth", "how long a key lookup is cached; a key revoked elsewhere works at most this long", low=0, high=3600
    )
    auth_lookups_per_second: float = setting(
        200.0, "auth", "database lookups of API keys never seen before, per second; beyond, RATE_LIMITED", low=1, high=1000000.0
    )
    # -- models ------------------------------------------------------------------------------------
    device: str = setting(
        "auto", "models", "auto (CUDA if onnxruntime-gpu sees a GPU, else CPU), cpu or cuda", choices=("auto", "cpu", "cuda")
    )
    runtime: str = setting(
        "auto",
        "models",
        "what runs the models: auto (OpenVINO on CPU where installed, onnxruntime-gpu on CUDA, else onnxruntime), "
        "openvino or onnxruntime",
        choices=("auto", "openvino", "onnxruntime"),
    )
    precision: str = setting(
        "auto",
        "models",
        "OpenVINO inference precision: auto (the detector and recognizer in bf16 where the CPU computes it natively, "
        "everything else f32), f32, bf16 (as auto), or int8 (the detector and recognizer quantized by `make int8`, "
        "the other models as auto; docs/models.md has their accuracy)",
        choices=("auto", "f32", "bf16", "int8"),
    )
    openvino_hint: str = setting(
        "auto",
        "models",
        "OpenVINO performance hint: auto (a run alone uses every core; runs with company take a core each, and "
        "beyond one run per core queue for a stream per core), latency (each run uses every core) or throughput "
        "(one stream per core, also for a lone call)",
        choices=("auto", "latency", "throughput"),
    )
    ort_threads: int = setting(
        0, "models", "inference threads per model (onnxruntime intra-op, OpenVINO); 0 = one per core", low=0, high=256
    )
    model_dir: str = setting(str(DEFAULT_MODEL_DIR), "models", "directory holding the fetched ONNX files")
    model_manifest: str = setting(str(DEFAULT_MANIFEST), "models", "model manifest (names, files, sha256, params)")
    detector: str = setting("scrfd_500m", "models", "detector model name: scrfd_500m, scrfd_2.5g or yunet")
    recognizer: str = setting("w600k_mbf", "models", "recognizer model name: w600k_mbf, w600k_mbf_int8 or mobilefacenet_128")
    recognizer_flip: bool = setting(
        False, "models", "average each face's embedding with its mirror image's (test-time augmentation)"
    )
    embed_micro_batch: bool = setting(
        False,
        "models",
        "embed concurrent requests' faces in one recognizer call (no added wait); pays on GPUs, where a batch costs little more than one face",
    )
    liveness: str = setting(
        "",
        "models",
        "comma-separated liveness models, fused by mean (minifasnet_pair, minifasnet_se128); empty = the ensemble "
        "chosen from data in the manifest",
    )
    attribute_models: str = setting(
        "age_dlib,gender_dlib", "models", "comma-separated per-face models Analyze runs, each adding its attribute to every face"
    )
    match_threshold: float = setting(
        0.0, "models", "cosine match threshold; 0 = the recognizer's calibrated value from the manifest", low=0, high=0.999
    )
    liveness_threshold: float = setting(
        0.0, "models", "P(live) threshold; 0 = the value chosen with the manifest's ensemble", low=0, high=0.999
    )
    detect_max_side: int = setting(640, "models", "detection runs on a copy downscaled to this long side, px", low=160, high=4096)
    min_face_size: int = setting(20, "models", "default minimum face size, px (FaceOptions.min_face_size = 0)", low=1, high=4096)
    max_faces: int = setting(20, "models", "default maximum faces per image (FaceOptions.max_faces = 0)", low=1, high=100)
    match_threshold_floor: float = setting(0.15, "models", "lowest per-request Verify threshold accepted", low=-1, high=0.999)
    search_threshold: float = setting(
        0.0,
        "models",
        "default Search min_similarity; 0 = the recognizer's calibrated 1:N value from the manifest",
        low=0,
        high=0.999,
    )
    # -- storage -----------------------------------------------------------------------------------
    data_dir: str = setting("data", "storage", "directory for the embedded database (when db_url is empty)")
    db_url: str = setting(
        "",
        "storage",
        "subjects/faces database: sqlite:///path/to.db or mysql://user:pass@host:port/db; empty = data_dir/facesvc.db",
        from_file=True,  # it may carry a password
    )
    db_pool_size: int = setting(8, "storage", "database connections per server process", low=1, high=256)
    redis_url: str = setting(
        "", "storage", "staging cache: redis://host:port/db; empty = in-process (one replica only)", from_file=True
    )
    redis_prefix: str = setting("facesvc:", "storage", "prefix of every Redis key this server writes")
    staging_ttl_seconds: int = setting(600, "storage", "how long a face staged by Process waits for Register", low=1, high=86400)
    staging_max_entries: int = setting(
        10_000, "storage", "in-process staging cache bound (the oldest entry is evicted when full)", low=1, high=10000000
    )
    max_faces_per_subject: int = setting(10, "storage", "most faces one subject may hold", low=1, high=1000)
    audit_retention_days: float = setting(
        365.0, "storage", "how long audit log events are kept (pruned hourly)", low=0.01, high=36500
    )
    retention_sweep_seconds: float = setting(
        3600.0,
        "storage",
        "how often the retention job deletes faces older than their collection's retention_days",
        low=1,
        high=86400,
    )
    max_group_faces: int = setting(
        5000,
        "storage",
        "most stored faces one GroupFaces call clusters (its similarity links cost faces squared); a larger collection "
        "must list the faces to group",
        low=2,
        high=100000,
    )
    enrol_min_face_size: int = setting(48, "storage", "smallest enrolment face (shorter box side), px", low=1, high=4096)
    enrol_min_quality: float = setting(
        0.3, "storage", "lowest enrolment face quality score (size x sharpness x pose)", low=0, high=1
    )
    change_log_retention_hours: float = setting(
        168.0, "storage", "how long change-log rows are kept; older snapshots are not used", low=0.01, high=100000
    )
    crop_key: str = setting(
        "",
        "storage",
        "base64 AES-256 key; when set, an encrypted aligned crop of each registered face is stored for re-embedding",
        secret=True,
    )
    staging_max_per_collection: int = setting(
        1000,
        "storage",
        "faces one collection may hold staged at once (Process); more are refused with STAGING_LIMIT_REACHED",
        low=1,
        high=10000000,
    )
    # -- index -------------------------------------------------------------------------------------
    index_engine: str = setting(
        "hnsw",
        "index",
        "search index engine: hnsw (every replica holds its own graphs in memory) or milvus (one index in Milvus shared by the replicas; `pip install facesvc[milvus]`, docs/milvus.md)",
        choices=("hnsw", "milvus"),
    )
    milvus_uri: str = setting(
        "",
        "index",
        "milvus engine: a file path runs Milvus Lite inside this process (development, one process only); http://host:19530 a Milvus server or cluster; empty = data_dir/milvus.db",
    )
    milvus_token: str = setting("", "index", "milvus engine: credentials, `user:password` or an API key", secret=True)
    milvus_database: str = setting("", "index", "milvus engine: the Milvus database; empty = its default database")
    milvus_collection_prefix: str = setting(
        "facesvc_faces", "index", "milvus engine: Milvus collection name prefix (one collection per recognizer model)"
    )
    milvus_consistency: str = setting(
        "Session",
        "index",
        "milvus engine: consistency level of searches; Session = a replica sees its own writes at once, the others' within Milvus's staleness bound; Strong = everyone's (slower)",
        choices=("Strong", "Session", "Bounded", "Eventually"),
    )
    milvus_partitions: int = setting(
        64, "index", "milvus engine: partition-key buckets of a new Milvus collection (fixed once created)", low=1, high=1024
    )
    hnsw_m: int = setting(32, "index", "search index: HNSW links per node (both engines)", low=2, high=128)
    hnsw_ef_construction: int = setting(
        200, "index", "search index: HNSW build-time candidate list (both engines)", low=10, high=4096
    )
    hnsw_ef_search: int = setting(
        0,
        "index",
        "search index: HNSW query-time candidate list; 0 = grow with each graph's size (docs/search.md); a query uses at least top_k x faces per subject",
        low=0,
        high=8192,
    )
    hnsw_segment_size: int = setting(
        500_000,
        "index",
        "search index: most faces in one HNSW graph; a larger collection gets more graphs, searched side by side and merged",
        low=64,
        high=100000000,
    )
    hnsw_search_threads: int = setting(
        0, "index", "search index: threads searching a collection's graphs side by side; 0 = one per CPU", low=0, high=256
    )
    hnsw_pca_dims: int = setting(
        0,
        "index",
        "search index: a large graph walks a PCA projection of the faces to this many dimensions and re-ranks its candidates on the full vectors (faster rebuilds, exact similarities, more memory; docs/search.md); 0 = full vectors in every graph",
        low=0,
        high=4096,
    )
    hnsw_pca_min_faces: int = setting(
        300_000,
        "index",
        "search index: with hnsw_pca_dims set, a graph is projected when built for this many faces (a rebuild from the database) or started in a collection that holds them",
        low=1,
        high=100000000,
    )
    huge_pages: bool = setting(
        True,
        "index",
        "back the search graphs with transparent huge pages (Linux, glibc 2.35+, THP madvise): the server restarts itself once at start-up with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (false: without it); fewer TLB misses, faster searches",
    )
    index_dir: str = setting(
        "", "index", "where index snapshots are written; empty = data_dir/index (one directory per server process)"
    )
    index_snapshots: bool = setting(
        True, "index", "write index snapshots and start from them (false = always rebuild from the database)"
    )
    index_snapshot_seconds: float = setting(
        300.0, "index", "how often changed indexes are snapshotted (and once more on shutdown)", low=1, high=86400
    )
    index_compact_deleted_share: float = setting(
        0.2,
        "index",
        "rebuild an index from the database once its deleted faces are this share of its slots (0 = never); snapshots "
        "never hold deleted vectors either way",
        low=0,
        high=1,
    )
    index_sync_seconds: float = setting(
        1.0,
        "index",
        "how often the change log is polled for other replicas' changes (the bound on their delay)",
        low=0.05,
        high=3600,
    )
    index_warmup: bool = setting(True, "index", "load every collection's index at start-up instead of on its first search")
    # -- limits ------------------------------------------------------------------------------------
    max_image_mb: float = setting(20.0, "limits", "largest encoded image accepted, MiB", low=0.01, high=2047)
    max_image_pixels: int = setting(40_000_000, "limits", "largest decoded image accepted, pixels", low=1, high=268435456)
    max_streams_per_key: int = setting(
        2,
        "limits",
        "open streams (StreamFrames, ProcessBatch, RegisterBatch) one API key (or, without auth, one peer) may hold, counted from the moment a stream opens",
        low=1,
        high=1024,
    )
    max_streams: int = setting(
        0,
        "limits",
        "open streams in all; 0 = half the workers (each holds a worker thread; the rest stay for unary calls and health)",
        low=0,
        high=1024,
    )
    max_calls_per_key: int = setting(
        0,
        "limits",
        "concurrent calls (unary and streams) one collection key may hold; 0 = half the workers; the admin key is not limited",
        low=0,
        high=1024,
    )
    stream_first_message_seconds: float = setting(
        5.0, "limits", "a stream that sends no first message within this time is closed (STREAM_IDLE)", low=0.1, high=3600
    )
    stream_idle_seconds: float = setting(
        30.0, "limits", "a stream that sends nothing for this long is closed (STREAM_IDLE)", low=0.1, high=86400
    )
    max_request_pixels: int = setting(
        48_000_000,
        "limits",
        "decoded pixels one request may cost in all (a DetectBatch sums its photos), at least this and 48 per byte sent; each detector pass also counts 1.5 M (docs/security.md)",
        low=1,
        high=4000000000,
    )
    max_analyzed_faces: int = setting(
        20,
        "limits",
        "most faces per request (and per stream frame) that per-face models run on: Embed, Analyze, Search with all_faces, StreamFrames; Detect may list more",
        low=1,
        high=100,
    )
    max_jpeg_scans: int = setting(
        32,
        "limits",
        "most scans a JPEG may have (cameras write 1, progressive encoders about 10); a large image gets fewer",
        low=10,
        high=1000,
    )


class SettingsError(ValueError):
    """A setting out of its range; the message is the one line the server exits with."""


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {v!r}")


def env_name(name: str) -> str:
    return "FACESVC_" + name.upper()


def _raw_from_environ(f, environ) -> str | None:
    """FACESVC_<NAME>, or for a `from_file` setting the contents of the file FACESVC_<NAME>_FILE
    names (one trailing newline dropped, as `echo key > file` writes it); both at once is an error."""
    name = env_name(f.name)
    raw = environ.get(name)
    path = environ.get(name + "_FILE") if f.metadata["from_file"] else None
    if not path:
        return raw
    if raw:
        raise SystemExit(f"both {name} and {name}_FILE are set: use one")
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as exc:
        raise SystemExit(f"{name}_FILE: cannot read {path}: {exc.strerror}") from None
    return text.removesuffix("\n").removesuffix("\r")


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _type(f):
    return {"int": int, "float": float, "str": str, "bool": bool}[f.type] if isinstance(f.type, str) else f.type


def _parse(f, raw: str):
    t = _type(f)
    return _bool(raw) if t is bool else t(raw)


def validate(s: Settings) -> Settings:
    """Every setting within its declared range or choices, and the combinations that must hold."""
    for f in fields(Settings):
        v, m = getattr(s, f.name), f.metadata
        where = f"{env_name(f.name)} / {flag_name(f.name)}"
        if m["choices"] and str(v).upper() not in (c.upper() for c in m["choices"]):
            raise SettingsError(f"{where} must be one of {', '.join(m['choices'])}, not {v!r}")
        if m["low"] is not None and v < m["low"]:
            raise SettingsError(f"{where} must be at least {m['low']}, not {v}")
        if m["high"] is not None and v > m["high"]:
            raise SettingsError(f"{where} must be at most {m['high']}, not {v}")
    if s.match_threshold and s.match_threshold < s.match_threshold_floor:
        raise SettingsError(
            f"FACESVC_MATCH_THRESHOLD ({s.match_threshold}) is below FACESVC_MATCH_THRESHOLD_FLOOR ({s.match_threshold_floor})"
        )
    return s


def load(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Defaults < environment < flags, validated. A bad value exits with one line naming the setting."""
    environ = os.environ if environ is None else environ
    values = {}
    for f in fields(Settings):
        raw = _raw_from_environ(f, environ)
        if raw is not None and raw != "":
            try:
                values[f.name] = _parse(f, raw)
            except ValueError as exc:
                raise SystemExit(f"invalid {env_name(f.name)}={raw!r}: {exc}") from None
    parser = argparse.ArgumentParser(prog="python -m server", description="facesvc gRPC server")
    for f in fields(Settings):
        parser.add_argument(
            flag_name(f.name),
            type=_bool if _type(f) is bool else _type(f),
            default=None,
            help=f"{f.metadata['help']} (env {env_name(f.name)}, default {_default(f)})",
        )
    args = parser.parse_args(argv)
    for f in fields(Settings):
        v = getattr(args, f.name)
        if v is not None:
            values[f.name] = v
    try:
        return validate(Settings(**values))
    except SettingsError as exc:
        raise SystemExit(f"invalid setting: {exc}") from None


def _default(f):
    return f.default if f.default is not MISSING else ""


def describe(settings: Settings) -> str:
    """One line per setting for the start-up log, secrets redacted."""
    lines = []
    for f in fields(Settings):
        v = getattr(settings, f.name)
        if f.metadata["secret"] and v:
            v = "***"
        elif isinstance(v, str) and "://" in v:
            v = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", v)  # a password inside a URL
        lines.append(f"  {f.name:<28} = {v}")
    return "\n".join(lines)


def markdown() -> str:
    """The configuration table of docs/configuration.md, group by group."""
    out = []
    for group, title in GROUPS.items():
        out += [f"### {title}", "", "| env | flag | default | range | meaning |", "|---|---|---|---|---|"]
        for f in fields(Settings):
            m = f.metadata
            if m["group"] != group:
                continue
            d = _default(f)
            if f.name in ("model_dir", "model_manifest"):
                d = "models/" + ("weights" if f.name == "model_dir" else "manifest.json")
            rng = " / ".join(m["choices"]) if m["choices"] else (f"{m['low']} – {m['high']}" if m["low"] is not None else "")
            env = f"`{env_name(f.name)}`" + (f" (or `{env_name(f.name)}_FILE`)" if m["from_file"] else "")
            out.append(f"| {env} | `{flag_name(f.name)}` | {f'`{d}`' if d != '' else '(empty)'} | {rng} | {m['help']} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    if sys.argv[1:] == ["--markdown"]:
        print(markdown())
    else:
        sys.exit("usage: python -m server.config --markdown")
