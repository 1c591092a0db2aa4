"""Print the pip requirements of the rsray container image, one per line.

    python cluster/image_requirements.py pyproject.toml constraints.txt > requirements.txt
    pip install -c constraints.txt -r requirements.txt

The image installs pyproject.toml's dependencies at exactly the versions in constraints.txt (the
set the tests ran with, so the image cannot drift from it), plus `ray[default]` at the same Ray
version: the dashboard and job server that `ray job submit`, the cluster launcher and KubeRay talk
to, which a laptop does not need. Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

RAY_PIN = re.compile(r"^ray==(?P<version>\S+)$")


def image_requirements(pyproject: str | Path, constraints: str | Path) -> list[str]:
    """pyproject's runtime dependencies, then `ray[default]==<the Ray version constraints.txt pins>`."""
    project = tomllib.loads(Path(pyproject).read_text())["project"]
    requirements = [dep.replace(" ", "") for dep in project["dependencies"]]
    lines = [line.strip() for line in Path(constraints).read_text().splitlines()]
    ray_versions = [m["version"] for m in map(RAY_PIN.match, lines) if m]
    if len(ray_versions) != 1:
        raise ValueError(f"{constraints}: expected exactly one pinned ray (ray==X), found {len(ray_versions)}")
    return requirements + [f"ray[default]=={ray_versions[0]}"]


if __name__ == "__main__":
    args = sys.argv[1:] or ["pyproject.toml", "constraints.txt"]
    print("\n".join(image_requirements(*args)))
