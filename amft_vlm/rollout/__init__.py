"""The rollout stage: the episode loop (`RolloutEngine`) for every responder, the trajectories it records, and
the expert and SFT data built from the same trajectories.

``from amft_vlm.rollout import RolloutEngine`` is the engine's public path (`amft_vlm.rollout.engine`)."""

from amft_vlm.rollout.engine import Episode, EpisodeSpec, RolloutEngine

__all__ = ["Episode", "EpisodeSpec", "RolloutEngine"]
