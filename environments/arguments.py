"""Checks of environment constructor arguments, shared by both environments."""

from __future__ import annotations


def check_choice(name: str, value: object, allowed: tuple) -> None:
    """Raise ValueError naming the argument and its allowed values unless ``value`` is one of them."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}; got {value!r}")
