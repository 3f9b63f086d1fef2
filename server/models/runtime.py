"""ONNX Runtime sessions: execution provider chosen once at start-up, shared by all threads.

`InferenceSession.run` is thread-safe, so each model holds exactly one
session that every gRPC worker thread calls concurrently.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from server.observability import TimedSession

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeOptions:
    device: str = "auto"          # auto | cpu | cuda
    intra_op_threads: int = 0     # 0 = onnxruntime default (one per physical core)
    inter_op_threads: int = 1
    allow_spinning: bool = False


def choose_providers(device: str) -> list[str]:
    """CUDA when asked for (or `auto`) and available, else CPU."""
    available = ort.get_available_providers()
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise RuntimeError(f"device=cuda but onnxruntime offers only {available}; install onnxruntime-gpu (make install-gpu)")
    return ["CPUExecutionProvider"]


def create_session(path: str, opts: RuntimeOptions, providers: list[str], name: str = "") -> TimedSession:
    """A session for the model file at `path`; `name` (the manifest's) labels its inference metrics."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = opts.intra_op_threads
    so.inter_op_num_threads = opts.inter_op_threads
    so.log_severity_level = 3  # errors only: keep start-up logs readable
    # Every model has its own intra-op pool; spinning workers of one session
    # steal the few cores from the next model in the pipeline (scripts/bench_pipeline.py
    # on 2 cores, p50 with spinning off: detect 33 -> 18 ms, embed 25 -> 12 ms).
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if opts.allow_spinning else "0")
    session = ort.InferenceSession(path, sess_options=so, providers=providers)
    used = session.get_providers()
    if providers[0] not in used:
        log.warning("%s: asked for %s, running on %s", path, providers[0], used)
    return TimedSession(session, name or Path(path).stem)  # run() timed into facesvc_model_inference_seconds
