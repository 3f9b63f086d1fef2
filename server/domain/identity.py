"""The identity lifecycle: Process (check + stage) -> Register (commit) -> Verify (1:1).

Plain Python: a pipeline, a store, a staging cache and an optional crop
cipher in; records out. The servicer turns these into protobuf. Cheap checks
(collection, subject state) run before any model does.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import zlib
from dataclasses import dataclass

import cv2
import grpc
import numpy as np

from server import errors
from server.context import ensure_call_alive
from server.domain.collections import ServerThresholds
from server.records import (
    DUPLICATE_OFF,
    DUPLICATE_REJECT,
    LIVENESS_OPTIONAL,
    Collection,
    FaceRecord,
    NewFace,
    Subject,
    Thresholds,
)
from server.storage.crypto import CropCipher
from server.storage.interfaces import SubjectStore
from server.storage.staging import StagedFace, StagingCache
from server.storage.staging.base import face_id_for_token, new_token
from server.vision.faces import Face, LivenessResult
from server.vision.pipeline import DEFAULT, DetectOptions, FacePipeline

log = logging.getLogger("facesvc.identity")


@dataclass(frozen=True)
class EnrolmentPolicy:
    staging_ttl_s: int = 600
    max_faces_per_subject: int = 10
    min_face_size: float = 48.0  # px, shorter side of the enrolment face box
    min_quality: float = 0.3  # Quality.score
    ambiguity_ratio: float = 0.8  # another usable face at least this large (relative) -> MULTIPLE_FACES


@dataclass(frozen=True)
class Duplicate:
    """The face of another subject an enrolment face matched (reported under the WARN policy)."""

    subject_id: str
    face_id: str
    similarity: float
    threshold: float


@dataclass
class Processed:
    token: str
    staged: StagedFace
    face: Face
    liveness: LivenessResult | None
    faces_detected: int
    duplicate: Duplicate | None = None


@dataclass
class Screened:
    """An enrolment photo that passed every check; what is left is its embedding (batched by the caller)."""

    collection: str
    subject_id: str
    face: Face
    faces_detected: int
    liveness: LivenessResult | None
    add_face: bool


@dataclass
class Registered:
    face: FaceRecord
    subject: Subject
    created: bool
    processed: Processed | None = None  # set when Register ran on an image
    duplicate: Duplicate | None = None


@dataclass
class Verification:
    match: bool
    similarity: float
    matched_face_id: str
    threshold: float
    liveness: LivenessResult | None
    face: Face
    similarities: list[tuple[str, float]]


def _now_ms() -> int:
    return int(time.time() * 1000)


class IdentityService:
    def __init__(
        self,
        pipeline: FacePipeline,
        store: SubjectStore,
        cache: StagingCache,
        policy: EnrolmentPolicy = EnrolmentPolicy(),
        cipher: CropCipher | None = None,
        indexes=None,
        thresholds: ServerThresholds | None = None,
    ):
        self.pipeline = pipeline
        self.store = store
        self.cache = cache
        self.policy = policy
        self.cipher = cipher
        self.indexes = indexes  # IndexRegistry: told about every committed change
        self.thresholds = thresholds  # the server's; None: the duplicate check has no 1:N threshold to use
        # Check and commit of one collection's enrolments run one at a time on this replica, so two
        # photos of one person enrolled at once as two subjects cannot both pass the duplicate check.
        self._commit_locks = [threading.Lock() for _ in range(64)]

    # -- a collection's settings ------------------------------------------------
    def settings(self, collection: str) -> tuple[Collection, Thresholds]:
        """The collection's policies and the thresholds in force in it (COLLECTION_NOT_FOUND)."""
        c = self.store.get_collection_settings(collection)
        if self.thresholds is None:
            return c, c.thresholds
        return c, self.thresholds.effective(c)

    def find_duplicate(self, collection: str, subject_id: str, embedding: np.ndarray) -> Duplicate | None:
        """The best face of another subject at or above the collection's 1:N threshold, under its
        duplicate policy: REJECT raises DUPLICATE_FACE, WARN returns it, OFF looks for nothing."""
        c, t = self.settings(collection)
        if c.duplicate_policy == DUPLICATE_OFF or self.indexes is None or not t.search:
            return None
        # Only when another subject is the best match: a face added to its own subject that also
        # resembles a look-alike is that subject's face, not a duplicate.
        index = self.indexes.get(collection, c.created_ms)  # not an earlier collection's of this id
        hits = index.search(embedding, 1, t.search, self.policy.max_faces_per_subject)
        if not hits or hits[0].subject_id == subject_id:
            return None
        hit = hits[0]
        if c.duplicate_policy == DUPLICATE_REJECT:
            raise errors.precondition(
                errors.DUPLICATE_FACE,
                f"this face matches subject {hit.subject_id!r} (similarity {hit.similarity:.3f} >= the collection's "
                f"1:N threshold {t.search:.3f}); add it to that subject with add_face, or change the collection's duplicate policy",
                subject_id=hit.subject_id,
                face_id=hit.face_id,
                similarity=f"{hit.similarity:.4f}",
                threshold=f"{t.search:.4f}",
            )
        return Duplicate(hit.subject_id, hit.face_id, hit.similarity, t.search)

    # -- shared steps --------------------------------------------------------
    def allow_skip_liveness(self, collection: str, policy: str | None = None) -> None:
        """skip_liveness is only for collections whose policy is OPTIONAL. `policy`: the collection's, when
        the caller has just read it (else it is read here: COLLECTION_NOT_FOUND)."""
        if (policy or self.store.get_collection_policy(collection)) != LIVENESS_OPTIONAL:
            raise errors.precondition(
                errors.LIVENESS_REQUIRED,
                f"collection {collection!r} requires liveness; skip_liveness is not allowed",
                collection=collection,
            )

    def _liveness(self, collection: str, img, face: Face, skip: bool, threshold: float | None) -> LivenessResult | None:
        if skip:
            self.allow_skip_liveness(collection)
            return None
        return self.pipeline.require_live(img, face, threshold)

    def _enrolment_face(self, img: np.ndarray, opts: DetectOptions) -> tuple[Face, int]:
        """The one usable face of an enrolment photo, or a clear reason why there is none."""
        faces = self.pipeline.detect(img, opts)
        if not faces:
            raise errors.no_face()
        face, p = faces[0], self.policy
        q = face.quality
        if q.face_size < p.min_face_size:
            raise errors.low_quality(
                f"face is {q.face_size:.0f} px, enrolment needs at least {p.min_face_size:.0f} px",
                face_size=f"{q.face_size:.0f}",
                min_face_size=f"{p.min_face_size:.0f}",
            )
        if q.score < p.min_quality:
            raise errors.low_quality(
                f"face quality {q.score:.2f} is below {p.min_quality:.2f} (sharpness {q.sharpness:.2f}, "
                f"yaw {q.yaw:.0f}°, pitch {q.pitch:.0f}°)",
                quality=f"{q.score:.3f}",
                min_quality=f"{p.min_quality:.3f}",
            )
        if opts.selection == DEFAULT:  # a caller who chose a selection has said which face is meant
            rivals = [
                f
                for f in faces[1:]
                if f.quality.face_size >= p.ambiguity_ratio * q.face_size and f.quality.score >= p.min_quality
            ]
            if rivals:
                raise errors.multiple_faces(1 + len(rivals), hint="crop the photo to the person being enrolled")
        return face, len(faces)

    def _check_subject(self, collection: str, subject_id: str, add_face: bool) -> None:
        count = self.store.subject_face_count(collection, subject_id)  # also COLLECTION_NOT_FOUND
        if count is None:
            return
        if not add_face:
            raise errors.already_exists(
                errors.ALREADY_REGISTERED,
                f"subject {subject_id!r} is already registered in {collection!r}; set add_face to add another face to it",
                collection=collection,
                subject_id=subject_id,
            )
        if count >= self.policy.max_faces_per_subject:
            raise errors.precondition(
                errors.FACE_LIMIT_REACHED,
                f"subject {subject_id!r} already holds {count} faces (limit {self.policy.max_faces_per_subject})",
                limit=self.policy.max_faces_per_subject,
            )

    def screen(
        self,
        collection: str,
        subject_id: str,
        img,
        opts: DetectOptions,
        *,
        add_face: bool = False,
        skip_liveness: bool = False,
        liveness_threshold: float | None = None,
    ) -> Screened:
        """Every enrolment check, cheapest first: subject state, the one usable face, liveness."""
        self._check_subject(collection, subject_id, add_face)
        face, n = self._enrolment_face(img, opts)
        liveness = self._liveness(collection, img, face, skip_liveness, liveness_threshold)
        return Screened(collection, subject_id, face, n, liveness, add_face)

    def _stage(self, s: Screened, embedding: np.ndarray, face_id: str, collection_created_ms: int = 0) -> Processed:
        now = _now_ms()
        staged = StagedFace(
            collection_id=s.collection,
            subject_id=s.subject_id,
            face_id=face_id,
            model_id=self.pipeline.recognizer.model_id,
            embedding=embedding,
            quality=s.face.quality.score,
            liveness_score=-1.0 if s.liveness is None else s.liveness.score,
            add_face=s.add_face,
            created_ms=now,
            expires_ms=now + self.policy.staging_ttl_s * 1000,
            crop=self.cipher.seal(s.face.aligned, face_id) if self.cipher else None,
            collection_created_ms=collection_created_ms,
        )
        return Processed("", staged, s.face, s.liveness, s.faces_detected)

    def _commit(self, staged: StagedFace, metadata: dict[str, str]) -> tuple[FaceRecord, bool, Subject, Duplicate | None]:
        """The duplicate check, then the commit, under the collection's lock (the check must see every
        earlier commit of this replica, a batch's earlier items included)."""
        lock = self._commit_locks[zlib.crc32(staged.collection_id.encode()) % len(self._commit_locks)]
        with lock:
            duplicate = self.find_duplicate(staged.collection_id, staged.subject_id, staged.embedding)
            ensure_call_alive()  # a caller already told DEADLINE_EXCEEDED must not find the face registered
            face = NewFace(staged.face_id, staged.model_id, staged.embedding, staged.quality, staged.crop)
            record, created, subject = self.store.add_face(
                staged.collection_id,
                staged.subject_id,
                face,
                allow_existing=staged.add_face,
                max_faces=self.policy.max_faces_per_subject,
                metadata=metadata,
            )
            if self.indexes is not None:  # read-your-writes on this replica; the others follow the change log
                self.indexes.local_change(staged.collection_id, [record.face_id])
        return record, created, subject, duplicate

    # -- the RPCs ------------------------------------------------------------
    def process_screened(self, s: Screened, embedding: np.ndarray) -> Processed:
        """Process, once the face is screened and embedded: stage it under a new token."""
        token = new_token()
        created = self.store.collection_created_ms(s.collection)
        if created is None:
            raise errors.not_found(
                errors.COLLECTION_NOT_FOUND, f"collection {s.collection!r} does not exist", collection=s.collection
            )
        duplicate = self.find_duplicate(s.collection, s.subject_id, embedding)  # told now, checked again at Register
        result = self._stage(s, embedding, face_id_for_token(token), created)
        result.token = token
        result.duplicate = duplicate
        self.cache.put(token, result.staged, self.policy.staging_ttl_s)
        return result

    def register_staged(self, collection: str, subject_id: str, token: str, metadata: dict[str, str]) -> Registered:
        face_id = face_id_for_token(token)
        staged = self.cache.get(token)
        if staged is None:
            # Already committed (a retry after a lost response)? Then answer as the first call did.
            try:
                done = self.store.get_face(collection, face_id)
            except errors.FaceServiceError as exc:
                if exc.code != grpc.StatusCode.NOT_FOUND:
                    raise  # the database away, or the call's time up: whether it was committed is unknown
                done = None
            if done is None or done.subject_id != subject_id:
                raise errors.not_found(errors.STAGING_EXPIRED, "staging token is unknown or expired; call Process again")
            return Registered(done, self.store.get_subject(collection, subject_id), created=False)
        # A token tells its holder nothing: one of another collection (or of a deleted collection
        # whose id was taken again) is answered exactly as an unknown one.
        if staged.collection_id != collection or staged.collection_created_ms != self.store.collection_created_ms(collection):
            raise errors.not_found(errors.STAGING_EXPIRED, "staging token is unknown or expired; call Process again")
        if staged.subject_id != subject_id:
            raise errors.precondition(errors.STAGING_MISMATCH, "the staging token was issued for another subject")
        if staged.model_id != self.pipeline.recognizer.model_id:
            raise errors.not_found(
                errors.STAGING_EXPIRED, "the staged face was embedded by another recognizer; call Process again"
            )
        self._still_live(staged)
        record, created, subject, duplicate = self._commit(staged, metadata)
        try:  # only after the commit: a failed commit can be retried with the same token
            self.cache.delete(token, collection)
        except errors.FaceServiceError as exc:
            # the face is registered: say so. The token lives out its time; a retry with it answers
            # this face (add_face finds it), as a retry after a lost response does
            log.warning("register: face %s committed; its staging token not deleted (%s)", record.face_id, exc.reason)
        return Registered(record, subject, created, duplicate=duplicate)

    def _still_live(self, staged: StagedFace) -> None:
        """A staged face meets the collection's liveness policy and threshold as they are now: the
        operator may have required liveness, or raised the threshold, since it was staged."""
        c, t = self.settings(staged.collection_id)
        if staged.liveness_score < 0 and c.liveness_policy != LIVENESS_OPTIONAL:
            raise errors.precondition(
                errors.LIVENESS_REQUIRED,
                f"collection {staged.collection_id!r} requires liveness now, and this face was staged without it; "
                "call Process again",
                collection=staged.collection_id,
            )
        if staged.liveness_score >= 0 and staged.liveness_score < t.liveness:
            raise errors.FaceServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                errors.SPOOF_DETECTED,
                f"the collection's liveness threshold was raised to {t.liveness:.3f} since this face was staged "
                f"(score {staged.liveness_score:.3f}); call Process again",
                liveness_score=f"{staged.liveness_score:.4f}",
                threshold=f"{t.liveness:.4f}",
            )

    def register_screened(self, s: Screened, embedding: np.ndarray, metadata: dict[str, str]) -> Registered:
        """Register with an image, once the face is screened and embedded: commit it."""
        result = self._stage(s, embedding, uuid.uuid4().hex)
        record, created, subject, duplicate = self._commit(result.staged, metadata)
        return Registered(record, subject, created, processed=result, duplicate=duplicate)

    def verify(
        self,
        collection: str,
        subject_id: str,
        img,
        opts: DetectOptions,
        threshold: float,
        *,
        skip_liveness: bool = False,
        liveness_threshold: float | None = None,
    ) -> Verification:
        subject = self.store.get_subject(collection, subject_id, with_embeddings=True)
        model = self.pipeline.recognizer.model_id
        gallery = [f for f in subject.faces if f.model_id == model]
        if not gallery:
            raise errors.precondition(
                errors.NO_COMPARABLE_FACES,
                f"subject {subject_id!r} has no face embedded by {model} ({len(subject.faces)} faces by other models or none); "
                "register a face or run facesvc-reembed",
                faces=len(subject.faces),
                model=model,
            )
        face = self.pipeline.detect_one(img, opts)
        liveness = self._liveness(collection, img, face, skip_liveness, liveness_threshold)
        (probe,) = self.pipeline.embed([face])
        sims = np.stack([f.embedding for f in gallery]) @ probe
        order = np.argsort(-sims)
        best = int(order[0])
        similarity = float(sims[best])
        return Verification(
            match=similarity >= threshold,
            similarity=similarity,
            matched_face_id=gallery[best].face_id,
            threshold=threshold,
            liveness=liveness,
            face=face,
            similarities=[(gallery[i].face_id, float(sims[i])) for i in order],
        )

    # -- subjects ------------------------------------------------------------
    def get_subject(self, collection: str, subject_id: str) -> Subject:
        return self.store.get_subject(collection, subject_id)

    def list_subjects(self, collection: str, after: str, limit: int) -> list[Subject]:
        return self.store.list_subjects(collection, after, limit)

    def update_subject(
        self, collection: str, subject_id: str, metadata: dict[str, str], keys: list[str] | None = None
    ) -> Subject:
        """Replace the metadata, or (keys) change only those keys."""
        return self.store.update_subject_metadata(collection, subject_id, metadata, keys)

    def export_subject(self, collection: str, subject_id: str) -> tuple[Subject, list[tuple[str, bytes]], list[str]]:
        """The subject with its faces, each stored crop as PNG (face id, bytes), and the ids of the faces
        whose crop cannot be opened (sealed under another key, or damaged): a data subject's access
        request, which one such crop must not fail whole. Crops are decrypted only when this server
        holds the crop key."""
        subject = self.store.get_subject(collection, subject_id)
        crops, unreadable = [], []
        if self.cipher is not None:
            for f in subject.faces:
                if f.crop is None:
                    continue
                try:
                    ok, png = cv2.imencode(".png", self.cipher.open(f.crop, f.face_id))
                except ValueError as exc:
                    log.warning(
                        "export of %s/%s: the crop of face %s cannot be opened: %s", collection, subject_id, f.face_id, exc
                    )
                    ok = False
                if ok:
                    crops.append((f.face_id, png.tobytes()))
                else:
                    unreadable.append(f.face_id)
        return subject, crops, unreadable

    # -- deletions (the store first, then the index) ---------------------------
    def delete_subject(self, collection: str, subject_id: str) -> int:
        face_ids = self.store.delete_subject(collection, subject_id)
        if self.indexes is not None:
            self.indexes.local_change(collection, face_ids)
        return len(face_ids)

    def delete_face(self, collection: str, face_id: str) -> FaceRecord:
        face = self.store.delete_face(collection, face_id)
        if self.indexes is not None:
            self.indexes.local_change(collection, [face_id])
        return face
