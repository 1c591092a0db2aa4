"""Config reference, generated from the config dataclasses at build time.

Every key of every section `rsray.config.Config` holds (and the `sweep:` section of a sweep file),
and every key of each registered model's config dataclass, with its type, its default and one
line of meaning. The meaning is the field's own `# comment` in the source: the comment lines just
above the field, then the comment trailing its line; a field without one falls back to the
sentence of its class docstring that names it, else the class docstring's first sentence.

Run by the mkdocs hook (docs/gen/hooks.py); `python docs/gen/config_ref.py` prints both pages.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import io
import json
import re
import textwrap
import tokenize
import typing
from pathlib import Path
from typing import Any

import rsray

RSRAY_DIR = Path(rsray.__file__).resolve().parent
SKIP_FIELDS = {"origins"}  # Config's bookkeeping of where each key was set, not a key


# ----------------------------------------------------------------------------- reading comments


def _is_group_label(comment: str) -> bool:
    """A short comment line without punctuation (`# SFGS`, `# loss and optimisation`) that heads a
    group of fields."""
    return len(comment.split()) <= 4 and not re.search(r"[:;,=().|`]", comment)


def _own_comments(cls: type) -> dict[str, str]:
    """Field name -> its comment text, for the fields declared in `cls`'s own class body."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    comment_at: dict[int, str] = {}  # 1-based line -> comment text (without '#')
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comment_at[tok.start[0]] = tok.string.lstrip("#").strip()
    classdef = next(node for node in ast.parse(source).body if isinstance(node, ast.ClassDef))
    found = {}
    for stmt in classdef.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above = []
        line = stmt.lineno - 1
        while line >= 1 and lines[line - 1].strip().startswith("#"):
            above.insert(0, comment_at.get(line, ""))
            line -= 1
        trailing = [
            comment_at[n]
            for n in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1)
            if n in comment_at and not lines[n - 1].strip().startswith("#")
        ]
        if len(above) == 1 and _is_group_label(above[0]):
            above = []  # `# SFGS`, `# text`: a heading over the fields that follow, not this one's meaning
        above_text, trailing_text = " ".join(p for p in above if p), " ".join(p for p in trailing if p)
        if above_text and trailing_text:  # the line's own comment (often its values) first
            text = trailing_text + ("" if trailing_text[-1] in ".;:" else ".") + " " + above_text
        else:
            text = above_text or trailing_text
        if text:
            found[stmt.target.id] = text
    return found


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.])\s+(?=[A-Z`(])", " ".join(text.split())) if s.strip()]


UNCOMMENTED: list[str] = []  # keys whose meaning fell back to the class docstring (the hook logs them)


def field_meanings(cls: type) -> dict[str, tuple[str, bool]]:
    """Every field of dataclass `cls` -> (one line of meaning, whether it is the field's own
    comment); see the module docstring."""
    per_class = [(klass, _own_comments(klass)) for klass in cls.__mro__ if dataclasses.is_dataclass(klass)]
    hints = typing.get_type_hints(cls)
    meanings = {}
    for f in dataclasses.fields(cls):
        text = next((comments[f.name] for _, comments in per_class if f.name in comments), "")
        if not text and f.name not in SKIP_FIELDS and not dataclasses.is_dataclass(hints[f.name]):
            UNCOMMENTED.append(f"{cls.__qualname__}.{f.name}")
        if not text:
            for klass, _ in per_class:
                doc = inspect.getdoc(klass) or ""
                named = [s for s in _sentences(doc) if re.search(rf"\b{re.escape(f.name)}\b", s)]
                if named:
                    text = " ".join(named)
                    break
        if not text:
            text = next((_sentences(inspect.getdoc(k) or "")[0] for k, _ in per_class if inspect.getdoc(k)), "")
        meanings[f.name] = (text, any(f.name in comments for _, comments in per_class))
    return meanings


# ----------------------------------------------------------------------------- formatting


def _md_cell(text: str) -> str:
    """Text for a Markdown table cell: code spans kept as they are; `\\`, `|`, `<`, `*` and `{`
    outside them escaped."""
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) > 1:
            out.append(part)  # python-markdown's tables split no cell at a pipe inside a code span
        else:
            for char, escaped in (("\\", "\\\\"), ("|", "\\|"), ("<", "&lt;"), ("*", "\\*"), ("{", "&#123;")):
                part = part.replace(char, escaped)  # `{` would start an attribute list (attr_list)
            out.append(part)
    return "".join(out)


def meaning_cell(meaning: tuple[str, bool]) -> str:
    """A meaning for the table; one taken from the class docstring is in italics: it is about the
    section, not the key."""
    text, own = meaning
    return _md_cell(text) if own or not text else f"*{_md_cell(text)}*"


def _code(text: str) -> str:
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def format_default(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "(required)"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return _code(value) if value else '`""`'
    if isinstance(value, (list, tuple, dict)):
        return _code(json.dumps(value, separators=(", ", ": ")))
    return _code(repr(value))


def format_type(f: dataclasses.Field, hint: Any) -> str:
    text = f.type if isinstance(f.type, str) else getattr(hint, "__name__", str(hint))
    return _code(text.replace("typing.", ""))


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _row(key: str, f: dataclasses.Field, hint: Any, default: Any, meaning: tuple[str, bool]) -> str:
    return f"| `{key}` | {format_type(f, hint)} | {format_default(default)} | {meaning_cell(meaning)} |"


def rows(cls: type, prefix: str, defaults: Any = None) -> list[str]:
    """Table rows for every key of dataclass `cls`, nested dataclasses flattened (`augment.crop`).
    `defaults`: an instance whose values are the defaults (a parent's default_factory may differ
    from the class's own)."""
    hints = typing.get_type_hints(cls)
    meanings = field_meanings(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in SKIP_FIELDS:
            continue
        default = getattr(defaults, f.name) if defaults is not None else default_of(f)
        if dataclasses.is_dataclass(hints[f.name]):
            out += rows(hints[f.name], f"{prefix}{f.name}.", default)
        else:
            out.append(_row(f"{prefix}{f.name}", f, hints[f.name], default, meanings[f.name]))
    return out


TABLE_HEAD = ["| key | type | default | meaning |", "|---|---|---|---|"]


def section(title: str, cls: type, prefix: str, defaults: Any = None, level: int = 2, anchor: str = "") -> list[str]:
    """A heading, the class docstring and the key table of one config section (sub-sections, i.e.
    fields typed as dataclasses, get their own headings)."""
    hints = typing.get_type_hints(cls)
    plain = [
        f for f in dataclasses.fields(cls) if f.name not in SKIP_FIELDS and not dataclasses.is_dataclass(hints[f.name])
    ]
    nested = [f for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])]
    heading = "#" * level + f" `{title}`" + (f" {{#{anchor}}}" if anchor else "")
    out = [
        heading,
        "",
        f"*{cls.__qualname__}* (`{cls.__module__}`): {' '.join((inspect.getdoc(cls) or '').split())}",
        "",
    ]
    if plain:
        meanings = field_meanings(cls)
        out += TABLE_HEAD
        for f in plain:
            default = getattr(defaults, f.name) if defaults is not None else default_of(f)
            out.append(_row(f"{prefix}{f.name}", f, hints[f.name], default, meanings[f.name]))
        out.append("")
    for f in nested:
        default = getattr(defaults, f.name) if defaults is not None else default_of(f)
        out += section(f"{prefix}{f.name}", hints[f.name], f"{prefix}{f.name}.", default, level + 1)
    return out


# ----------------------------------------------------------------------------- finding classes


def find_class(name: str) -> type:
    """The class `name` defined somewhere under rsray/, found by reading the sources (modules are
    being moved: no module path is hard-coded here)."""
    pattern = re.compile(rf"^class {re.escape(name)}\b", re.M)
    for path in sorted(RSRAY_DIR.rglob("*.py")):
        if pattern.search(path.read_text(encoding="utf-8")):
            module = ".".join(("rsray",) + path.relative_to(RSRAY_DIR).with_suffix("").parts)
            return getattr(importlib.import_module(module), name)
    raise LookupError(f"no class {name} under {RSRAY_DIR}")


# ----------------------------------------------------------------------------- the pages


def config_page() -> str:
    from rsray.config import Config

    hints = typing.get_type_hints(Config)
    out = [
        "# Config reference",
        "",
        "Generated when the docs are built, from the config dataclasses (`rsray.config.Config` and",
        "what it holds): every key, its type, its default and its meaning, which is the comment next to",
        "the field in the source (in italics where a field has none: its section's docstring). Set a",
        "key in a YAML file (`train:` then `epochs: 3`) or on the command",
        "line (`train.epochs=3`); how files and overrides combine: [Configs](../guide/configs.md). The",
        "`model:` section is typed by the model named in `model.name`: [Model config](model-config.md).",
        "",
    ]
    sections = [f for f in dataclasses.fields(Config) if f.name not in SKIP_FIELDS]
    out.append(
        "Sections: "
        + ", ".join(f"[`{f.name}`](#{f.name})" for f in sections)
        + ", [`sweep`](#sweep) (sweep files only), [`smr`](#smr)."
    )
    out.append("")
    for f in sections:
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += section(f.name, hint, f"{f.name}.", anchor=f.name)
        else:
            meaning, _ = field_meanings(Config)[f.name]
            out += [
                f"## `{f.name}` {{#{f.name}}}",
                "",
                f"Type {format_type(f, hint)}. {_md_cell(meaning)} Its keys per model:",
                "[Model config](model-config.md).",
                "",
            ]
    sweep = find_class("SweepSettings")
    out += section("sweep", sweep, "sweep.", anchor="sweep")
    out += [
        "A sweep file is a training config plus this section; `space` maps any config key (above, or",
        "`model.*`) to `{grid|choice|uniform|loguniform|randint: [...]}`, and an `smr` sweep's space",
        "takes the keys below. See [Sweeps](../guide/sweeps.md).",
        "",
    ]
    out += section("smr", find_class("SMRConfig"), "smr.", anchor="smr")
    out += [
        "SMR's knobs are not a section of a config file: they are the space of an `smr` sweep",
        "(`smr.k: {grid: [...]}`) and the options `--smr-k`, `--smr-w` and `--smr-beta` of",
        "`rsray evaluate` and `rsray metrics`. See [Evaluate and SMR](../guide/evaluate.md#smr).",
        "",
    ]
    return "\n".join(out)


def registered() -> list[tuple[str, type, type]]:
    """(name, model class, config dataclass) for every registered model."""
    import rsray.models  # noqa: F401  (importing the package registers every model)
    from rsray.models import registry

    return [(name, *registry._MODELS[name]) for name in registry.registered_models()]


def model_config_page() -> str:
    models = registered()
    out = [
        "# Model config",
        "",
        "Generated when the docs are built, from each registered model's config dataclass",
        "(`rsray.models.registry`): the keys of the `model:` section when `model.name` names that model.",
        "Optimiser keys (`lr`, `schedule`, ...) mean the same in every model (`rsray.optim`); nested",
        "sections are flattened (`augment.crop` is `model.augment.crop`). A meaning in italics is the",
        "class docstring's, where the field has no comment of its own. The other sections:",
        "[Config reference](config.md). What each model is: [Models](../models/index.md).",
        "",
        "Models: " + ", ".join(f"[`{name}`](#{name})" for name, _, _ in models) + ".",
        "",
    ]
    for name, model_cls, config_cls in models:
        module = inspect.getmodule(model_cls)
        doc = inspect.getdoc(module) or ""
        out += [
            f"## `{name}` {{#{name}}}",
            "",
            f"`model.name: {name}` builds *{model_cls.__qualname__}* (`{model_cls.__module__}`), configured by",
            f"*{config_cls.__qualname__}*: {' '.join((inspect.getdoc(config_cls) or '').split())}",
            "",
        ]
        if doc:
            out += [f'??? abstract "The module\'s docstring (`{module.__name__}`)"', "", "    ```text"]
            out += [f"    {line}" if line else "" for line in doc.splitlines()]
            out += ["    ```", ""]
        out += TABLE_HEAD
        out.append(f"| `name` | `str` | `{name}` | the registered model this section configures |")
        out += rows(config_cls, "")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(config_page())
    print(model_config_page())
