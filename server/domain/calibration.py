"""Threshold calibration on labelled pairs: ROC figures and the threshold at a target false accept rate.

One implementation for the server (CalibrateThreshold: a collection's own population) and for
scripts/eval_verification.py (the recognizer's default thresholds on LFW).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from server import errors


@dataclass(frozen=True)
class Calibration:
    threshold: float
    tar: float  # genuine pairs at or above the threshold
    far: float  # impostor pairs at or above the threshold
    auc: float
    genuine: int
    impostor: int


def auc(genuine: np.ndarray, impostor: np.ndarray) -> float:
    """Area under the ROC curve (the Mann-Whitney statistic, ties counted as ranks in order)."""
    scores = np.concatenate([genuine, impostor])
    labels = np.concatenate([np.ones(len(genuine)), np.zeros(len(impostor))])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    return float((ranks[labels == 1].sum() - len(genuine) * (len(genuine) + 1) / 2) / (len(genuine) * len(impostor)))


def threshold_at_far(genuine: np.ndarray, impostor: np.ndarray, far: float) -> tuple[float, float] | None:
    """(threshold, TAR): the smallest threshold with at most floor(far x impostors) impostor pairs at or
    above it; None when there are fewer than 1/far impostor pairs (the rate cannot be told apart)."""
    if len(impostor) < 1 / far:
        return None
    k = int(np.floor(far * len(impostor)))
    imp_sorted = np.sort(impostor)[::-1]
    thr = float(np.nextafter(np.float32(imp_sorted[k]), np.float32(np.inf))) if k < len(imp_sorted) else float(imp_sorted[-1])
    return thr, float((genuine >= thr).mean())


def roc_metrics(genuine: np.ndarray, impostor: np.ndarray, fars=(1e-2, 1e-3, 1e-4)) -> dict:
    """AUC, best accuracy and its threshold, and TAR / threshold at each FAR (None where too few impostors)."""
    scores = np.concatenate([genuine, impostor])
    # best accuracy over all candidate thresholds (balanced classes would bias nothing here: report raw)
    cand = np.unique(scores)
    accs = [((genuine >= t).sum() + (impostor < t).sum()) / len(scores) for t in cand]
    best = int(np.argmax(accs))
    out = {
        "auc": auc(genuine, impostor),
        "accuracy": float(accs[best]),
        "best_threshold": float(cand[best]),
        "genuine": int(len(genuine)),
        "impostor": int(len(impostor)),
    }
    for far in fars:
        at = threshold_at_far(genuine, impostor, far)
        out[f"tar@far{far:g}"], out[f"thr@far{far:g}"] = (None, None) if at is None else (at[1], at[0])
    return out


def calibrate(genuine: np.ndarray, impostor: np.ndarray, target_far: float) -> Calibration:
    """The threshold at `target_far` with its TAR and actual FAR; VALIDATION_FAILED when the pairs cannot tell."""
    if not 0 < target_far < 1:
        raise errors.validation("target_far", f"must be in (0, 1), got {target_far}")
    if len(genuine) == 0:
        raise errors.validation("pairs", "no usable genuine pair (same_person true)")
    at = threshold_at_far(genuine, impostor, target_far)
    if at is None:
        raise errors.validation(
            "pairs",
            f"{len(impostor)} usable impostor pairs cannot measure a FAR of {target_far:g}: send at least {int(np.ceil(1 / target_far))}",
            needed=int(np.ceil(1 / target_far)),
        )
    thr, tar = at
    return Calibration(thr, tar, float((impostor >= thr).mean()), auc(genuine, impostor), len(genuine), len(impostor))
