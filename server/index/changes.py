"""Reading the face_changes log in order without missing a late commit.

MySQL hands out AUTO_INCREMENT values when a row is inserted, not when its
transaction commits, so seq 41 can become visible after seq 42. A reader that
only asked for "seq > the highest seen" would skip 41 for ever. ChangeFeed
remembers every hole below its high-water mark and asks for it again on each
poll until the row shows up or `gap_timeout_s` passes (a rolled-back insert
leaves a hole that never fills; no write transaction here runs anywhere near
that long).

poll() does not move the feed: the caller applies the rows and then calls
advance(), so rows whose application failed (database down) are read again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger("facesvc.index")

LOOKBACK = 1000  # rows a reader starting now reads again (a seq taken before the start may commit after it)

Change = tuple[int, str, "str | None", str]  # (seq, collection_id, face_id or None for the whole collection, op)


@dataclass
class Batch:
    rows: list[Change]
    high: int
    gaps: dict[int, float] = field(default_factory=dict)
    full: bool = False  # more rows are waiting: poll again at once


class ChangeFeed:
    def __init__(
        self, store, start: int, gap_timeout_s: float = 120.0, batch: int = 2000, max_gaps: int = 20_000, clock=time.monotonic
    ):
        self.store, self.high, self.gap_timeout_s, self.batch, self.max_gaps = store, start, gap_timeout_s, batch, max_gaps
        self.gaps: dict[int, float] = {}  # seq -> when it was first missed
        self.clock = clock

    @classmethod
    def from_now(cls, store, lookback: int = LOOKBACK, **kw) -> "ChangeFeed":
        """A feed for a server starting now: it re-reads the last `lookback` rows, so that a
        transaction that took its seq before the start but commits after it is not skipped."""
        return cls(store, max(0, store.last_change_seq() - lookback), **kw)

    def low_water(self) -> int:
        """Every change at or below this seq has been applied (or given up on)."""
        return min(self.gaps) - 1 if self.gaps else self.high

    def poll(self) -> Batch:
        now = self.clock()
        gaps = dict(self.gaps)
        late = []
        waiting = sorted(gaps)
        for s in range(0, len(waiting), 500):
            late += self.store.changes_at(waiting[s : s + 500])
        for row in late:
            gaps.pop(row[0], None)
        new = self.store.changes_after(self.high, self.batch)
        high = self.high
        for row in new:
            for missing in range(high + 1, row[0]):
                gaps[missing] = now
            high = row[0]
        expired = [s for s, t in gaps.items() if now - t > self.gap_timeout_s]
        if len(gaps) - len(expired) > self.max_gaps:  # e.g. auto_increment_increment > 1: keep the newest
            expired = sorted(gaps)[: len(gaps) - self.max_gaps]
        for s in expired:
            del gaps[s]
        if expired:
            log.debug("change log: gave up waiting for %d sequence numbers (rolled back)", len(expired))
        return Batch(late + new, high, gaps, full=len(new) == self.batch)

    def advance(self, batch: Batch) -> None:
        self.high, self.gaps = batch.high, batch.gaps
