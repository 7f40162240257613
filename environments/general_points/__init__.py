"""GeneralPoints: the 24-points card game as a Gymnasium environment (GeneralPoints-v0)."""

from environments.general_points.cards import Card, card_value
from environments.general_points.solver import find_solution, is_solvable, solvable_hands, solve

__all__ = ["Card", "card_value", "find_solution", "is_solvable", "solvable_hands", "solve"]
