"""Transparent huge pages for the search graphs.

hnswlib keeps each graph in one malloc'd block (about 2.2 KB a face: 1.1 GB at 500 k) and a
query reads a few thousand nodes scattered through it. On 4 KB pages nearly each of those
reads also misses the TLB and walks the page tables; on 2 MB pages the whole graph fits in
the TLB's reach. Linux's usual THP mode, "madvise", backs memory with huge pages only where
the process asks for them, and hnswlib does not ask. glibc (2.35 and later) asks for every
block it maps when the process starts with GLIBC_TUNABLES=glibc.malloc.hugetlb=1. Tunables
are read once, when the process starts, so the server re-executes itself with it set
(same pid, same arguments) before it allocates anything large.

scripts/bench_hugepages.py loads the same snapshot on both kinds of pages, in fresh processes;
its figures are in docs/search.md.
"""

from __future__ import annotations

import os
import re
import sys

TUNABLE = "glibc.malloc.hugetlb"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_ENABLED) -> str | None:
    """The kernel's THP mode (always, madvise or never); None where there is no THP."""
    try:
        with open(path) as f:
            m = re.search(r"\[(\w+)\]", f.read())
    except OSError:
        return None
    return m.group(1) if m else None


def glibc_version() -> tuple[int, int] | None:
    try:
        m = re.fullmatch(r"glibc (\d+)\.(\d+).*", os.confstr("CS_GNU_LIBC_VERSION") or "")
    except (ValueError, OSError):  # not glibc (musl, macOS)
        return None
    return (int(m.group(1)), int(m.group(2))) if m else None


def anon_huge_kb(pid: int | str = "self") -> int:
    """How much of a process's anonymous memory sits on huge pages, KiB (Linux)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:"))


def tunable(environ) -> str | None:
    """The value GLIBC_TUNABLES gives glibc.malloc.hugetlb, None where it gives none."""
    values = [t.split("=", 1)[1] for t in environ.get("GLIBC_TUNABLES", "").split(":") if t.startswith(TUNABLE + "=")]
    return values[-1] if values else None


def with_tunable(environ) -> dict:
    """environ plus glibc.malloc.hugetlb=1, other tunables kept."""
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t and not t.startswith(TUNABLE + "=")]
    return {**environ, "GLIBC_TUNABLES": ":".join([*tunables, TUNABLE + "=1"])}


def without_tunable(environ) -> dict:
    """environ with glibc.malloc.hugetlb removed (a child process that must run on 4 KB pages)."""
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t and not t.startswith(TUNABLE + "=")]
    env = {k: v for k, v in environ.items() if k != "GLIBC_TUNABLES"}
    return {**env, "GLIBC_TUNABLES": ":".join(tunables)} if tunables else env


def status(environ=os.environ) -> str:
    """What this process has, in words (the start-up log says it). With THP mode "always" the
    kernel gives every process huge pages, whatever the setting says."""
    mode = thp_mode()
    if mode is None or mode == "never":
        return f"off (the kernel's transparent huge pages are {mode or 'absent'})"
    if mode == "always":
        return "on (the kernel's THP mode is always)"
    value = tunable(environ)
    if value not in (None, "0") and (glibc_version() or (0, 0)) < (2, 35):
        return f"off (this C library ignores {TUNABLE}: glibc 2.35 or later reads it)"
    if value not in (None, "0"):
        return f"on (THP madvise, GLIBC_TUNABLES {TUNABLE}={value})"
    return "off" if value is None else f"off (GLIBC_TUNABLES {TUNABLE}=0)"


def ensure(enabled: bool, environ=os.environ) -> None:
    """Re-executes this process (same pid, same arguments) so that it runs as `enabled` asks.

    On: with glibc.malloc.hugetlb=1 where that changes anything (Linux with THP in madvise mode,
    glibc 2.35 or later) and no value was given to the tunable yet: an operator's
    GLIBC_TUNABLES=glibc.malloc.hugetlb=0 keeps 4 KB pages. Off: without the tunable, where it
    is set (an image that sets it for everyone). Returns where nothing changes, or where exec
    fails: the process then goes on as it is."""
    if enabled:
        if thp_mode() != "madvise" or tunable(environ) is not None or (glibc_version() or (0, 0)) < (2, 35):
            return
        env = with_tunable(environ)
    else:
        if tunable(environ) in (None, "0"):
            return
        env = without_tunable(environ)
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:
        return
