"""The streaming RPCs: StreamFrames (live camera frames) and the batch streams ProcessBatch and
RegisterBatch.

Every stream holds a worker thread for its whole life, so each one waits for
its messages with a timeout (RequestReader / the frame inbox), re-checks its
key and collection about once a second, and charges one pixel budget for the
whole call. Batch items fail one by one: each gets the status and reason its
single-item RPC would have answered with, and the call goes on.
"""

from __future__ import annotations

import queue
import threading
import time

import grpc

from facesvc.v1 import face_service_pb2 as pb
from server import errors
from server.context import ensure_call_alive
from server.domain.collections import CollectionService
from server.domain.streaming import WAITING, FrameInbox, Recheck, StreamSession, StreamSettings
from server.records import LIVENESS_REQUIRED
from server.rpc import convert, validate
from server.rpc.auth import HEADER, Authenticator, current_principal
from server.rpc.handlers.identity import IdentityHandlers
from server.rpc.handlers.stateless import item_error
from server.rpc.requests import RequestParser
from server.rpc.status import failure, stream_rpc
from server.rpc.status import outcome as status_outcome
from server.vision.pipeline import FacePipeline

MAX_FPS = 240.0
BATCH_GROUP = 8  # batch items checked together and embedded in one recognizer call
# Bytes of items a batch stream holds, read ahead and in the group at work: items may be as large as a
# message (32 MB), and 16 read ahead plus 8 at work held over a gigabyte for one stream. Each bound
# lets one item past it, so an item of any allowed size is taken, and the reader holds one more
# while it waits for room: about 3 messages' worth past the bounds at most.
BATCH_READ_AHEAD_BYTES = 16 * 1024 * 1024
BATCH_GROUP_BYTES = 16 * 1024 * 1024
RECHECK_S = 1.0  # how often an open stream re-checks its key (and its collection) with the database
# Failures of a frame that end the stream rather than that frame: the call or the collection is gone.
STREAM_ENDING = frozenset({errors.CALL_ENDED, errors.COLLECTION_NOT_FOUND})


class RequestReader:
    """Reads a request stream on its own thread into a bounded queue (the client is held back by gRPC
    flow control, never buffered without bound), so the handler waits with a timeout and runs its
    periodic checks instead of blocking in next() for as long as the client likes."""

    END = object()

    def __init__(self, iterator, maxsize: int, max_bytes: int = 0):
        self._q: queue.Queue = queue.Queue(maxsize=maxsize)
        self._stop = threading.Event()
        # bytes of the messages queued (max_bytes 0: not bounded); one message is let in whatever its size
        self._max_bytes, self._bytes = max_bytes, 0
        self._room = threading.Condition()
        threading.Thread(target=self._run, args=(iterator,), name="stream-reader", daemon=True).start()

    def _put(self, x) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(x, timeout=0.5)
                return True
            except queue.Full:
                pass
        return False

    def _reserve(self, size: int) -> bool:
        """Waits until `size` more bytes fit (or nothing is queued); False once stopped."""
        with self._room:
            while self._max_bytes and self._bytes and self._bytes + size > self._max_bytes:
                if self._stop.is_set():
                    return False
                self._room.wait(0.5)
            self._bytes += size
            return not self._stop.is_set()

    def _taken(self, queued):
        """The message (or END) from a queue entry, its bytes given back: the queue holds (message, size)."""
        if queued is self.END:
            return queued
        x, size = queued
        if size:
            with self._room:
                self._bytes -= size
                self._room.notify()
        return x

    def _run(self, iterator) -> None:
        try:
            for x in iterator:
                size = x.ByteSize() if self._max_bytes else 0
                # gRPC's flow control holds the client back while the reader waits here
                if (size and not self._reserve(size)) or not self._put((x, size)):
                    return
        except Exception:  # noqa: BLE001 - the call ended (cancelled): stop
            pass
        self._put(self.END)

    def queued_bytes(self) -> int:
        with self._room:
            return self._bytes

    def get(self, timeout: float, recheck) -> object:
        """The next message (or END); STREAM_IDLE when none comes within `timeout` seconds."""
        give_up = time.monotonic() + timeout
        while True:
            recheck()
            left = give_up - time.monotonic()
            if left <= 0:
                raise stream_idle(timeout)
            try:
                return self._taken(self._q.get(timeout=min(left, RECHECK_S)))
            except queue.Empty:
                pass

    def get_nowait(self):
        return self._taken(self._q.get_nowait())

    def stop(self) -> None:
        self._stop.set()


