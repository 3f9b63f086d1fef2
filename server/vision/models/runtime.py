"""The runtime a model runs on, behind one small session interface, chosen once at start-up.

Every model class (scrfd.py, recognizer.py, ...) sees the same few calls of onnxruntime's
InferenceSession: `get_inputs()` / `get_outputs()` (ports with a `.name`) and
`run(output_names | None, {input name: array}) -> [arrays]`, so a model is written once. A model
that takes an image declares how its pixels become its input (PixelInput) and is fed the 8-bit
pixels; each runtime makes the input its own way.
  - OpenVINO on CPU (the default where it is installed, which the default install does):
    its CPU plugin runs these small convolutional models about twice as fast as onnxruntime
    (docs/benchmarks.md). Each thread has its own infer request (a request is not thread-safe;
    a compiled model is). Networks that take any input size (SCRFD) get a model compiled for
    each frame shape they meet, up to a bound, as a shape-specialised graph runs faster than a
    dynamic one; further shapes run on the dynamic graph, so no caller can make the server
    compile without end.
  - onnxruntime on CPU, the fallback (FACESVC_RUNTIME=onnxruntime, or no OpenVINO);
  - onnxruntime-gpu with CUDA on GPUs.

onnxruntime's `InferenceSession.run` is thread-safe, so each model holds its sessions once and
every gRPC worker thread calls them concurrently. On CPU each model has two sessions with one intra-op
thread per core (one session where a run has a single thread: one core, or FACESVC_ORT_THREADS=1), and each run
picks one (docs/benchmarks.md has the figures, from scripts/bench_compare.py):
  - alone (no other model run, no other gRPC call in flight): the spinning session,
    whose workers spin between the many small ops of one run instead of sleeping and
    being woken, and stop spinning at the end of the run;
  - otherwise the quiet session (no spinning): spinning workers of concurrent runs
    burn the cores the other requests need.
On CUDA there is one session: the GPU queues its own work. There the models keep to a few input
shapes (TimedSession.fixed_shapes), as each new one costs a kernel search.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from server.context import IN_FLIGHT, ensure_call_alive
from server.cpus import cpu_cores, quota_threads
from server.telemetry import INFERENCE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeOptions:
    device: str = "auto"  # auto | cpu | cuda
    intra_op_threads: int = 0  # 0 = the runtime's default (one per core)
    inter_op_threads: int = 1
    runtime: str = "auto"  # auto | openvino | onnxruntime
    precision: str = "auto"  # auto | f32 | bf16 | int8 (OpenVINO; bf16 only where the CPU has it natively)
    hint: str = "auto"  # OpenVINO performance hint: auto (every core alone, a thread per run with company) | latency | throughput


@dataclass(frozen=True)
class PixelInput:
    """A model that takes an image. Its session is fed the 8-bit BGR pixels themselves (N x H x W x 3
    uint8) and makes the network's float N x 3 x H x W input from them: (x - mean) * scale, channels in
    RGB order when `rgb`. On OpenVINO that conversion is the first step of the compiled graph (its
    preprocessing API): it runs on the plugin's threads, on the fly, instead of as a float copy of
    the frame made before every run (docs/benchmarks.md, "Pixels into the graph and unpinned
    streams"); elsewhere the session makes that copy with OpenCV."""

    mean: float = 0.0
    scale: float = 1.0
    rgb: bool = False

    def blob(self, pixels: np.ndarray) -> np.ndarray:
        """The network's input for `pixels`, as OpenVINO's graph computes it."""
        h, w = pixels.shape[1:3]
        return cv2.dnn.blobFromImages(list(pixels), self.scale, (w, h), (self.mean,) * 3, swapRB=self.rgb)

    def into(self, model):
        """`model` (an OpenVINO model, changed in place) taking the pixels instead of the float tensor."""
        import openvino as ov
        from openvino.preprocess import ColorFormat, PrePostProcessor

        ppp = PrePostProcessor(model)
        ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC")).set_color_format(ColorFormat.BGR)
        ppp.input().model().set_layout(ov.Layout("NCHW"))
        steps = ppp.input().preprocess().convert_element_type(ov.Type.f32)
        if self.rgb:
            steps.convert_color(ColorFormat.RGB)
        if self.mean:
            steps.mean(self.mean)
        if self.scale != 1.0:
            steps.scale(1.0 / self.scale)
        return ppp.build()


class PixelFeed:
    """An onnxruntime session of a PixelInput model: makes the network's input from the pixels it is fed."""

    def __init__(self, session, pixels: PixelInput):
        self._session, self._pixels = session, pixels

    def run(self, output_names, feed: dict) -> list:
        return self._session.run(output_names, {name: self._pixels.blob(x) for name, x in feed.items()})

    def __getattr__(self, name):
        return getattr(self._session, name)


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def choose_runtime(opts: RuntimeOptions, providers: list[str]) -> str:
    """openvino or onnxruntime. CUDA stays with onnxruntime-gpu; on CPU OpenVINO when installed."""
    if opts.runtime not in ("auto", "openvino", "onnxruntime"):
        raise ValueError(f"runtime must be auto, openvino or onnxruntime, not {opts.runtime!r}")
    if opts.runtime == "openvino":
        if not openvino_available():
            raise RuntimeError("runtime=openvino but the openvino package is not installed (pip install openvino)")
        return "openvino"
    if opts.runtime == "onnxruntime" or providers[0] != "CPUExecutionProvider":
        return "onnxruntime"
    return "openvino" if openvino_available() else "onnxruntime"


def load_cuda_libraries() -> None:
    """The gpu extra installs onnxruntime-gpu with the CUDA runtime and cuDNN it was built for as
    nvidia-* wheels, where the dynamic loader does not look: load those (or, where there are none,
    the system's) before the first CUDA session, so a host needs only the NVIDIA driver."""
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime-gpu 1.21 and later
    if preload is not None:
        preload()


def choose_providers(device: str) -> list[str]:
    """CUDA when asked for (or `auto`) and available, else CPU."""
    available = ort.get_available_providers()
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        load_cuda_libraries()
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
    so.intra_op_num_threads = threads or quota_threads()
    so.inter_op_num_threads = inter
    so.log_severity_level = 3  # errors only: keep start-up logs readable
    # Left spinning after a run, workers steal the cores from the next model and from other
    # requests: spin during a run, stop at its end.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if spin:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(path, sess_options=so, providers=providers)


def create_session(
    path: str,
    opts: RuntimeOptions,
    providers: list[str],
    name: str = "",
    quantized: bool = False,
    pixels: PixelInput | None = None,
) -> TimedSession:
    """The model file at `path`, ready to run; `name` (the manifest's) labels its inference metrics.
    `quantized`: the file is an int8 IR (models/quantize.py), which only OpenVINO runs. `pixels`: the
    model takes an image, and the session is fed its 8-bit pixels (PixelInput)."""
    label = name or Path(path).stem
    runtime = choose_runtime(opts, providers)
    if quantized and runtime != "openvino":
        raise ValueError(f"precision=int8 runs on OpenVINO on the CPU, not on {runtime} ({'/'.join(providers)})")
    if runtime == "openvino":
        ov = OpenVinoSession(path, opts, pixels=pixels)
        return TimedSession(ov, label, "openvino", "int8" if quantized else ov.precision, "CPU", pixels)
    threads = opts.intra_op_threads
    quiet = _session(path, providers, threads, opts.inter_op_threads, spin=False)
    used = quiet.get_providers()
    if providers[0] not in used:
        log.warning("%s: asked for %s, running on %s", path, providers[0], used)
    device = "CUDA" if used[0] == "CUDAExecutionProvider" else "CPU"
    session = quiet
    if used[0] == "CPUExecutionProvider" and threads != 1 and not (threads == 0 and cpu_cores() == 1):
        session = CpuSessionPair(_session(path, providers, threads, opts.inter_op_threads, spin=True), quiet)
    if pixels is not None:
        session = PixelFeed(session, pixels)
    return TimedSession(session, label, "onnxruntime", "f32", device, pixels)


@dataclass(frozen=True)
class Port:
    """An input or output of a model, as onnxruntime's NodeArg shows it."""

    name: str
    shape: list


_CORE = None
_CORE_LOCK = threading.Lock()


def ov_core():
    """One OpenVINO Core per process: it owns the CPU plugin and its thread pool."""
    global _CORE
    with _CORE_LOCK:
        if _CORE is None:
            import openvino as ov

            _CORE = ov.Core()
        return _CORE


def native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AVX512-BF16, AMX); elsewhere bf16 is emulated and slower."""
    return "BF16" in ov_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def resolve_precision(asked: str) -> str:
    """The precision OpenVINO computes a float model's layers in. With int8 the quantized models'
    convolutions run on int8 and everything else as with auto."""
    if asked not in ("auto", "f32", "bf16", "int8"):
        raise ValueError(f"precision must be auto, f32, bf16 or int8, not {asked!r}")
    if asked == "f32":
        return "f32"
    if native_bf16():
        return "bf16"
    if asked == "bf16":
        log.warning("precision=bf16 asked for, but this CPU has no native bf16: running f32")
    return "f32"


class _Compiler:
    """One background thread compiles every shape-specialised graph of the process, one at a time:
    concurrent compile_model calls are where the CPU plugin has had its races, and a compilation
    takes the cores the requests need, so two at once would only slow both."""

    def __init__(self):
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = 0  # first come, first served within a priority
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0

    def submit(self, fn, *args, urgent: bool = False) -> None:
        """Queues fn(*args); `urgent` jobs (a graph a call waits for) go before the others."""
        with self._lock:
            self._pending += 1
            self._seq += 1
            seq = self._seq
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ov-compile", daemon=True)
                self._thread.start()
        self._jobs.put((0 if urgent else 1, seq, fn, args))

    def _run(self) -> None:
        while True:
            _, _, fn, args = self._jobs.get()
            try:
                fn(*args)
            except BaseException:  # the thread must outlive any job: later shapes wait on it
                log.exception("a background compilation failed")
            finally:
                with self._lock:
                    self._pending -= 1
                    self._idle.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Until every submitted compilation has finished; False on timeout. For a script about to
        exit: a process that exits while the CPU plugin compiles aborts ("terminate called")."""
        with self._lock:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)


