"""The wheel a user pip-installs: built from this tree, installed into a folder of its own, and run
from an empty folder with the source tree off the path. The presets must ship inside it, and no
module with a generic name (`pipelines`) may land at the top of site-packages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """`pip wheel --no-deps .` installed with `pip install --no-deps --target`: the folder holds only
    rsray (its dependencies come from this environment, as they would from the user's)."""
    out = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(REPO), "-w", str(out)], check=True)
    (wheel,) = out.glob("rsray-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(out / "site"), str(wheel)], check=True)
    return wheel


def test_the_wheel_ships_every_preset_and_nothing_generic_at_the_top(installed):
    names = zipfile.ZipFile(installed).namelist()
    dist_info = "-".join(installed.name.split("-")[:2]) + ".dist-info"  # rsray-0.1.0.dist-info
    assert {name.split("/")[0] for name in names} == {"rsray", dist_info}
    shipped = {name.removeprefix("rsray/conf/") for name in names if name.startswith("rsray/conf/")}
    in_tree = {path.relative_to(REPO / "conf").as_posix() for path in (REPO / "conf").rglob("*.yaml")}
    assert shipped == in_tree
    assert {"rsray/pipelines/cli.py", "rsray/pipelines/train.py", "rsray/data/manifest.py"} <= set(names)
    entry_points = zipfile.ZipFile(installed).read(f"{dist_info}/entry_points.txt")
    assert b"rsray = rsray.pipelines.cli:main" in entry_points


def test_the_installed_command_samples_and_prepares_from_an_empty_folder(installed, tmp_path):
    site = installed.parent / "site"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)  # the installed copy only: the working folder is empty, the tree is not on the path
    # A cluster killed without its shutdown leaves its address behind, where a bare ray.init() would
    # join it: rsray without RAY_ADDRESS starts its own Ray regardless. (Short: Ray's socket paths.)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")
    env["RAY_TMPDIR"] = str(ray_tmp)

    def rsray(*args: str) -> str:
        done = subprocess.run(
            [str(site / "bin" / "rsray"), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return done.stdout + done.stderr

    where = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u, rsray; print(rsray.__file__, u.find_spec('pipelines'))"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert where == [str(site / "rsray" / "__init__.py"), "None"]
    rsray("sample", "presets/cpu-tiny", "sample.images=40")
    assert (tmp_path / "data" / "sample-tiny" / "dataset_rsray_sample.json").is_file()
    output = rsray("prepare", "presets/cpu-tiny")
    assert "40 images" in output
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert (tmp_path / "data" / "prepared" / "sample-tiny" / "manifest.json").is_file()
