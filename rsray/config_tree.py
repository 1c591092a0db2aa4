"""Config trees: YAML files (with their `defaults:` chains and the shipped presets) and `key=value`
overrides merged into one tree that remembers where each key was set, then typed into dataclasses
with one-line errors naming the key and its source. `rsray.config` builds the Config from these;
sweep files, which embed a training config, use them too.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

COMMAND_LINE = "command line"


def _conf_dir() -> Path:
    """The shipped configs: `rsray/conf` in an installed wheel, the repository's `conf/` in a source
    checkout (pyproject.toml installs the one as the other)."""
    here = Path(__file__).resolve().parent
    return here / "conf" if (here / "conf").is_dir() else here.parent / "conf"


CONF_DIR = _conf_dir()


class ConfigError(ValueError):
    """A config problem a user can fix; the message is one line naming the key and its source."""


def find_config_file(path: str | Path, what: str = "config file") -> Path:
    """A path as given, or a name under the project's conf/ folder (`presets/cpu-tiny`)."""
    path = Path(path)
    for candidate in (path, path.with_suffix(".yaml"), CONF_DIR / path, (CONF_DIR / path).with_suffix(".yaml")):
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"{path}: {what} not found")


def read_yaml_mapping(path: Path, loader: type = yaml.SafeLoader) -> dict[str, Any]:
    """A YAML file's top-level mapping; a ConfigError naming the file (and line) otherwise."""
    try:
        loaded = yaml.load(path.read_text(), Loader=loader) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return loaded


def pop_defaults(loaded: dict[str, Any], path: Path) -> list[Path]:
    """The `defaults:` list of a loaded file, removed from it, as paths relative to the file."""
    defaults = loaded.pop("defaults", [])
    if not isinstance(defaults, list):
        raise ConfigError(f"{path}: defaults: expected a list of YAML files")
    return [path.parent / str(parent) for parent in defaults]


def merge_config_file(path: Path, tree: dict, origins: dict, seen: tuple[Path, ...] = ()) -> None:
    """Merge a config file, after its defaults chain, into `tree`; `origins` records each key's file."""
    path = find_config_file(path)
    if path in seen:
        raise ConfigError(f"{path}: defaults: cycle through {' -> '.join(map(str, seen))}")
    loaded = read_yaml_mapping(path)
    for parent in pop_defaults(loaded, path):
        merge_config_file(parent, tree, origins, seen + (path,))
    merge_into(tree, loaded, origins, str(path))


def parse_override(item: str, loader: type = yaml.SafeLoader) -> tuple[str, Any]:
    """`key=value` from the command line -> (key, value read as YAML, or the text as is)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{COMMAND_LINE}: {item!r}: expected key=value")
    try:
        value = yaml.load(raw, Loader=loader) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def nest(dotted: str, value: Any) -> dict:
    """`a.b.c`, v -> {a: {b: {c: v}}}."""
    node: Any = value
    for part in reversed(dotted.split(".")):
        node = {part: node}
    return node


def merge_into(tree: dict, update: dict, origins: dict, source: str, prefix: str = "") -> None:
    """Merge `update` into `tree` (mappings recursively, anything else replaced) and record
    `source` as the origin of every key it sets."""
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            merge_into(tree[key], value, origins, source, prefix=f"{dotted}.")
        else:
            tree[key] = value
        if not isinstance(value, dict):
            origins[dotted] = source
        else:
            origins.setdefault(dotted, source)
            record_leaves(value, origins, source, f"{dotted}.")


def record_leaves(node: dict, origins: dict, source: str, prefix: str) -> None:
    for key, value in node.items():
        origins[f"{prefix}{key}"] = source
        if isinstance(value, dict):
            record_leaves(value, origins, source, f"{prefix}{key}.")


def build_section(cls: type, data: Any, prefix: str, origins: dict[str, str]):
    """Construct dataclass `cls` from plain data, refusing unknown keys and wrong types."""

    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(f"{origins.get(key, origins.get(prefix.rstrip('.'), 'defaults'))}: {key}: {problem}")

    if not isinstance(data, dict):
        raise fail(prefix.rstrip("."), f"expected a mapping, got {value_kind(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "origins"}
    for key in data:
        if key not in fields:
            close = ", ".join(sorted(fields))
            raise fail(f"{prefix}{key}", f"unknown key (known keys here: {close})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build_section(hint, value, f"{key}.", origins)
        else:
            kwargs[name] = coerce(value, hint, key, fail)
    obj = cls(**kwargs)
    for name, problem in obj.check():
        raise fail(f"{prefix}{name}", problem)
    return obj


def coerce(value: Any, hint: Any, key: str, fail) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for alternative in inner[1:]:  # `int | list[int]`: a list takes the list alternative
            if typing.get_origin(alternative) is list and isinstance(value, list):
                return coerce(value, alternative, key, fail)
        return coerce(value, inner[0], key, fail)
    if origin is dict or hint is Any:
        if origin is dict and not isinstance(value, dict):
            raise fail(key, f"expected a mapping, got {value_kind(value)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise fail(key, f"expected a list, got {value_kind(value)}")
        return [coerce(v, args[0], key, fail) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as text
        try:
            return float(value)
        except ValueError:
            raise fail(key, f"expected float, got {value_kind(value)}") from None
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # names such as `name=2024` are strings
    if hint is bool and not isinstance(value, bool):
        raise fail(key, f"expected true or false, got {value_kind(value)}")
    if hint is int and isinstance(value, bool):
        raise fail(key, f"expected int, got {value_kind(value)}")
    if not isinstance(value, hint):
        raise fail(key, f"expected {hint.__name__}, got {value_kind(value)}")
    return value


def value_kind(value: Any) -> str:
    """How an error message shows a value: `str 'big'`, `null`, `list`."""
    if value is None:
        return "null"
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (dict, list)) else type(value).__name__
