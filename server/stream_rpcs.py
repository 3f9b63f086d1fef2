"""FaceService's streaming and batch RPCs (a FaceServicer mixin): StreamFrames, DetectBatch,
ProcessBatch, RegisterBatch.

Batch items fail one by one: each gets the status and reason its single-item
RPC would have answered with, and the call goes on.
"""
from __future__ import annotations

import queue
import threading
import time

import grpc

from facesvc.v1 import face_service_pb2 as pb
from server import convert, errors, validate
from server.auth import HEADER, hash_key
from server.records import LIVENESS_REQUIRED
from server.rpc_errors import failure, rpc, stream_rpc
from server.streaming import FrameInbox, StreamLimiter, StreamSession, StreamSettings


MAX_DETECT_BATCH = 64
MAX_FPS = 240.0
BATCH_GROUP = 8  # batch items checked together and embedded in one recognizer call


def _groups(iterator, size: int):
    """Lists of the items that have arrived (at least one, at most `size`), read ahead by a thread
    into a bounded queue: the client is held back by gRPC flow control, never buffered without bound."""
    q: queue.Queue = queue.Queue(maxsize=2 * size)
    end, stop = object(), threading.Event()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.5)
                return True
            except queue.Full:
                pass
        return False

    def reader():
        try:
            for x in iterator:
                if not put(x):
                    return
        except Exception:  # noqa: BLE001 - the call ended (cancelled): stop
            pass
        put(end)

    threading.Thread(target=reader, name="batch-reader", daemon=True).start()
    try:
        while (first := q.get()) is not end:
            group = [first]
            while len(group) < size:
                try:
                    x = q.get_nowait()
                except queue.Empty:
                    break
                if x is end:
                    yield group
                    return
                group.append(x)
            yield group
    finally:
        stop.set()


def item_error(exc: errors.FaceServiceError) -> pb.ItemError:
    return pb.ItemError(code=exc.code.value[0], reason=exc.reason, message=exc.message, metadata=exc.metadata)