COMPILER = _Compiler()


class _Graphs:
    """The graphs of one input shape (None: the dynamic-shape graph), one per performance hint; the
    hints' graphs give the same answers. `first` is set once one is ready, or compiling it failed."""

    def __init__(self, shape: tuple | None):
        self.shape = shape
        self.compiled: dict[str, object] = {}
        self.asked: set[str] = set()  # hints whose graph is compiled or queued
        self.first = threading.Event()
        self.failed = False  # the first graph failed to compile: the shape stays on the dynamic graph

    def get(self, mode: str):
        # a snapshot: the compiling thread may add a graph meanwhile
        return self.compiled.get(mode) or next(iter(list(self.compiled.values())), None)


class OpenVinoSession:
    """A model compiled by OpenVINO for the CPU, called like an onnxruntime InferenceSession."""

    MAX_SHAPES = 8  # shape-specialised compilations per model; further shapes run on the dynamic graph
    # Inputs larger than a 640 x 640 frame (the small-face pass's 1280 px copy of a large frame) run
    # on the dynamic graph: a graph's buffers grow with its input (at 1280 px, several times a 640 px
    # graph's, for each hint), and a shaped graph gains its shape a few per cent.
    MAX_SHAPE_ELEMENTS = 640 * 640 * 3
    SHAPE_WAIT_S = 30.0  # longest a call waits for its shape's graph (bf16, int8)

    def __init__(self, path: str, opts: RuntimeOptions, runs: RunCounter = RUNS, pixels: PixelInput | None = None):
        import openvino as ov

        core = ov_core()
        self._ov = ov
        self.precision = resolve_precision(opts.precision)
        if opts.hint not in ("auto", "latency", "throughput"):
            raise ValueError(f"hint must be auto, latency or throughput, not {opts.hint!r}")
        # auto: a graph for a lone run and two for runs with company, and each run takes the one that
        # suits the moment (see _mode()); on one core they would all be the one-thread graph
        self._cores = cpu_cores()
        if opts.hint == "auto":
            self.modes = ("latency", "single", "throughput") if self._cores > 1 else ("latency",)
        else:
            self.modes = (opts.hint,)
        self._configs = {mode: self._config(mode, opts) for mode in self.modes}
        self._runs = runs
        self._model = core.read_model(path)
        if pixels is not None:
            self._model = pixels.into(self._model)
        self._inputs = [Port(p.get_any_name(), _dims(p.get_partial_shape())) for p in self._model.inputs]
        self._outputs = [Port(p.get_any_name(), _dims(p.get_partial_shape())) for p in self._model.outputs]
        self._index = {n: i for i, p in enumerate(self._model.outputs) for n in p.get_names()}
        # the first graph now; the others on their first need (memory: a stream's buffers each)
        self._dynamic = _Graphs(None)
        self._dynamic.compiled[self.modes[0]] = core.compile_model(self._model, "CPU", self._configs[self.modes[0]])
        self._dynamic.asked.add(self.modes[0])
        self._dynamic.first.set()
        # only spatial dimensions are worth specialising (in either layout): a batch dimension varies call by call
        self._per_shape = any(isinstance(d, str) for p in self._inputs for d in p.shape[1:])
        self._shaped: dict[tuple, _Graphs] = {}
        # In f32 the dynamic graph gives the shaped graph's answers (to about 1e-5) and may stand in
        # for it while it compiles. In bf16 or int8 the two graphs' kernels round differently (a box
        # moves by up to 2 px), so a photo would get one answer on its shape's first calls and
        # another after: there the first call of a shape waits for its graph (once, about 0.2 s).
        self._wait_for_shape = self.precision != "f32" or opts.precision == "int8"
        self._lock = threading.Lock()
        self._running: dict[int, threading.Lock] = {}  # one-thread graphs (by id) -> held while a run is on it
        self._local = threading.local()
        self._warm_up()

    def _config(self, mode: str, opts: RuntimeOptions) -> dict:
        """The plugin's settings for a graph: `latency`, one stream over every core; `throughput`, the
        plugin's hint for many concurrent runs (a stream per core; a run waits for a free stream);
        `single`, one thread for each run and no waiting (the latency hint on one thread)."""
        config: dict = {"INFERENCE_PRECISION_HINT": self.precision}
        if mode == "single":
            config |= {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 1}
        else:
            config["PERFORMANCE_HINT"] = mode.upper()
        if mode != "latency":
            # The plugin pins each stream's thread to a core. Between runs the same cores carry the
            # calls' Python and OpenCV work (and the other models' runs), which pinned threads cannot
            # make room for: the scheduler then leaves a core idle while two threads share the other
            # (docs/benchmarks.md, "Pixels into the graph and unpinned streams").
            config["ENABLE_CPU_PINNING"] = False
        threads = opts.intra_op_threads or quota_threads()
        if threads and mode != "single":
            config["INFERENCE_NUM_THREADS"] = threads
        return config

    def _warm_up(self) -> None:
        """One inference on zeros, on the loading thread, before any call can come. OpenVINO's Python
        binding builds function-local statics (its element-type to numpy-dtype tables) the first time
        a tensor's data is touched; two threads doing that first at once deadlock the process (one
        holds the static's guard and waits for the GIL, the other holds the GIL and waits for the
        guard): a fresh server hit by concurrent calls stopped answering for good."""
        feed = {
            p.name: np.zeros(
                [1 if i == 0 else 64 if d == "?" else d for i, d in enumerate(p.shape)], port.get_element_type().to_dtype()
            )
            for p, port in zip(self._inputs, self._model.inputs)
        }
        request = self._dynamic.get(self.modes[0]).create_infer_request()
        for shared in (False, True):  # a copied input and one read in place (run()) build different statics
            request.infer(feed, share_inputs=shared)
            for i in range(len(self._outputs)):
                request.get_output_tensor(i).data.copy()

    def get_inputs(self) -> list[Port]:
        return self._inputs

    def get_outputs(self) -> list[Port]:
        return self._outputs

    def _compiled(self, feed: dict, mode: str):
        """The graph compiled for this input shape (up to MAX_SHAPES shapes of at most MAX_SHAPE_ELEMENTS,
        compiled in the background on a shape's first call); the dynamic graph for other shapes, and in f32 while the shape's
        graph compiles. So no caller can make the server compile (and hold memory) without end, and
        each shape gets the same graph's answers for the life of the process."""
        if not self._per_shape:
            return self._graph(self._dynamic, mode)
        shape = tuple((name, tuple(a.shape)) for name, a in feed.items())
        if any(a.size > self.MAX_SHAPE_ELEMENTS for a in feed.values()):
            return self._graph(self._dynamic, mode)
        graphs = self._shaped.get(shape)
        if graphs is None:
            with self._lock:
                graphs = self._shaped.get(shape)
                if graphs is None and len(self._shaped) < self.MAX_SHAPES:
                    graphs = self._shaped[shape] = _Graphs(shape)
            if graphs is None:
                return self._graph(self._dynamic, mode)
        compiled = self._graph(graphs, mode)
        if compiled is None and self._wait_for_shape:
            compiled = self._wait(graphs, mode)
        return compiled or self._graph(self._dynamic, mode)

    def _wait(self, graphs: _Graphs, mode: str):
        """The shape's first graph, once compiled; stops when the call ends (deadline, cancel). After
        SHAPE_WAIT_S (a compiler stuck far beyond the usual 0.2 s) the dynamic graph answers."""
        deadline = time.monotonic() + self.SHAPE_WAIT_S
        while not graphs.first.wait(0.05):
            ensure_call_alive()
            if time.monotonic() > deadline:
                log.warning(
                    "%s: no graph for input %s after %.0f s", self._model.get_friendly_name(), graphs.shape, self.SHAPE_WAIT_S
                )
                return None
        # a shape whose first graph failed stays on the dynamic graph, though another hint's may compile
        return None if graphs.failed else graphs.get(mode)

    def _graph(self, graphs: _Graphs, mode: str):
        """`graphs`' graph for this hint; while it compiles (queued here on first need), another hint's
        graph of the same shape, which gives the same answers, or None."""
        if graphs.failed:
            return None
        if mode not in graphs.asked:
            with self._lock:
                if mode not in graphs.asked:
                    graphs.asked.add(mode)
                    # a shape's first graph, which calls may wait for, goes before other shapes' second
                    COMPILER.submit(self._specialise, graphs, mode, urgent=not graphs.compiled)
        return graphs.get(mode)

    def specialised(self, shape: tuple, mode: str | None = None) -> bool:
        """Whether the graph for this input shape ((name, dims), ...) and hint (default: the first) is compiled."""
        graphs = self._shaped.get(shape)
        return graphs is not None and (mode or self.modes[0]) in graphs.compiled

    def _specialise(self, graphs: _Graphs, mode: str) -> None:
        try:
            model = self._model
            if graphs.shape is not None:
                model = model.clone()
                model.reshape({name: self._ov.PartialShape(list(dims)) for name, dims in graphs.shape})
            graphs.compiled[mode] = ov_core().compile_model(model, "CPU", self._configs[mode])
        except Exception:  # another hint's graph of this shape, or else the dynamic one, serves it
            log.exception("compiling %s (%s, input %s) failed", self._model.get_friendly_name(), mode, graphs.shape)
            graphs.failed = not graphs.compiled  # calls ran on the dynamic graph meanwhile: keep them there
        finally:
            graphs.first.set()

    def _request(self, compiled):
        # keyed by id(): graphs are never dropped, so no later graph can take a kept request's id
        requests = getattr(self._local, "requests", None)
        if requests is None:
            requests = self._local.requests = {}
        req = requests.get(id(compiled))
        if req is None:
            req = requests[id(compiled)] = compiled.create_infer_request()
        return req

    def _busy(self, compiled) -> threading.Lock:
        """Held while a run is on `compiled` (a one-thread graph)."""
        lock = self._running.get(id(compiled))
        if lock is None:
            with self._lock:
                lock = self._running.setdefault(id(compiled), threading.Lock())
        return lock

    def _mode(self, alone: bool) -> str:
        """The graph for a run, with the auto hint (any other hint has one graph):
          - a run that has the CPU to itself (no other model run, no other call in flight): the
            latency graph, one stream over every core, the lowest latency for a lone call;
          - with company, while no more runs are in flight than there are cores: the one-thread
            graph, so each takes a core of its own and the calls' Python and OpenCV work between
            runs fits around them. On the throughput graph's streams two pipelines alternating
            between two models left part of the two cores idle (docs/benchmarks.md, "One thread per
            run with company"). The graph has one stream: a run that finds it busy (another run of
            the same model and shape) takes the throughput graph (see run());
          - beyond that, the throughput graph: runs queue for a stream per core instead of sharing
            the cores by time slices.
        The graphs give the same answers; each is compiled on its first need, another answering
        meanwhile."""
        if len(self.modes) == 1:
            return self.modes[0]
        if alone:
            return "latency"
        return "single" if self._runs.active <= self._cores else "throughput"

    def run(self, output_names, feed: dict) -> list:
        """The run, on the graph _mode() picks for the moment."""
        alone = self._runs.enter()
        try:
            mode = self._mode(alone)
            compiled, busy = self._compiled(feed, mode), None
            if mode == "single":
                # the one-thread graph has one stream: a second run of it would queue behind the first
                # while a core idles, so it takes the throughput graph's other stream instead
                busy = self._busy(compiled)
                if not busy.acquire(blocking=False):
                    compiled, busy = self._compiled(feed, "throughput"), None
            try:
                req = self._request(compiled)
                # the request reads the caller's arrays in place (no copy): run() holds them until it returns
                req.infer(feed, share_inputs=True)
            finally:
                if busy is not None:
                    busy.release()
        finally:
            self._runs.leave()
        wanted = range(len(self._outputs)) if output_names is None else [self._index[n] for n in output_names]
        # the request reuses its output buffers on its next run: hand the caller its own copies
        return [req.get_output_tensor(i).data.copy() for i in wanted]


