"""What a staged face is, how it is serialised (versioned), and the cache interface."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from dataclasses import dataclass

import numpy as np

from server import errors

FORMAT_VERSION = 2  # 2: collection_created_ms (entries of version 1 read as expired)


TOKEN_PREFIX = "stg_"


def new_token() -> str:
    """An unguessable staging token: "stg_" + 192 random bits, URL-safe base64.

    The prefix says what the string is (in logs, to secret scanners) and keeps a token from
    starting with "-", which command lines read as an option (`facesvc register --token -x…`
    failed for 1 token in 64)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(24)


def token_key(token: str) -> str:
    """Caches index entries by a hash of the token, so reading the cache does not reveal usable tokens."""
    return hashlib.sha256(token.encode()).hexdigest()


def face_id_for_token(token: str) -> str:
    """The face id a token commits to: a retried Register of the same token finds the same face."""
    return hashlib.sha256(b"face:" + token.encode()).hexdigest()[:32]


@dataclass
class StagedFace:
    collection_id: str
    subject_id: str
    face_id: str
    model_id: str
    embedding: np.ndarray
    quality: float
    liveness_score: float  # -1 when liveness was skipped
    add_face: bool
    created_ms: int
    expires_ms: int
    crop: bytes | None = None  # sealed (AES-GCM) aligned crop, only when a crop key is configured
    # When the collection was created: a staged face belongs to that collection, not to one
    # re-created later under the same id (Register compares the two).
    collection_created_ms: int = 0

    def to_bytes(self) -> bytes:
        d = {k: v for k, v in self.__dict__.items() if k not in ("embedding", "crop")}
        d["v"] = FORMAT_VERSION
        d["embedding"] = base64.b64encode(np.asarray(self.embedding, "<f4").tobytes()).decode()
        d["crop"] = None if self.crop is None else base64.b64encode(self.crop).decode()
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "StagedFace | None":
        """None for an entry written in a format this server does not understand (treated as expired)."""
        d = json.loads(raw)
        if d.pop("v", None) != FORMAT_VERSION:
            return None
        d["embedding"] = np.frombuffer(base64.b64decode(d["embedding"]), "<f4").copy()
        d["crop"] = None if d["crop"] is None else base64.b64decode(d["crop"])
        return cls(**d)


def staging_full(limit: int) -> errors.FaceServiceError:
    return errors.exhausted(
        errors.STAGING_LIMIT_REACHED,
        f"the collection already holds {limit} staged faces (staging_max_per_collection); register them or let them expire",
        limit=limit,
    )


class StagingCache:
    """put/get/delete by token; entries vanish after their TTL.

    Each collection may hold at most `per_collection` entries at once: one tenant's Process
    calls are refused at its own bound instead of pushing out another tenant's staged faces.
    drop_collection() removes a deleted collection's entries."""

    backend = "abstract"

    def put(self, token: str, staged: StagedFace, ttl_s: int) -> None:
        """Raises STAGING_LIMIT_REACHED when staged's collection is at its bound."""
        raise NotImplementedError

    def get(self, token: str) -> StagedFace | None:
        raise NotImplementedError

    def delete(self, token: str, collection: str = "") -> None:
        raise NotImplementedError

    def drop_collection(self, collection: str) -> int:
        """Forget every entry staged for the collection; returns how many."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.backend

    def close(self) -> None:
        pass
