"""Gymnasium environments of amft-vlm.

Importing this package registers ``GeneralPoints-v0`` and ``VIRL-v0``; ``gym.make("environments:GeneralPoints-v0")``
imports it for you. Nothing here depends on torch.
"""

import gymnasium as gym

_ENVIRONMENTS = {
    "GeneralPoints-v0": "environments.general_points.env:GeneralPointsEnv",
    "VIRL-v0": "environments.virl.env:VIRLEnv",
}

ENVIRONMENT_IDS = tuple(_ENVIRONMENTS)
"""The ids of amft-vlm's environments."""

for _env_id, _entry_point in _ENVIRONMENTS.items():
    if _env_id not in gym.registry:
        gym.register(id=_env_id, entry_point=_entry_point, disable_env_checker=False)
