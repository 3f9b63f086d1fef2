"""Plain records the stores hand back: collections, subjects, faces, API keys, staged faces.

No SQL, no protobuf: the store fills them, convert.py turns them into messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LIVENESS_REQUIRED = "required"  # every enrolment and probe photo must pass liveness
LIVENESS_OPTIONAL = "optional"  # a request may set skip_liveness (trusted sources, bulk imports)
# A subject's metadata: entries (after merging), key and value lengths. The store enforces the entry
# count on the merged result too, so no sequence of requests walks around it.
MAX_METADATA_ENTRIES, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 256


DUPLICATE_REJECT = "reject"  # an enrolment face matching another subject is refused (DUPLICATE_FACE)
DUPLICATE_WARN = "warn"  # registered, and the match reported in the response
DUPLICATE_OFF = "off"  # no duplicate check


@dataclass(frozen=True)
class Thresholds:
    """A collection's own thresholds; 0 = the server's default."""

    match: float = 0.0  # 1:1 (Verify)
    search: float = 0.0  # 1:N (Search, FindSimilar, GroupFaces, the duplicate check)
    liveness: float = 0.0


@dataclass
class Collection:
    collection_id: str
    display_name: str
    liveness_policy: str
    created_ms: int
    subject_count: int = 0
    face_count: int = 0
    duplicate_policy: str = DUPLICATE_REJECT
    thresholds: Thresholds = field(default_factory=Thresholds)
    retention_days: int = 0  # faces older than this are deleted by the retention job; 0 = kept


@dataclass
class AuditEvent:
    """One audited call: who (key id), what (the RPC), on what, when, and how it ended."""

    key_id: str
    action: str
    collection_id: str
    subject_id: str
    face_id: str
    outcome: str  # "OK" or "<status code> <reason>"
    created_ms: int
    seq: int = 0  # given by the store


@dataclass
class FaceRecord:
    face_id: str
    collection_id: str
    subject_id: str
    model_id: str
    quality: float
    created_ms: int
    embedding: np.ndarray | None = field(default=None, repr=False)
    crop: bytes | None = field(default=None, repr=False)  # AES-GCM sealed PNG of the aligned crop

    @property
    def has_crop(self) -> bool:
        return self.crop is not None


@dataclass
class Subject:
    collection_id: str
    subject_id: str
    metadata: dict[str, str]
    created_ms: int
    updated_ms: int
    faces: list[FaceRecord] = field(default_factory=list)
    face_count: int = 0


@dataclass
class NewFace:
    """A face ready to be committed: what Process staged, or what Register computed itself."""

    face_id: str
    model_id: str
    embedding: np.ndarray
    quality: float
    crop: bytes | None = None


@dataclass
class ApiKey:
    key_id: str
    collection_id: str
    description: str
    created_ms: int
