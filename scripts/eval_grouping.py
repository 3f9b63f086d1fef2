#!/usr/bin/env python3
"""Measure face grouping (GroupFaces: server/domain/grouping.py) on LFW: purity and completeness.

Embeds the 480 photos of ../shared/faces/lfw (200 people, 150 with several photos) with the
server's pipeline, groups them at the recognizer's thresholds (1:N, the GroupFaces default, and
1:1 for comparison) and at any asked for, and prints per threshold:

  purity        share of photos in a group whose majority person is theirs (1 = no group mixes people)
  completeness  share of photos in their person's largest group (1 = no person is split)
  pair P / R    precision and recall over photo pairs put together (same person or not)
  groups        groups found (singletons included) against the 200 people

    .venv/bin/python scripts/eval_grouping.py
    .venv/bin/python scripts/eval_grouping.py --thresholds 0.3,0.4,0.5
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from bench.common import write_json
from scripts.eval_verification import FACES, ROOT, embed_all
from server import config
from server.assembly import build_pipeline
from server.domain.grouping import group


def scores(groups: list[list[int]], people: np.ndarray) -> dict:
    n = len(people)
    purity = sum(Counter(people[g]).most_common(1)[0][1] for g in groups) / n
    largest: dict[str, int] = {}
    for g in groups:
        for person, count in Counter(people[g]).items():
            largest[person] = max(largest.get(person, 0), count)
    completeness = sum(largest.values()) / n
    together = sum(len(g) * (len(g) - 1) // 2 for g in groups)
    right = sum(c * (c - 1) // 2 for g in groups for c in Counter(people[g]).values())
    same = sum(c * (c - 1) // 2 for c in Counter(people).values())
    return {
        "purity": purity,
        "completeness": completeness,
        "pair_precision": right / together if together else 1.0,
        "pair_recall": right / same if same else 1.0,
        "groups": len(groups),
        "singletons": sum(len(g) == 1 for g in groups),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--thresholds", default="", help="more thresholds to group at, comma-separated")
    ap.add_argument("--json", type=Path, default=ROOT / ".bench" / "eval_grouping.json")
    args = ap.parse_args()

    pipeline = build_pipeline(config.load([], environ={}))
    rec = pipeline.recognizer
    paths = sorted((FACES / "lfw").glob("*/*.jpg"))
    emb = embed_all(pipeline, paths)
    used = [p for p in paths if emb[str(p)] is not None]
    people = np.array([p.parent.name for p in used])
    vectors = np.stack([emb[str(p)] for p in used])
    named = {"search (1:N, the default)": rec.search_threshold, "match (1:1)": rec.match_threshold}
    for t in filter(None, args.thresholds.split(",")):
        named[f"asked {float(t):g}"] = float(t)

    print(f"{len(used)} of {len(paths)} LFW photos embedded ({len(set(people))} people); {rec.model_id}")
    hdr = f"{'threshold':<28} {'value':>6} {'purity':>7} {'complete':>8} {'pair P':>7} {'pair R':>7} {'groups':>7} {'single':>7}"
    print(hdr)
    print("-" * len(hdr))
    results = []
    for name, t in named.items():
        s = scores(group(vectors, t), people)
        results.append({"threshold_name": name, "threshold": t, **s})
        print(
            f"{name:<28} {t:6.3f} {s['purity']:7.4f} {s['completeness']:8.4f} {s['pair_precision']:7.4f} "
            f"{s['pair_recall']:7.4f} {s['groups']:7d} {s['singletons']:7d}"
        )
    out = write_json(
        args.json,
        {"photos": len(used), "people": int(len(set(people))), "model": rec.model_id, "results": results},
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
