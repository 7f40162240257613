"""docs/settings.md and ``train --help`` come from the config's field docstrings and the methods table."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_type_hints

import pytest

from amft_vlm.run.config import TrainConfig, load_config
from amft_vlm.settings_docs import PAGE, REGENERATE, first_sentence, markdown, sections

ROOT = Path(__file__).resolve().parents[2]


def config_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every settable key of `cls`, dotted into its sections, walked here apart from the generator."""
    hints = get_type_hints(cls)
    keys = []
    for item in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[item.name]):
            keys += config_keys(hints[item.name], f"{prefix}{item.name}.")
        else:
            keys.append(prefix + item.name)
    return keys


def test_the_committed_settings_page_is_the_generated_one():
    committed = (ROOT / PAGE).read_text()
    assert committed == markdown(), f"{PAGE} is stale (a field docstring or a methods row changed): run {REGENERATE}"


def test_every_setting_is_documented_once_with_its_doc():
    documented = [setting for section in sections() for setting in section.settings]
    assert sorted(setting.key for setting in documented) == sorted(config_keys())
    assert all(setting.doc for setting in documented)


def test_every_default_shown_reads_back_as_the_default():
    """The default a page shows, written as ``key=default``, sets the field to its default: the page can be pasted."""
    overrides = [f"{setting.key}={setting.default}" for section in sections() for setting in section.settings]
    assert load_config(None, overrides) == TrainConfig()


def test_each_method_section_names_the_methods_that_read_it():
    read_by = {section.key: section.read_by for section in sections()}
    assert read_by["luffy"] == ("luffy",)
    assert read_by["relift"] == ("relift",)
    assert set(read_by["controller"]) == {"amft", "no-warmup", "no-meta-gradient", "no-entropy"}
    assert read_by[""] == ()


@dataclass
class ToySection:
    """A toy section."""

    rate: float = 0.5
    """How fast. The rest of the story."""


@dataclass
class ToyConfig:
    """A toy config."""

    name: str | None = None
    """Who it is."""
    tags: list[str] = field(default_factory=lambda: ["a", "b"])
    """Labels (e.g. colours, sizes). More."""
    toy: ToySection = field(default_factory=ToySection)
    """Its section."""


@dataclass
class Undocumented:
    """A config whose second field has no docstring."""

    seen: int = 1
    """Documented."""
    hidden: int = 2


def test_a_toy_config_is_rendered_with_its_sections_types_and_defaults():
    top, toy = sections(ToyConfig)
    assert [(item.key, item.type, item.default, item.doc) for item in top.settings] == [
        ("name", "str | None", "null", "Who it is."),
        ("tags", "list[str]", "[a, b]", "Labels (e.g. colours, sizes). More."),
    ]
    assert (toy.key, toy.doc, [item.key for item in toy.settings]) == ("toy", "A toy section.", ["toy.rate"])
    page = markdown(ToyConfig)
    assert "- `toy.rate` (`float`, default `0.5`): How fast. The rest of the story." in page


def test_a_field_without_a_docstring_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"Undocumented\.hidden has no docstring.*make docs"):
        sections(Undocumented)


@pytest.mark.parametrize(
    ("text", "sentence"),
    [
        ("Step size. More.", "Step size."),
        ("Path like tiny:qwen2.5-vl, e.g. a hub id. More.", "Path like tiny:qwen2.5-vl, e.g. a hub id."),
        ("How theta' moves (Eq. 6 as written. Really). Then more.", "How theta' moves (Eq. 6 as written. Really)."),
        ("No full stop at all", "No full stop at all"),
    ],
)
def test_the_first_sentence(text, sentence):
    assert first_sentence(text) == sentence
