"""The training settings documented from one source: the docstring under each field of `amft_vlm.run.config`.

`markdown` renders ``docs/settings.md`` (every setting with its type, default and whole docstring, and the methods
table with the section each method reads); `train_help` renders the same for ``amft-vlm train --help``, one line
per setting. After editing a field's docstring (or a row of `amft_vlm.learning.methods.METHODS`), regenerate the page with
``make docs``, i.e. ``python -m amft_vlm.settings_docs``; a test fails while the committed page is stale.

This module sits above the config and the methods table, which it reads; the config never imports it.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

from amft_vlm.learning.methods import METHODS
from amft_vlm.run.config import ControllerConfig, MethodSettings, TrainConfig

PAGE = "docs/settings.md"
"""Where `main` writes the page by default, relative to the repository root (the directory ``make docs`` runs in)."""
REGENERATE = "make docs (or: python -m amft_vlm.settings_docs)"
"""The command that rewrites `PAGE`, as the stale-page test and the page's header name it."""
HELP_WIDTH = 100
"""Columns of the settings and methods lists in ``--help`` (argparse prints them as they are)."""


@dataclass(frozen=True)
class Setting:
    """One field of the config as a user writes it."""

    key: str
    """The dotted key of ``key=value`` and of YAML: ``steps``, ``controller.eta_mu``."""
    type: str
    """The field's annotation as written in the source: ``int``, ``float | None``."""
    default: str
    """The default as a YAML value (what ``key=value`` would write to set it): ``0.01``, ``null``, ``[]``."""
    doc: str
    """The field's docstring, its lines joined."""


@dataclass(frozen=True)
class Section:
    """The fields of one dataclass of the config: the top level, ``controller``, or a method's section."""

    key: str
    """The field of `TrainConfig` that holds it (``luffy``); empty for the top level."""
    doc: str
    """The dataclass's docstring."""
    read_by: tuple[str, ...]
    """The methods that read it (empty for the top level, which every method reads)."""
    settings: tuple[Setting, ...]
    """Its fields, in the order of the source."""


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each annotated field of class `cls` (the string literal on the line after it), by name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for statement, following in zip(body, body[1:], strict=False):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[statement.target.id] = inspect.cleandoc(following.value.value)
    return docs


def yaml_text(value: Any) -> str:
    """`value` written as a YAML 1.2 value that `amft_vlm.run.config.parse_yaml` reads back as it: ``None`` -> ``null``,
    ``True`` -> ``true``, ``{"a": 1}`` -> ``{a: 1}``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(yaml_text(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {yaml_text(item)}" for key, item in value.items()) + "}"
    return str(value) if value else '""'


def _default(item: dataclasses.Field) -> str:
    if item.default is not dataclasses.MISSING:
        return yaml_text(item.default)
    if item.default_factory is not dataclasses.MISSING:
        return yaml_text(item.default_factory())
    return "required"


def _settings(cls: type, prefix: str) -> tuple[Setting, ...]:
    """The fields of dataclass `cls` that are not sections, keyed ``PREFIXname``."""
    docs = field_docs(cls)
    hints = get_type_hints(cls)
    found = []
    for item in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[item.name]):
            continue
        if item.name not in docs:
            raise ValueError(
                f"{cls.__name__}.{item.name} has no docstring: write one on the line under the field (it is the setting's "
                f"documentation in {PAGE} and --help), then run {REGENERATE}"
            )
        kind = item.type if isinstance(item.type, str) else getattr(item.type, "__name__", str(item.type))
        found.append(Setting(prefix + item.name, kind, _default(item), " ".join(docs[item.name].split())))
    return tuple(found)


def sections(config: type = TrainConfig) -> list[Section]:
    """Every setting of `config`, by section: the top level first, then each other section (``controller``), then
    each method's section (`amft_vlm.run.config.MethodSettings`), each with the methods that read it (a method section:
    the rows naming it as their ``settings``; the controller's: the rows with a ``controller``)."""
    hints = get_type_hints(config)
    found = [Section("", inspect.getdoc(config) or "", (), _settings(config, ""))]
    nested = [item.name for item in dataclasses.fields(config) if dataclasses.is_dataclass(hints[item.name])]
    nested.sort(key=lambda name: issubclass(hints[name], MethodSettings))
    for name in nested:
        section = hints[name]
        if issubclass(section, MethodSettings):
            read_by = tuple(method.name for method in METHODS.values() if method.settings == name)
        elif issubclass(section, ControllerConfig):
            read_by = tuple(method.name for method in METHODS.values() if method.controller is not None)
        else:
            read_by = ()
        found.append(Section(name, inspect.getdoc(section) or "", read_by, _settings(section, f"{name}.")))
    return found


