"""Timing summaries and result files, the same for every benchmark."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def pct(seconds, q: float) -> float:
    """The q-th percentile of durations in seconds, in milliseconds (0 for none)."""
    return float(np.percentile(np.asarray(seconds, dtype=float) * 1000, q)) if len(seconds) else 0.0


def percentiles(seconds, qs=(50, 95, 99)) -> dict:
    """n, mean and the given percentiles of durations in seconds, in milliseconds."""
    a = np.asarray(seconds, dtype=float) * 1000
    out = {"n": int(len(a)), "mean_ms": float(a.mean()) if len(a) else 0.0}
    out.update({f"p{q}_ms": pct(seconds, q) for q in qs})
    return out


def machine() -> dict:
    """What a result needs beside it to be read later: the machine, the code, the day."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    except OSError:
        pass
    return {
        "date": datetime.date.today().isoformat(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "git": rev,
    }


def write_json(path, doc: dict) -> Path:
    """Writes `doc` with the machine beside it; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), **doc}, indent=2))
    return out