def _dims(shape) -> list:
    return [d.get_length() if d.is_static else "?" for d in shape]


def keeps_few_shapes(session) -> bool:
    """Whether `session` keeps to a few input shapes (TimedSession.fixed_shapes; False for a bare
    runtime session)."""
    return getattr(session, "fixed_shapes", False)


def padded_rows(session, rows: np.ndarray, cap: int = 0) -> np.ndarray:
    """`rows` (first axis = faces) as the session should run them: where it keeps to a few input
    shapes (TimedSession.fixed_shapes), zero rows up to a power of two (at most `cap`, when given);
    elsewhere as they are. The caller keeps the first len(rows) rows of what the model returns."""
    n = len(rows)
    if not keeps_few_shapes(session) or n == 0:
        return rows
    size = 1 << (n - 1).bit_length()
    size = max(n, min(size, cap)) if cap else size
    return np.concatenate([rows, np.zeros((size - n, *rows.shape[1:]), rows.dtype)]) if size > n else rows


def row_counts(session, cap: int) -> list[int]:
    """The row counts padded_rows() gives up to `cap` rows: the batch shapes a warm-up runs."""
    if not keeps_few_shapes(session):
        return [1]
    sizes = [1 << i for i in range(cap.bit_length()) if 1 << i <= cap]
    return sizes + ([cap] if cap not in sizes else [])