def stream_idle(seconds: float) -> errors.FaceServiceError:
    return errors.FaceServiceError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        errors.STREAM_IDLE,
        f"no message for {seconds:g} s: the stream was closed",
        idle_seconds=f"{seconds:g}",
    )


def _groups(reader: RequestReader, size: int, first_s: float, idle_s: float, recheck, max_bytes: int = 0):
    """Lists of the items that have arrived: at least one, at most `size`, and (`max_bytes` set) no
    more once the group holds that many bytes."""
    timeout = first_s
    try:
        while (first := reader.get(timeout, recheck)) is not RequestReader.END:
            timeout = idle_s
            group, held = [first], first.ByteSize()
            while len(group) < size and not (max_bytes and held >= max_bytes):
                try:
                    x = reader.get_nowait()
                except queue.Empty:
                    break
                if x is RequestReader.END:
                    yield group
                    return
                group.append(x)
                held += x.ByteSize()
            yield group
    finally:
        reader.stop()


class StreamHandlers:
    RPCS = ("StreamFrames", "ProcessBatch", "RegisterBatch")

    def __init__(
        self,
        pipeline: FacePipeline,
        identity: IdentityHandlers,
        collections: CollectionService,
        indexes,
        requests: RequestParser,
        authenticator: Authenticator | None,
        first_message_s: float,
        idle_s: float,
        max_faces_per_subject: int,
        audit=None,
    ):
        self.audit = audit  # server.rpc.audit.AuditRecorder: each batch item is recorded as its single-item RPC
        self.pipeline, self.identity, self.collections, self.indexes = pipeline, identity, collections, indexes
        self.requests, self.authenticator = requests, authenticator
        self.first_message_s, self.idle_s, self.max_faces_per_subject = first_message_s, idle_s, max_faces_per_subject

    def _recheck(self, context, collection: str = "") -> Recheck:
        """What an open stream must go on holding: its key (asked of the database, not the cache) and,
        for an identifying stream, the collection it opened on (deleted, or deleted and re-created: NOT_FOUND)."""
        checks = []
        principal = current_principal.get()
        if self.authenticator is not None and principal is not None and not principal.admin:
            secret = dict(context.invocation_metadata()).get(HEADER, "")
            checks.append(lambda: self.authenticator.still_valid(secret))
        if collection:
            created = self.collections.created_ms(collection)

            def same_collection():
                if self.collections.created_ms(collection) != created:
                    raise errors.not_found(
                        errors.COLLECTION_NOT_FOUND, "the collection was deleted; the stream is closed", collection=collection
                    )

            checks.append(same_collection)
        return Recheck(checks, RECHECK_S)

    def _principal(self, context):
        secret = dict(context.invocation_metadata()).get(HEADER, "")
        return self.authenticator.principal(secret)

    def _authorize(self, context, rpc_name: str, message) -> None:
        """Per-message authorization inside a stream (the interceptor checked the key at the start):
        a batch item as its single-item RPC would be."""
        if self.authenticator is not None:
            self.authenticator.authorize(self._principal(context), rpc_name, message)

    # -- batches ---------------------------------------------------------------
    def _batch(self, request_iterator, context, rpc_name: str, field: str, prepare, response_type):
        """One response per item, in order; an item's failure is its own answer. Items that arrive
        together (up to BATCH_GROUP) are checked one by one, then their faces embedded in one call.
        The call itself ends when its key is revoked, its client goes idle or its deadline passes."""
        recheck = self._recheck(context)
        reader = RequestReader(request_iterator, 2 * BATCH_GROUP, BATCH_READ_AHEAD_BYTES)
        context.add_callback(reader.stop)
        for group in _groups(reader, BATCH_GROUP, self.first_message_s, self.idle_s, recheck, BATCH_GROUP_BYTES):
            pending: list = []
            for item in group:
                recheck()
                ensure_call_alive()
                validate.item_id(item.item_id)  # a protocol error: it ends the call
                try:
                    request = getattr(item, field)
                    self._authorize(context, rpc_name, request)
                    pending.append(prepare(request, self.requests.limits.budget(item.ByteSize())))  # an item is a request
                except Exception as exc:  # noqa: BLE001 - one bad item never fails the batch
                    pending.append(exc)
            faces = [p.face for p in pending if not isinstance(p, Exception) and p.face is not None]
            try:
                embeddings = iter(self.pipeline.embed(faces) if faces else [])
            except Exception as exc:  # noqa: BLE001
                pending = [exc if not isinstance(p, Exception) and p.face is not None else p for p in pending]
                embeddings = iter([])
            for item, p in zip(group, pending):
                try:
                    if isinstance(p, Exception):
                        raise p
                    answer = response_type(
                        item_id=item.item_id, result=p.finish(next(embeddings) if p.face is not None else None)
                    )
                    outcome = "OK"
                except Exception as exc:  # noqa: BLE001
                    err = failure(f"{rpc_name}Batch", exc, item=True)
                    answer, outcome = response_type(item_id=item.item_id, error=item_error(err)), status_outcome(err)
                if self.audit is not None:
                    self.audit.record_item(rpc_name, getattr(item, field), outcome)
                yield answer

    @stream_rpc
    def ProcessBatch(self, request_iterator, context):
        yield from self._batch(
            request_iterator, context, "Process", "process", self.identity.prepare_process, pb.ProcessBatchResponse
        )

    @stream_rpc
    def RegisterBatch(self, request_iterator, context):
        yield from self._batch(
            request_iterator, context, "Register", "register", self.identity.prepare_register, pb.RegisterBatchResponse
        )

    # -- live frames -------------------------------------------------------------
    def _stream_settings(self, cfg: pb.StreamConfig) -> StreamSettings:
        r = self.requests
        if not 0 <= cfg.max_fps <= MAX_FPS:
            raise errors.validation("config.max_fps", f"must be in [0, {MAX_FPS:.0f}], got {cfg.max_fps}")
        liveness, collection, limits = cfg.liveness, "", self.identity.identity.settings
        search_default = liveness_floor = 0.0
        created = None
        if cfg.identify:
            collection = validate.collection_id(cfg.collection, "config.collection")
            c, t = limits(collection)
            if c.liveness_policy == LIVENESS_REQUIRED:
                liveness = True  # identification honours the collection's liveness policy, as Search does
            search_default, liveness_floor = t.search, t.liveness  # and its thresholds
            created = c.created_ms
        return StreamSettings(
            detect=r.options(cfg.face_options, "config.face_options", analyzed=cfg.liveness or cfg.identify),
            liveness=liveness,
            identify=cfg.identify,
            collection=collection,
            min_similarity=r.min_similarity(cfg.min_similarity, "config.min_similarity", default=search_default),
            liveness_threshold=r.liveness_threshold(cfg.liveness_threshold, "config.liveness_threshold", floor=liveness_floor),
            max_faces_per_subject=self.max_faces_per_subject,
            collection_created_ms=created,
        )

    @staticmethod
    def _read_frames(request_iterator, first: queue.Queue, go: threading.Event, inbox: FrameInbox) -> None:
        """The reader thread: the first message to the handler, then (once it accepted the config)
        frames into the inbox as they come (the handler thread processes)."""
        try:
            first.put(next(request_iterator, None))
            go.wait()
            if inbox.cancelled:
                return
            for req in request_iterator:
                if req.WhichOneof("message") != "frame":
                    inbox.fail(
                        errors.FaceServiceError(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            errors.STREAM_PROTOCOL,
                            "only the first message may be a StreamConfig; then send frames",
                        )
                    )
                    return
                inbox.put(req.frame)
            inbox.close()
        except Exception:  # noqa: BLE001 - the call was cancelled or broke: stop processing at once
            first.put(None)
            inbox.cancel()

    @stream_rpc
    def StreamFrames(self, request_iterator, context):
        inbox, first_q, go = FrameInbox(), queue.Queue(maxsize=2), threading.Event()
        context.add_callback(inbox.cancel)  # a cancelled or finished call frees the stream at once
        threading.Thread(
            target=self._read_frames, args=(request_iterator, first_q, go, inbox), name="stream-reader", daemon=True
        ).start()
        try:
            yield from self._stream_frames(context, inbox, first_q, go)
        finally:
            inbox.cancel()
            go.set()

    def _stream_frames(self, context, inbox: FrameInbox, first_q: queue.Queue, go: threading.Event):
        recheck = self._recheck(context)
        try:
            first = first_q.get(timeout=self.first_message_s)
        except queue.Empty:
            raise stream_idle(self.first_message_s) from None
        if first is None:
            return
        if first.WhichOneof("message") != "config":
            raise errors.FaceServiceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                errors.STREAM_PROTOCOL,
                "the first message of StreamFrames must be a StreamConfig",
            )
        if first.config.identify and self.authenticator is not None:  # detection/liveness alone are stateless
            self.authenticator.authorize_collection(self._principal(context), first.config.collection)
        cfg = self._stream_settings(first.config)
        if cfg.identify:
            recheck = self._recheck(context, cfg.collection)
        inbox.pace(first.config.max_fps)
        go.set()
        session = StreamSession(self.pipeline, self.indexes if cfg.identify else None, cfg)
        audited: dict[int, str] = {}  # track id -> the subject last recorded in the audit log for it
        if cfg.identify and self.audit is not None:
            self.audit.record_identified("StreamFrames", cfg.collection)
        idle_s = self.idle_s
        budget = self.requests.limits.stream_budget()
        while (item := inbox.take(timeout=RECHECK_S)) is not None:
            recheck()
            if item is WAITING:
                if inbox.idle_for() > idle_s:
                    raise stream_idle(idle_s)
                continue
            frame, received, skipped = item
            resp = pb.StreamFramesResponse(frame_id=frame.frame_id, skipped_frame_ids=skipped)
            if frame.HasField("capture_time"):
                resp.capture_time.CopyFrom(frame.capture_time)
            try:
                budget.received(frame.ByteSize())
                img = self.requests.image(frame.image, "frame.image", budget)
                results = session.process(img)
                resp.image.CopyFrom(convert.image_info(img, [r.face for r in results]))
                if len(audited) > 2 * len(session.tracker.tracks) + 16:  # tracks that ended: a long stream holds no more
                    live = {t.track_id for t in session.tracker.tracks}
                    audited = {t: who for t, who in audited.items() if t in live}
                for r in results:
                    who = r.track.identity
                    if who and self.audit is not None and audited.get(r.track.track_id) != who.subject_id:
                        audited[r.track.track_id] = who.subject_id
                        self.audit.record_identified("StreamFrames", cfg.collection, who.subject_id, who.face_id)
                    resp.faces.append(
                        pb.TrackedFace(
                            track_id=r.track.track_id,
                            face=convert.face_to_proto(r.face),
                            frames_tracked=r.track.frames,
                            evaluated=r.evaluated,
                            liveness_frames=len(r.track.liveness_scores),
                            liveness=convert.liveness_to_proto(r.track.liveness) if r.track.liveness else None,
                            identity=pb.TrackIdentity(
                                subject_id=r.track.identity.subject_id,
                                face_id=r.track.identity.face_id,
                                similarity=r.track.identity.similarity,
                            )
                            if r.track.identity
                            else None,
                        )
                    )
            except errors.FaceServiceError as exc:  # one bad frame does not end the stream
                if exc.reason in STREAM_ENDING:
                    raise
                resp.error.CopyFrom(item_error(failure("StreamFrames", exc, item=True)))
            resp.latency_ms = (time.monotonic() - received) * 1000
            yield resp
