"""How many cores this process may keep busy: a container's share, not the host's.

The runtimes, the search pool and the graph choice (server/vision/models/runtime.py) size their
threads by it.
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _affinity() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_quota(root: Path = CGROUP_ROOT, membership: str | None = None) -> float | None:
    """The CPU time this process's control group may use, in cores (Docker's --cpus, Kubernetes'
    limits.cpu: a quota, where a cpuset would show in the affinity), or None when unlimited. The
    tightest of the process's group and its parents', cgroup v2 (cpu.max) or v1 (cpu.cfs_quota_us).
    `membership`: /proc/self/cgroup's text (read when None)."""
    if membership is None:
        try:
            membership = Path("/proc/self/cgroup").read_text()
        except OSError:
            return None
    files = []  # (file, its period's file or None for cpu.max's own period)
    for line in membership.splitlines():
        _, controllers, group = (line.split(":", 2) + ["", ""])[:3]
        names = controllers.split(",")
        parts = [p for p in group.split("/") if p]
        paths = [Path(*parts[:n]) if n else Path() for n in range(len(parts), -1, -1)]  # the group, then its parents
        if controllers == "":  # v2's unified hierarchy
            files += [(root / path / "cpu.max", None) for path in paths]
        elif "cpu" in names:
            for mount in {",".join(names), "cpu", "cpu,cpuacct"}:
                files += [(root / mount / path / "cpu.cfs_quota_us", root / mount / path / "cpu.cfs_period_us") for path in paths]
    cores = []
    for quota_file, period_file in files:
        try:
            if period_file is None:
                quota, period = quota_file.read_text().split()[:2]
            else:
                quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
            if quota not in ("max", "-1") and float(period) > 0:
                cores.append(float(quota) / float(period))
        except (OSError, ValueError):
            continue  # no such file at this level (a cgroup namespace shows the group as the root)
    return min(cores) if cores else None


def cpu_cores() -> int:
    """The cores this process may keep busy: those it may run on (a cpuset shows in the affinity),
    fewer where its control group's CPU quota allows less. Rounded down: the runtimes run a model's
    threads in lockstep, and one thread more than the quota allows gets the whole group throttled."""
    quota = cpu_quota()
    return _affinity() if quota is None else max(1, min(_affinity(), int(quota)))


def quota_threads() -> int:
    """Threads per model run where a CPU quota allows fewer cores than the process sees (0: none does,
    and the runtimes size their own pools). Neither onnxruntime nor OpenVINO reads the quota: each
    would start a thread per visible core."""
    cores = cpu_cores()
    return cores if cores < _affinity() else 0
