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


VECTOR_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8")


def machine() -> dict:
    """What a result needs beside it to be read later: the machine, the code, the day."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    cpu, flags = "", ""
    try:
        info = dict(line.split(":", 1) for line in open("/proc/cpuinfo").read().split("\n\n")[0].splitlines() if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        cpu = f"{info.get('model name', '')} (family {info.get('cpu family', '?')}, model {info.get('model', '?')})"
        flags = info.get("flags", "")
    except OSError:
        pass
    return {
        "date": datetime.date.today().isoformat(),
        "platform": platform.platform(),
        "cpu": cpu,
        # the model runs' speed turns on these (bf16 and AMX need them natively): a virtual machine's
        # model name often says only the vendor
        "cpu_features": [f for f in VECTOR_FEATURES if f in flags.split()],
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
