"""ONNX Runtime sessions: execution provider chosen once at start-up, shared by all threads.

`InferenceSession.run` is thread-safe, so each model holds its sessions once and
every gRPC worker thread calls them concurrently.

On CPU each model has two sessions with one intra-op thread per core, and each run
picks one (docs/benchmarks.md has the figures, from scripts/bench_compare.py):
  - alone (no other model run, no other gRPC call in flight): the spinning session,
    whose workers spin between the many small ops of one run instead of sleeping and
    being woken, and stop spinning at the end of the run;
  - otherwise the quiet session (no spinning): spinning workers of concurrent runs
    burn the cores the other requests need.
On CUDA there is one session: the GPU queues its own work.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from server.context import IN_FLIGHT, ensure_call_alive
from server.telemetry import INFERENCE

log = logging.getLogger(__name__)


def cpu_cores() -> int:
    """The cores this process may run on (the container's share, not the host's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class RuntimeOptions:
    device: str = "auto"  # auto | cpu | cuda
    intra_op_threads: int = 0  # 0 = onnxruntime default (one per physical core)
    inter_op_threads: int = 1


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


class RunCounter:
    """Model runs in flight in this process, across all models."""

    def __init__(self):
        self._lock = threading.Lock()
        self.active = 0

    def enter(self) -> bool:
        """Count a run in; True when it has the CPU to itself (no other run, no other gRPC call)."""
        with self._lock:
            self.active += 1
            return self.active == 1 and IN_FLIGHT.value <= 1

    def leave(self) -> None:
        with self._lock:
            self.active -= 1


RUNS = RunCounter()


class CpuSessionPair:
    """Two sessions of one model: spinning for a run that is alone, quiet when others run."""

    def __init__(self, spinning, quiet, runs: RunCounter = RUNS):
        self.spinning, self.quiet, self.runs = spinning, quiet, runs

    def run(self, *args, **kwargs):
        alone = self.runs.enter()
        try:
            return (self.spinning if alone else self.quiet).run(*args, **kwargs)
        finally:
            self.runs.leave()

    def __getattr__(self, name):
        return getattr(self.quiet, name)


def _session(path: str, providers: list[str], threads: int, inter: int, spin: bool) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = inter
    so.log_severity_level = 3  # errors only: keep start-up logs readable
    # Left spinning after a run, workers steal the cores from the next model and from other
    # requests: spin during a run, stop at its end.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if spin:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(path, sess_options=so, providers=providers)


def create_session(path: str, opts: RuntimeOptions, providers: list[str], name: str = "") -> TimedSession:
    """The model file at `path`, ready to run; `name` (the manifest's) labels its inference metrics."""
    label = name or Path(path).stem
    threads = opts.intra_op_threads
    quiet = _session(path, providers, threads, opts.inter_op_threads, spin=False)
    used = quiet.get_providers()
    if providers[0] not in used:
        log.warning("%s: asked for %s, running on %s", path, providers[0], used)
    if used[0] != "CPUExecutionProvider" or threads == 1 or (threads == 0 and cpu_cores() == 1):
        return TimedSession(quiet, label)  # nothing to spin for
    spinning = _session(path, providers, threads, opts.inter_op_threads, spin=True)
    return TimedSession(CpuSessionPair(spinning, quiet), label)


class TimedSession:
    """An onnxruntime InferenceSession whose run() is timed into INFERENCE; everything else passes through."""

    def __init__(self, session, model: str):
        self._session, self._observe = session, INFERENCE.labels(model).observe

    def run(self, *args, **kwargs):
        ensure_call_alive()
        t0 = time.perf_counter()
        try:
            return self._session.run(*args, **kwargs)
        finally:
            self._observe(time.perf_counter() - t0)

    def __getattr__(self, name):
        return getattr(self._session, name)