class StreamRpcs:
    authenticator = None  # auth.Authenticator when auth is on (app.py); items inside streams are checked with it
    streams: StreamLimiter

    def _authorize(self, context, rpc_name: str, message) -> None:
        """Per-message authorization inside a stream (the interceptor checked the key at the start)."""
        if self.authenticator is None:
            return
        secret = dict(context.invocation_metadata()).get(HEADER, "")
        self.authenticator.authorize(self.authenticator.principal(secret), rpc_name, message)

    def _batch(self, request_iterator, context, rpc_name: str, field: str, prepare, response_type):
        """One response per item, in order; an item's failure is its own answer. Items that arrive
        together (up to BATCH_GROUP) are checked one by one, then their faces embedded in one call."""
        for group in _groups(request_iterator, BATCH_GROUP):
            pending: list = []
            for item in group:
                try:
                    request = getattr(item, field)
                    self._authorize(context, rpc_name, request)
                    pending.append(prepare(request))
                except Exception as exc:  # noqa: BLE001 - one bad item never fails the batch
                    pending.append(exc)
            faces = [p.face for p in pending if not isinstance(p, Exception) and p.face is not None]
            try:
                embeddings = iter(self._ready().embed(faces) if faces else [])
            except Exception as exc:  # noqa: BLE001
                pending = [exc if not isinstance(p, Exception) and p.face is not None else p for p in pending]
                embeddings = iter([])
            for item, p in zip(group, pending):
                try:
                    if isinstance(p, Exception):
                        raise p
                    yield response_type(item_id=item.item_id, result=p.finish(next(embeddings) if p.face is not None else None))
                except Exception as exc:  # noqa: BLE001
                    yield response_type(item_id=item.item_id, error=item_error(failure(f"{rpc_name}Batch", exc)))

    # -- batches ---------------------------------------------------------------
    @rpc
    def DetectBatch(self, request: pb.DetectBatchRequest, context) -> pb.DetectBatchResponse:
        p = self._ready()
        if not 1 <= len(request.items) <= MAX_DETECT_BATCH:
            raise errors.validation("items", f"1 to {MAX_DETECT_BATCH} photos, got {len(request.items)}")
        opts = self._options(request.face_options)
        results = []
        for n, item in enumerate(request.items):
            try:
                img = self._image(item.image, f"items[{n}].image")
                h, w = img.shape[:2]
                results.append(pb.DetectBatchResult(item_id=item.item_id, faces=[convert.face_to_proto(f) for f in p.detect(img, opts)],
                                                     image=pb.ImageInfo(width=w, height=h)))
            except Exception as exc:  # noqa: BLE001
                results.append(pb.DetectBatchResult(item_id=item.item_id, error=item_error(failure("DetectBatch", exc))))
        return pb.DetectBatchResponse(results=results, detector=p.detector.name)

    @stream_rpc
    def ProcessBatch(self, request_iterator, context):
        self._identity()
        yield from self._batch(request_iterator, context, "Process", "process", self._process_pending, pb.ProcessBatchResponse)

    @stream_rpc
    def RegisterBatch(self, request_iterator, context):
        self._identity()
        yield from self._batch(request_iterator, context, "Register", "register", self._register_pending,
                               pb.RegisterBatchResponse)

    # -- live frames -------------------------------------------------------------
    def _stream_settings(self, cfg: pb.StreamConfig) -> StreamSettings:
        if not 0 <= cfg.max_fps <= MAX_FPS:
            raise errors.validation("config.max_fps", f"must be in [0, {MAX_FPS:.0f}], got {cfg.max_fps}")
        liveness, collection = cfg.liveness, ""
        if cfg.identify:
            collection = validate.collection_id(cfg.collection, "config.collection")
            if self._identity().store.get_collection_policy(collection) == LIVENESS_REQUIRED:
                liveness = True  # identification honours the collection's liveness policy, as Search does
        return StreamSettings(
            detect=self._options(cfg.face_options), liveness=liveness, identify=cfg.identify, collection=collection,
            min_similarity=self._min_similarity(cfg.min_similarity),
            liveness_threshold=convert.optional_threshold(cfg.liveness_threshold, "config.liveness_threshold", 0.0, 1.0),
            max_faces_per_subject=self.settings.max_faces_per_subject,
        )

    @staticmethod
    def _stream_owner(context) -> str:
        secret = dict(context.invocation_metadata()).get(HEADER, "")
        return "key:" + hash_key(secret) if secret else "peer:" + context.peer().rsplit(":", 1)[0]

    @staticmethod
    def _read_frames(request_iterator, inbox: FrameInbox) -> None:
        """The reader thread: frames into the inbox as they come (the handler thread processes)."""
        try:
            for req in request_iterator:
                if req.WhichOneof("message") != "frame":
                    inbox.fail(errors.FaceServiceError(grpc.StatusCode.INVALID_ARGUMENT, errors.STREAM_PROTOCOL,
                                                       "only the first message may be a StreamConfig; then send frames"))
                    return
                inbox.put(req.frame)
            inbox.close()
        except Exception:  # noqa: BLE001 - the call was cancelled or broke: stop processing at once
            inbox.cancel()

    @stream_rpc
    def StreamFrames(self, request_iterator, context):
        p = self._ready()
        first = next(request_iterator, None)
        if first is None:
            return
        if first.WhichOneof("message") != "config":
            raise errors.FaceServiceError(grpc.StatusCode.INVALID_ARGUMENT, errors.STREAM_PROTOCOL,
                                          "the first message of StreamFrames must be a StreamConfig")
        if first.config.identify:  # detection/liveness alone are stateless: any valid key may stream them
            self._authorize(context, "StreamFrames", first.config)
        cfg = self._stream_settings(first.config)
        with self.streams.slot(self._stream_owner(context)):
            inbox = FrameInbox(first.config.max_fps)
            context.add_callback(inbox.cancel)  # a cancelled or finished call frees the stream at once
            threading.Thread(target=self._read_frames, args=(request_iterator, inbox), name="stream-reader",
                             daemon=True).start()
            session = StreamSession(p, self.searcher.indexes if cfg.identify else None, cfg)
            while (item := inbox.take()) is not None:
                frame, received, skipped = item
                resp = pb.StreamFramesResponse(frame_id=frame.frame_id, skipped_frame_ids=skipped)
                if frame.HasField("capture_time"):
                    resp.capture_time.CopyFrom(frame.capture_time)
                try:
                    img = self._image(frame.image, "frame.image")
                    resp.image.CopyFrom(pb.ImageInfo(width=img.shape[1], height=img.shape[0]))
                    for r in session.process(img):
                        resp.faces.append(pb.TrackedFace(
                            track_id=r.track.track_id, face=convert.face_to_proto(r.face), frames_tracked=r.track.frames,
                            evaluated=r.evaluated,
                            liveness=convert.liveness_to_proto(r.track.liveness) if r.track.liveness else None,
                            identity=pb.TrackIdentity(subject_id=r.track.identity.subject_id, face_id=r.track.identity.face_id,
                                                      similarity=r.track.identity.similarity) if r.track.identity else None))
                except errors.FaceServiceError as exc:  # one bad frame does not end the stream
                    resp.error.CopyFrom(item_error(failure("StreamFrames", exc)))
                resp.latency_ms = (time.monotonic() - received) * 1000
                yield resp