def first_sentence(text: str) -> str:
    """Up to the first full stop that ends a sentence: followed by a space or the end, outside parentheses, and not
    an abbreviation's (``e.g.``, ``i.e.``, ``Eq. 6``); ``qwen2.5`` has none."""
    depth = 0
    for index, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char != "." or depth > 0 or text[index + 1 : index + 2] not in ("", " "):
            continue
        if not re.search(r"\b(?:e\.g|i\.e|cf|vs|Eq|Eqs|Sec|Fig)$", text[:index]):
            return text[: index + 1]
    return text


def _plain(text: str) -> str:
    """Docstring markup as a terminal shows it: ``code`` and `reference` without their backticks."""
    return text.replace("``", "").replace("`", "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _wrapped(text: str, *, indent: str = "", hanging: str = "  ", width: int = 110) -> str:
    return textwrap.fill(
        text, width=width, initial_indent=indent, subsequent_indent=hanging, break_on_hyphens=False, break_long_words=False
    )


def markdown(config: type = TrainConfig) -> str:
    """The page ``docs/settings.md``: the methods table, then every setting of `config` with its type, default and doc."""
    lines = [
        f"<!-- generated from the field docstrings in amft_vlm/run/config.py and the methods table in amft_vlm/learning/methods.py "
        f"by {REGENERATE}; edit those, not this page -->",
        "# Training settings",
        "",
        _wrapped(
            "Every setting of `amft-vlm train`, with its type, default and documentation. Set them in a YAML config file "
            "(`--config configs/tiny-gp-l.yaml`) or as `key=value` overrides after it; a section's settings are dotted "
            "(`controller.eta_mu=0.1`), or nested in YAML (`controller: {eta_mu: 0.1}`). Values are read as YAML 1.2: "
            "`0.5` is a number, `null` is None, `no` is a string. `amft-vlm train --help` lists the same settings, "
            "one line each.",
            hanging="",
        ),
        "",
        "## Methods",
        "",
        _wrapped(
            "`method: NAME` picks a row of the methods table ([`amft_vlm/learning/methods.py`](../amft_vlm/learning/methods.py)). A "
            "method with a section of its own reads its settings there; changing a section's settings under another "
            "method is refused.",
            hanging="",
        ),
        "",
        "| method | what it does | its section |",
        "|---|---|---|",
    ]
    for method in METHODS.values():
        section = f"[`{method.settings}`](#{method.settings})" if method.settings else ""
        lines.append(f"| `{method.name}` | {_cell(method.description)} | {section} |")
    for section in sections(config):
        lines += ["", "## Top level" if not section.key else f"## `{section.key}`", "", _wrapped(section.doc, hanging="")]
        if section.read_by:
            lines += ["", _wrapped("Read by " + ", ".join(f"`{name}`" for name in section.read_by) + ".", hanging="")]
        lines.append("")
        for setting in section.settings:
            lines.append(_wrapped(f"- `{setting.key}` (`{setting.type}`, default `{setting.default}`): {setting.doc}"))
    return "\n".join(lines) + "\n"


def methods_help() -> str:
    """The methods table for an ``--help`` epilog: one line per row, its name and description."""
    return "methods:\n" + "\n".join(
        _wrapped(f"{name:<17} {method.description}", indent="  ", hanging=" " * 20, width=HELP_WIDTH) for name, method in METHODS.items()
    )


def train_help(config: type = TrainConfig) -> str:
    """``amft-vlm train --help``'s epilog: the methods, then each setting as ``key (type, default): first sentence``."""
    lines = [methods_help(), "", f"settings (key=value; {PAGE} has each one's whole documentation):"]
    for section in sections(config):
        if section.key:
            readers = f" (read by {', '.join(section.read_by)})" if section.read_by else ""
            lines.append(f" {section.key}.*{readers}:")
        for setting in section.settings:
            entry = f"{setting.key} ({setting.type}, {setting.default}): {_plain(first_sentence(setting.doc))}"
            lines.append(_wrapped(entry, indent="  ", hanging="      ", width=HELP_WIDTH))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m amft_vlm.settings_docs [PATH]``: write the settings page to PATH (default `PAGE`)."""
    arguments = sys.argv[1:] if argv is None else argv
    path = Path(arguments[0] if arguments else PAGE)
    path.write_text(markdown())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
