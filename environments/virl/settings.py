"""The V-IRL settings of the papers, as ``gym.make("VIRL-v0", ...)`` keyword arguments."""

from __future__ import annotations

PAPER_SETTINGS: dict[str, dict[str, str]] = {
    "V-IRL-L id": {"modality": "language", "action_space": "absolute", "city": "builtin"},
    "V-IRL-L ood-rule": {"modality": "language", "action_space": "relative", "city": "builtin"},
    "V-IRL-VL id": {"modality": "vision", "action_space": "absolute", "city": "builtin"},
    "V-IRL-VL ood-rule": {"modality": "vision", "action_space": "relative", "city": "builtin"},
    "V-IRL-VL ood-visual": {"modality": "vision", "action_space": "absolute", "city": "builtin-ood"},
}
"""Setting name -> keyword arguments of ``gym.make("VIRL-v0", ...)`` (Chu et al., 2025).

Training and in-distribution use absolute (compass) actions; the rule-OOD test asks for relative
turns; the visual-OOD test walks the differently styled ``builtin-ood`` cities (the papers used the
"VLN mini" cities; pass ``data_dir`` instead of ``city`` to use the published databases).
"""

PAPER_EPISODES: dict[str, int] = {"id": 48, "ood-rule": 48, "ood-visual": 18}
"""Routes per evaluation in the papers."""
