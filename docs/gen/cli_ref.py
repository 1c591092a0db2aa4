"""CLI reference, generated from the argument parsers at build time.

The `rsray` command's module is the one pyproject.toml's `[project.scripts]` names; its `STAGES`
maps each stage to (module, summary), and each stage module's `main(["--help"])` prints its
parser's help, captured here. No module path is written here: moving a command's module moves
nothing in the docs. `python docs/gen/cli_ref.py` prints the page.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys
from pathlib import Path
from types import ModuleType

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomllib is 3.11's
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _import(name: str) -> ModuleType:
    """Module `name`, also from the source tree when the installed package predates a move: a
    package that pyproject maps to a folder (`"rsray.pipelines" = "pipelines"`) is tried under the
    folder's name with the repository root on the path."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        package_dir = _pyproject().get("tool", {}).get("setuptools", {}).get("package-dir", {})
        for package, folder in package_dir.items():
            if name == package or name.startswith(package + "."):
                if str(ROOT) not in sys.path:
                    sys.path.append(str(ROOT))
                return importlib.import_module(folder.replace("/", ".") + name[len(package) :])
        raise


def command_module() -> ModuleType:
    """The module of the `rsray` console script (pyproject.toml), which holds STAGES and main."""
    target = _pyproject()["project"]["scripts"]["rsray"]
    return _import(target.split(":")[0])


def stage_module(cli: ModuleType, module: str) -> ModuleType:
    """A STAGES entry: an absolute module path, or a name relative to the command's package."""
    if "." in module:
        return _import(module)
    return importlib.import_module(f"{cli.__package__}.{module}")


def help_text(main, argv: list[str]) -> str:
    """What `main(argv)` prints (argparse's --help exits through SystemExit), at 100 columns."""
    out = io.StringIO()
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps at $COLUMNS: the page does not depend on the terminal
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            try:
                main(argv)
            except SystemExit:
                pass
    finally:
        if columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = columns
    return out.getvalue().rstrip()


def _fence(text: str) -> list[str]:
    return ["```text", *text.splitlines(), "```", ""]


def cli_page() -> str:
    cli = command_module()
    out = [
        "# CLI reference",
        "",
        "Generated when the docs are built: each stage's `--help`, as its argument parser prints it.",
        "Every stage is also `python -m MODULE` with the same arguments (the module is named below).",
        "How configs and `key=value` overrides work: [Configs](../guide/configs.md); every key:",
        "[Config reference](config.md); exit codes: [What rsray promises](../promises.md#exit-codes).",
        "",
        "## `rsray`",
        "",
        *_fence(help_text(cli.main, ["--help"])),
    ]
    for name, (module, summary) in cli.STAGES.items():
        stage = stage_module(cli, module)
        out += [f"## `rsray {name}` {{#{name}}}", "", f"{summary} (`{stage.__name__}`)", ""]
        out += _fence(help_text(stage.main, ["--help"]))
    return "\n".join(out)


if __name__ == "__main__":
    print(cli_page())
