"""The staging cache on both real backends (in-process and Redis), and sealed face crops."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
import redis

from server import errors
from server.storage.crypto import CropCipher, generate_key
from server.storage.staging import MemoryStagingCache, RedisStagingCache, StagedFace
from server.storage.staging.base import new_token
from tests.conftest import REDIS_URL, face_path


@pytest.fixture(params=["memory", "redis"])
def cache(request):
    if request.param == "memory":
        yield MemoryStagingCache(max_entries=100)
    else:
        c = RedisStagingCache(REDIS_URL, prefix=request.getfixturevalue("redis_prefix"))
        yield c
        c.close()


def staged(subject: str = "alice") -> StagedFace:
    v = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    return StagedFace(
        collection_id="c",
        subject_id=subject,
        face_id="f" * 32,
        model_id="w600k_mbf",
        embedding=v / np.linalg.norm(v),
        quality=0.8,
        liveness_score=0.97,
        add_face=False,
        created_ms=1,
        expires_ms=2,
        crop=b"\x00sealed\xff",
    )


def test_put_get_delete_roundtrip(cache):
    tok, s = new_token(), staged()
    cache.put(tok, s, ttl_s=60)
    got = cache.get(tok)
    np.testing.assert_array_equal(got.embedding, s.embedding)
    assert (got.subject_id, got.crop, got.liveness_score) == ("alice", s.crop, 0.97)
    assert cache.get(new_token()) is None
    cache.delete(tok)
    assert cache.get(tok) is None


def test_tokens_are_prefixed_unguessable_and_never_look_like_an_option():
    toks = {new_token() for _ in range(2000)}
    assert len(toks) == 2000
    for t in toks:
        assert t.startswith("stg_") and len(t) == 4 + 32  # 24 random bytes in URL-safe base64
        assert set(t[4:]) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    # with 2000 tokens, some random parts start with "-" or "_" (1 in 32 each time): the prefix shields them
    assert any(t[4] in "-_" for t in toks)


def test_entries_expire(cache):
    tok = new_token()
    cache.put(tok, staged(), ttl_s=1)
    assert cache.get(tok) is not None
    time.sleep(1.3)
    assert cache.get(tok) is None


def test_redis_keys_do_not_reveal_tokens_and_carry_a_ttl(redis_prefix):
    c = RedisStagingCache(REDIS_URL, prefix=redis_prefix)
    tok = new_token()
    c.put(tok, staged(), ttl_s=600)
    keys = [k.decode() for k in c.client.scan_iter(match=redis_prefix + "*")]
    assert keys and all(tok not in k for k in keys)
    assert 590 <= c.client.ttl(c._key(tok)) <= 600
    c.client.set(c._key(tok), b'{"v": 99}')  # a format from a newer server: treated as absent, not a crash
    assert c.get(tok) is None


def test_redis_down_is_unavailable():
    from server.errors import FaceServiceError

    c = RedisStagingCache("redis://127.0.0.1:9/0", timeout_s=0.5)
    with pytest.raises(FaceServiceError) as e:
        c.get(new_token())
    assert e.value.reason == "CACHE_UNAVAILABLE" and e.value.code.name == "UNAVAILABLE"
    with pytest.raises(redis.RedisError):
        redis.Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=0.5).ping()


def test_memory_cache_is_bounded():
    c = MemoryStagingCache(max_entries=3)
    toks = [new_token() for _ in range(5)]
    for t in toks:
        c.put(t, staged(), ttl_s=60)
    assert len(c) == 3
    assert c.get(toks[0]) is None and c.get(toks[4]) is not None  # the oldest went first


def test_sealed_crop_roundtrip_and_binding():
    crop = cv2.resize(cv2.imread(str(face_path("dev/img1.jpg"))), (112, 112))
    cipher = CropCipher(generate_key())
    sealed = cipher.seal(crop, "face-a")
    assert cv2.imdecode(np.frombuffer(sealed, np.uint8), cv2.IMREAD_COLOR) is None  # not an image
    np.testing.assert_array_equal(cipher.open(sealed, "face-a"), crop)  # lossless
    with pytest.raises(ValueError, match="authentication"):
        cipher.open(sealed, "face-b")  # bound to its face id
    with pytest.raises(ValueError, match="different key"):
        CropCipher(generate_key()).open(sealed, "face-a")
    for bad in ("not base64!", "c2hvcnQ="):
        with pytest.raises(ValueError):
            CropCipher(bad)


def test_each_collection_has_its_own_bound_and_dies_with_its_collection(request):
    """One tenant at its bound is refused; it never pushes out another tenant's staged faces."""
    caches = [
        MemoryStagingCache(max_entries=100, per_collection=3),
        RedisStagingCache(REDIS_URL, prefix=request.getfixturevalue("redis_prefix") + "bound:", per_collection=3),
    ]
    for cache in caches:
        victim = new_token()
        s = staged()
        s.collection_id = "victim"
        cache.put(victim, s, ttl_s=60)
        mine = []
        for _ in range(3):
            mine.append(new_token())
            a = staged()
            a.collection_id = "attacker"
            cache.put(mine[-1], a, ttl_s=60)
        with pytest.raises(errors.FaceServiceError) as e:
            cache.put(new_token(), a, ttl_s=60)
        assert e.value.reason == "STAGING_LIMIT_REACHED", cache.backend
        assert cache.get(victim) is not None, cache.backend
        cache.delete(mine[0], "attacker")  # a registered face frees its slot
        cache.put(new_token(), a, ttl_s=60)
        assert cache.drop_collection("attacker") == 3, cache.backend
        assert all(cache.get(t) is None for t in mine) and cache.get(victim) is not None
        cache.put(new_token(), a, ttl_s=60)  # the dropped collection starts from nothing
        if isinstance(cache, RedisStagingCache):
            cache.close()


def test_redis_answers_that_it_cannot_serve_now_are_outages_and_its_other_errors_are_not():
    """TRYAGAIN and CLUSTERDOWN come as classes of their own in redis-py, with the code taken off the
    message; they were answered INTERNAL."""
    from server.storage.staging.redis_cache import _away

    parse = redis.connection.BaseParser.parse_error  # how redis-py reads an error reply
    for reply in (
        "TRYAGAIN Multiple keys request during rehashing of slot",
        "CLUSTERDOWN The cluster is down",
        "READONLY You can't write against a read only replica.",
        "MISCONF Redis is configured to save",
        "NOREPLICAS Not enough good replicas to write.",
        "BUSY Redis is busy running a script.",
        "OOM command not allowed when used memory > 'maxmemory'.",
    ):
        assert _away(parse(reply)), reply
    assert not _away(parse("WRONGTYPE Operation against a key holding the wrong kind of value"))