class TimedSession:
    """A model's session whose run() is timed into INFERENCE; everything else passes through.
    `runtime`, `precision` and `device` say where the model runs (start-up log, metrics, GetIndexStats)."""

    def __init__(
        self,
        session,
        model: str,
        runtime: str = "onnxruntime",
        precision: str = "f32",
        device: str = "CPU",
        pixels: PixelInput | None = None,
    ):
        self._session, self._observe = session, INFERENCE.labels(model).observe
        self.runtime, self.precision, self.device = runtime, precision, device
        self.pixels = pixels  # fed 8-bit pixels (PixelInput), or None: fed the network's own input
        # On CUDA the first run of each input shape is slow (cuDNN chooses and builds kernels for the
        # shape: seconds, against milliseconds for a shape seen before; scripts/bench_cuda.py).
        # Shapes would vary without end (every frame size, every padded or turned detector pass,
        # every micro-batch), so there the models keep to a few: the detector takes square
        # canvases and batches are padded to powers of two. On the CPU each shape runs as it comes.
        self.fixed_shapes = device == "CUDA"

    def run(self, *args, **kwargs):
        ensure_call_alive()
        t0 = time.perf_counter()
        try:
            return self._session.run(*args, **kwargs)
        finally:
            self._observe(time.perf_counter() - t0)

    def __getattr__(self, name):
        return getattr(self._session, name)
