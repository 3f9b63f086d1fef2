#!/usr/bin/env python3
"""Print the requirements a pyproject.toml declares, one per line (for `pip install -r`).

The Dockerfile installs the dependencies from pyproject.toml alone, in a layer of their own, so
an edit to the code does not reinstall them:

    python scripts/pyproject_deps.py pyproject.toml clients/python/pyproject.toml:video
    python scripts/pyproject_deps.py pyproject.toml:gpu --without onnxruntime    # the CUDA image

`FILE:extra1,extra2` adds those optional-dependency groups. The project's own packages
(a dependency on another listed file's project) are left out. Standard library only (Python
3.10 reads TOML with the copy pip vendors).
"""

from __future__ import annotations

import argparse
import re
import sys

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib


def requirement_name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;@]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def requirements(specs: list[str], without: set[str]) -> list[str]:
    projects, reqs = [], []
    for spec in specs:
        path, _, extras = spec.partition(":")
        with open(path, "rb") as f:
            project = tomllib.load(f)["project"]
        projects.append(project["name"].lower())
        reqs += project.get("dependencies", [])
        for extra in filter(None, extras.split(",")):
            reqs += project["optional-dependencies"][extra]
    skip = set(projects) | {w.lower() for w in without}
    out: list[str] = []
    for req in reqs:
        if requirement_name(req) not in skip and req not in out:
            out.append(req)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pyprojects", nargs="+", help="FILE or FILE:extra1,extra2")
    ap.add_argument("--without", action="append", default=[], help="leave this requirement out (repeatable)")
    args = ap.parse_args(argv)
    print("\n".join(requirements(args.pyprojects, set(args.without))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
