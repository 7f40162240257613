"""Every training method in one table: how it sets mu, the weight of imitation in
``L_total = (1 - mu) * L_RL + mu * L_SFT``, at each step, and so what data its steps need.

A method either follows a **schedule** (a pure function of the config and the step: ``sft``, ``rl``,
``sft-then-rl``, ``fixed-mix``, ``scheduled-mix``) or hands mu to the AMFT **controller**
(`amft_vlm.controller.MuController`), of which the ablations switch one part off (``no-warmup``,
``no-meta-gradient``, ``no-entropy``). The trainer, the config's checks and the documentation read
this table; a method is added by adding a row. Choices that differ between the single-stage peers
(CHORD-phi, DFT, LUFFY, SRFT, ReLIFT), such as how the SFT loss weights each expert token, become
fields of `Method` with a default that keeps the rows above as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from amft_vlm.config import TrainConfig
    from amft_vlm.controller import MuController


@dataclass(frozen=True)
class ControllerUse:
    """Which parts of the AMFT controller a method runs (all of them: AMFT itself)."""

    warmup: bool = True
    """Pure SFT for ``controller.warmup_steps`` steps before the controller starts (else it runs from step 0)."""
    meta: bool = True
    """The meta-gradient term, every ``controller.meta_interval`` steps (validation episodes)."""
    entropy: bool = True
    """The entropy term, every controller step."""


@dataclass(frozen=True)
class Method:
    """One training method: a row of `METHODS`."""

    name: str
    """What ``method:`` in the config says."""
    description: str
    """One line for the documentation and ``--help``."""
    schedule: Callable[[TrainConfig, int], float] | None
    """mu at a (0-based) step, from the config alone; None when the controller decides."""
    controller: ControllerUse | None
    """The controller's parts that run; None for a schedule."""
    uses_expert_data: bool
    """mu > 0 at some step for some valid config: the run needs expert trajectories."""
    collects_rollouts: bool
    """mu < 1 at some step for some valid config: the run plays the policy's own episodes."""


def _sft_only(config: TrainConfig, step: int) -> float:
    return 1.0


def _rl_only(config: TrainConfig, step: int) -> float:
    return 0.0


def _sft_then_rl(config: TrainConfig, step: int) -> float:
    """1 for the first ``sft_then_rl_switch`` of the steps, then 0."""
    return 1.0 if step < round(config.sft_then_rl_switch * config.steps) else 0.0


def _fixed_mix(config: TrainConfig, step: int) -> float:
    return config.fixed_mu


def _cosine_decay(config: TrainConfig, step: int) -> float:
    """``schedule_mu_start`` at step 0 down to ``schedule_mu_end`` at ``schedule_steps`` (all steps when None), then flat."""
    horizon = config.schedule_steps or config.steps
    progress = min(step / max(horizon, 1), 1.0)
    return config.schedule_mu_end + (config.schedule_mu_start - config.schedule_mu_end) * 0.5 * (1 + math.cos(math.pi * progress))


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method(
            "sft", "supervised fine-tuning on the expert dialogues only (mu = 1)",
            schedule=_sft_only, controller=None, uses_expert_data=True, collects_rollouts=False,
        ),
        Method(
            "rl", "reinforcement learning on the policy's own rollouts only (mu = 0)",
            schedule=_rl_only, controller=None, uses_expert_data=False, collects_rollouts=True,
        ),
        Method(
            "sft-then-rl", "SFT for the first sft_then_rl_switch of the steps, then RL (two stages)",
            schedule=_sft_then_rl, controller=None, uses_expert_data=True, collects_rollouts=True,
        ),
        Method(
            "fixed-mix", "a constant mix, mu = fixed_mu",
            schedule=_fixed_mix, controller=None, uses_expert_data=True, collects_rollouts=True,
        ),
        Method(
            "scheduled-mix", "mu decays on a cosine from schedule_mu_start to schedule_mu_end over schedule_steps (CHORD-mu)",
            schedule=_cosine_decay, controller=None, uses_expert_data=True, collects_rollouts=True,
        ),
        Method(
            "amft", "AMFT: SFT warm-up, then the controller moves mu by the entropy term and the meta-gradient",
            schedule=None, controller=ControllerUse(), uses_expert_data=True, collects_rollouts=True,
        ),
        Method(
            "no-warmup", "AMFT without the SFT warm-up: the controller runs from step 0",
            schedule=None, controller=ControllerUse(warmup=False), uses_expert_data=True, collects_rollouts=True,
        ),
        Method(
            "no-meta-gradient", "AMFT without the meta-gradient: the entropy term alone",
            schedule=None, controller=ControllerUse(meta=False), uses_expert_data=True, collects_rollouts=True,
        ),
        Method(
            "no-entropy", "AMFT without the entropy term: the meta-gradient alone",
            schedule=None, controller=ControllerUse(entropy=False), uses_expert_data=True, collects_rollouts=True,
        ),
    )
}
"""The training methods by name, all run by the same loop under the same budget accounting."""


def get_method(name: str) -> Method:
    """The row of `METHODS` called `name`; a ValueError lists the choices."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {name!r}") from None


def method_mu(config: TrainConfig, step: int, controller: MuController | None) -> float:
    """The weight of ``L_SFT`` at `step` (0-based): the method's schedule, or `controller`'s mu (1 in its warm-up)."""
    method = get_method(config.method)
    if method.schedule is not None:
        return method.schedule(config, step)
    if controller is None:
        raise ValueError(f"{method.name} takes mu from its controller: pass build_controller(config)")
    return controller.mu_for_step(step)


def build_controller(config: TrainConfig) -> MuController | None:
    """The mu controller of `config`'s method with the parts it runs (None for a schedule)."""
    use = get_method(config.method).controller
    if use is None:
        return None
    from amft_vlm.controller import MuController  # controller.py imports ControllerUse from here

    return MuController(config.controller, use)
