"""GeneralPoints: the 24-points card game as a Gymnasium environment (GeneralPoints-v0)."""

from environments.general_points.cards import Card, card_value
from environments.general_points.solver import is_solvable, solvable_hands, solve

__all__ = ["Card", "card_value", "is_solvable", "solvable_hands", "solve"]
