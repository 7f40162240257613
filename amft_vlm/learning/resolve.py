"""A config's method resolved once: its row of the methods table, checked against the settings that depend on it.

`amft_vlm.run.config` is the ground floor and does not know the methods table; this module stands one floor up and
is where a run's ``method`` name turns into its `Method` row, once. The trainer, the budget estimate and the
checkpoint checks call `resolve_method` at their entry and hand the row down.
"""

from __future__ import annotations

import dataclasses

from amft_vlm.learning.methods import METHODS, Method, get_method
from amft_vlm.run.config import TrainConfig


def resolve_method(config: TrainConfig) -> Method:
    """`config`'s method row, after checking what depends on it; a ValueError says what to change.

    A per-method section changed from its defaults under another method is refused (it would have no effect:
    most likely the method is not the one meant), naming the setting and the method that reads it.
    """
    method = get_method(config.method)
    for key, section in config.method_sections().items():
        if key == method.settings:
            continue
        changed = [item.name for item in dataclasses.fields(section) if getattr(section, item.name) != getattr(type(section)(), item.name)]
        if changed:
            readers = [name for name, row in METHODS.items() if row.settings == key]
            raise ValueError(
                f"{key}.{changed[0]} is a setting of {', '.join(readers)}, but method is {method.name}: remove it, or set "
                f"method: {readers[0]}"
            )
    if (method.expert_in_group or method.sft_buffer) and config.advantage != "grpo":
        raise ValueError(f"{method.name} computes group advantages (its expert trajectories have no critic values); set advantage: grpo")
    if method.rl_objective == "luffy" and config.credit != "episode":
        raise ValueError("luffy's advantages are its joint group's mean-centred episode returns; set credit: episode")
    if method.expert_in_group and config.group_size < 2:
        raise ValueError(f"group_size must be >= 2 for {method.name}: each group is group_size - 1 rollouts plus one expert trajectory")
    if method.sft_buffer and config.relift.rl_loss == "released" and config.credit != "episode":
        raise ValueError(
            "relift's released form mean-centres each group's episode returns (no std, no per-turn credit); "
            "set credit: episode, or relift.rl_loss: paper for the run's GRPO estimator"
        )
    use, controller = method.controller, config.controller
    if use is not None and controller.mu_max >= 1.0:
        raise ValueError(
            f"controller.mu_max must be < 1 for {method.name}: at mu = 1 no rollouts are collected, so the controller "
            "would have no entropy or meta signal left to move mu back; the released value is 0.95"
        )
    if use is not None and use.warmup and controller.warmup_steps >= config.steps:
        raise ValueError(f"controller.warmup_steps must be in [0, steps) = [0, {config.steps}); got {controller.warmup_steps}")
    if config.expert_data_after_warmup is not None and (use is None or not use.warmup):
        raise ValueError(
            f"expert_data_after_warmup replaces the expert data when the controller's warm-up ends; {method.name} has no "
            "such warm-up (use amft, no-meta-gradient or no-entropy), or leave it null"
        )
    return method

