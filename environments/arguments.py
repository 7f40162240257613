"""Checks of environment arguments (constructor and ``reset`` options), shared by both environments."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def check_choice(name: str, value: object, allowed: tuple) -> None:
    """Raise ValueError naming the argument and its allowed values unless ``value`` is one of them."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}; got {value!r}")


def reset_options(options: object, allowed: dict[str, str]) -> dict[str, Any]:
    """``reset``'s `options` checked: None or a dict whose keys are all in `allowed` (key -> what it takes).

    A ValueError says what is accepted, so a misspelt option is never silently ignored.
    """
    if options is None:
        return {}
    accepted = "; ".join(f"{key!r}: {meaning}" for key, meaning in allowed.items())
    if not isinstance(options, Mapping):
        raise ValueError(f"reset options must be a dict or None ({accepted}); got {type(options).__name__} {options!r}")
    unknown = [key for key in options if key not in allowed]
    if unknown:
        raise ValueError(f"unknown reset option(s) {unknown}; this environment takes {accepted}")
    return dict(options)
