"""Print the pip requirements of the rsray container image, one per line.

    python cluster/image_requirements.py pyproject.toml > requirements.txt

The image installs exactly the pins in pyproject.toml (one source of truth, so the image cannot
drift from what the tests ran), plus `ray[default]` at the same Ray version: the dashboard and
job server that `ray job submit`, the cluster launcher and KubeRay talk to, which a laptop does
not need. Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

RAY_PIN = re.compile(r"^ray(\[[^\]]*\])?==(?P<version>\S+)$")


def image_requirements(pyproject: str | Path) -> list[str]:
    """pyproject's runtime dependencies, then `ray[default]==<the pinned Ray version>`."""
    project = tomllib.loads(Path(pyproject).read_text())["project"]
    requirements = [dep.replace(" ", "") for dep in project["dependencies"]]
    ray_versions = [m["version"] for m in map(RAY_PIN.match, requirements) if m]
    if len(ray_versions) != 1:
        raise ValueError(
            f"{pyproject}: expected exactly one pinned ray requirement (ray[...]==X), found {len(ray_versions)}"
        )
    return requirements + [f"ray[default]=={ray_versions[0]}"]


if __name__ == "__main__":
    print("\n".join(image_requirements(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")))
