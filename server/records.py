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


@dataclass
class Collection:
    collection_id: str
    display_name: str
    liveness_policy: str
    created_ms: int
    subject_count: int = 0
    face_count: int = 0


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
