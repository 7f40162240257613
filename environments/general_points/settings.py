"""The GeneralPoints settings of the papers, as ``gym.make`` keyword arguments."""

from __future__ import annotations

PAPER_SETTINGS: dict[str, dict[str, str]] = {
    "GP-L id": {"modality": "language", "face_cards": "10", "suits": "mixed"},
    "GP-L ood-rule": {"modality": "language", "face_cards": "11-12-13", "suits": "mixed"},
    "GP-VL id": {"modality": "vision", "face_cards": "10", "suits": "black"},
    "GP-VL ood-rule": {"modality": "vision", "face_cards": "11-12-13", "suits": "black"},
    "GP-VL ood-visual": {"modality": "vision", "face_cards": "10", "suits": "red"},
}
"""Setting name -> keyword arguments of ``gym.make("GeneralPoints-v0", ...)`` (Chu et al., 2025, table of settings).

In-distribution training uses the face-10 rule; the rule-OOD test counts J, Q, K as 11, 12, 13
with one face card forced; the visual-OOD test shows red suits to a model trained on black ones.
"""

PAPER_EPISODES = 234
"""Episodes per setting in the papers' evaluations."""
