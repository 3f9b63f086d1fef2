"""Request validation for identifiers, metadata and pagination (AIP-158 page tokens)."""

from __future__ import annotations

import base64
import binascii
import json
import re

from server import errors
from server.records import MAX_METADATA_ENTRIES, MAX_METADATA_KEY, MAX_METADATA_VALUE

COLLECTION_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
SUBJECT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")
FACE_ID = re.compile(r"[0-9a-f]{32}")
KEY_ID = re.compile(r"[0-9a-f]{16}")
MAX_TEXT = 256
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 50, 1000
MAX_PAGE_TOKEN = 1024  # the tokens this server writes are far shorter


def _match(pattern: re.Pattern, value: str, field: str, what: str) -> str:
    if not value:
        raise errors.validation(field, "required")
    if not pattern.fullmatch(value):
        raise errors.validation(field, f"{errors.quote(value, 80)} is not a valid {what} (pattern {pattern.pattern})")
    return value


def collection_id(value: str, field: str = "collection") -> str:
    return _match(COLLECTION_ID, value, field, "collection id")


def subject_id(value: str, field: str = "subject_id") -> str:
    return _match(SUBJECT_ID, value, field, "subject id")


def face_id(value: str, field: str = "face_id") -> str:
    return _match(FACE_ID, value, field, "face id")


def key_id(value: str, field: str = "key_id") -> str:
    return _match(KEY_ID, value, field, "key id")


MAX_ITEM_ID = 128


def item_id(value: str, field: str = "item_id") -> str:
    """A batch item's id, echoed in its answer: bounded like every other id."""
    if len(value) > MAX_ITEM_ID:
        raise errors.validation(field, f"at most {MAX_ITEM_ID} characters, got {len(value)}")
    return value


def text(value: str, field: str, limit: int = MAX_TEXT) -> str:
    if len(value) > limit:
        raise errors.validation(field, f"at most {limit} characters, got {len(value)}")
    return value


def metadata(m, field: str = "metadata") -> dict[str, str]:
    d = dict(m)
    if len(d) > MAX_METADATA_ENTRIES:
        raise errors.validation(field, f"at most {MAX_METADATA_ENTRIES} entries, got {len(d)}")
    for k, v in d.items():
        if not k or len(k) > MAX_METADATA_KEY:
            raise errors.validation(field, f"keys must be 1-{MAX_METADATA_KEY} characters: {errors.quote(k, 80)}")
        if len(v) > MAX_METADATA_VALUE:
            raise errors.validation(f"{field}[{k}]", f"at most {MAX_METADATA_VALUE} characters, got {len(v)}")
    return d


def metadata_mask(paths, metadata: dict[str, str], field: str = "update_mask") -> list[str] | None:
    """The metadata keys an update_mask names (None: the whole map, for no mask or the path "metadata")."""
    paths = list(paths)
    if not paths or paths == ["metadata"]:
        return None
    keys = []
    for path in paths:
        key = path[len("metadata.") :] if path.startswith("metadata.") else ""
        if not key or len(key) > MAX_METADATA_KEY:
            raise errors.validation(field, f'paths are "metadata" or "metadata.<key>", not {errors.quote(path, 80)}')
        keys.append(key)
    extra = set(metadata) - set(keys)
    if extra:
        raise errors.validation(field, f"metadata holds keys the mask does not name: {errors.quote(sorted(extra)[0], 80)}")
    return keys


def page_size(value: int, field: str = "page_size") -> int:
    if value > MAX_PAGE_SIZE:
        raise errors.validation(field, f"at most {MAX_PAGE_SIZE}, got {value}")
    return value or DEFAULT_PAGE_SIZE


def encode_page_token(after: str, scope: str) -> str:
    """Opaque to clients: the last id of the page and what was being listed."""
    raw = json.dumps({"a": after, "s": scope}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, scope: str, field: str = "page_token") -> str:
    """The id to continue after ("" for the first page); the token must come from the same listing."""
    if not token:
        return ""
    if len(token) > MAX_PAGE_TOKEN:
        raise errors.validation(field, "not a page token from this listing")
    try:
        d = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        after, token_scope = d["a"], d["s"]
        if not isinstance(after, str) or not isinstance(token_scope, str):
            raise ValueError
        after.encode()  # a lone surrogate (JSON's "\udc80") is no id, and no database driver takes it
    except (ValueError, KeyError, TypeError, IndexError, binascii.Error, RecursionError):  # deep nesting too
        raise errors.validation(field, "not a page token from this listing") from None
    if token_scope != scope:
        raise errors.validation(field, "the page token belongs to another listing")
    return after


def page(size: int, token: str, scope: str, fetch, key) -> tuple[list, str]:
    """One page of a keyset listing and the next page's token ("" on the last page).

    `fetch(after, limit)` returns rows in `key` order strictly after `after`;
    one row more than the page is asked for, to tell whether another page exists.
    """
    size = page_size(size)
    rows = fetch(decode_page_token(token, scope), size + 1)
    if len(rows) <= size:
        return rows, ""
    rows = rows[:size]
    return rows, encode_page_token(key(rows[-1]), scope)
