"""Every training method in one table: how it sets mu, the weight of imitation in
``L_total = (1 - mu) * L_RL + mu * L_SFT``, at each step, and so what data its steps need.

A method either follows a **schedule** (a pure function of the config and the step: ``sft``, ``rl``,
``sft-then-rl``, ``fixed-mix``, ``scheduled-mix``) or hands mu to the AMFT **controller**
(`amft_vlm.learning.controller.MuController`), of which the ablations switch one part off (``no-warmup``,
``no-meta-gradient``, ``no-entropy``). Each row also names its advantage estimator (an entry of
`amft_vlm.learning.advantages.ADVANTAGE_ESTIMATORS`) and its objectives (entries of `amft_vlm.learning.objectives.OBJECTIVES`).
The trainer, the config's checks and the documentation read this table; a method is added by adding a row
(and, if the method needs one, an estimator or an objective to its table).

The single-stage peers (``../shared/spec/peers.md``) differ in what their losses weigh, not in the loop,
and each difference is a field of `Method` whose default keeps the rows before them as they were. Each
follows its authors' released code by default, with the paper's form a setting where the two differ
(``docs/peers.md`` lists every such point with its code line and equation):

| method | mu | L_SFT's token weight | L_RL | expert trajectories |
|---|---|---|---|---|
| ``scheduled-mix`` (CHORD-mu) | cosine from 0.9 down to 0.05 over ``schedule_steps`` = 200 steps, then flat (no warm-up) | 1 | PPO-clip, group advantages | the expert batch |
| ``chord-phi`` | ``fixed_mu``, or the cosine schedule (``chord_phi.mu: scheduled``) | sg(p(1-p)) | PPO-clip, group advantages | the expert batch |
| ``dft`` | 1 | sg(p) | none | the expert batch |
| ``luffy`` | 0 | none | unclipped ratio on rollouts, p/(p+gamma) on the expert's tokens, token sum / max_new_tokens, - 0.001 x mean entropy | one joins each group (G-1 rollouts + 1), advantages over the joint group, mean-centred |
| ``srft`` | 0 | inside L_RL: 0.5 sg(exp(+H_t)) NLL on the demonstration's tokens | demonstration: -A p/(p+0.1); self-RL: -A x ratio (PPO-clip), x 0.1 sg(exp(H_t)) where A > 0; one token mean; - 0.001 x mean entropy | one joins each group (G-1 rollouts + 1), GRPO advantages over the joint group |
| ``relift`` | 0, but one SFT update (its own AdamW, NLL - 0.001 H) after the RL update whenever the buffer is full | none | released form (default): unclipped ratio, mean-centred advantages, token sum / max_new_tokens, - 0.001 x mean entropy; ``relift.rl_loss: paper``: PPO-clip, group advantages | start states whose G rollouts all failed, with their expert trajectory, wait in a buffer of ``relift.buffer_ratio x episodes_per_step``, newest first |

Multi-turn episodes: an expert trajectory is a whole dialogue (every turn of an episode, V-IRL's restarts
included) and only the expert's answer tokens are trained; per-token weights (p, p(1-p), the shaping
p/(p+gamma)) act on each answer token, whichever turn it is in; a group's advantage is per episode
(LUFFY: the joint group's mean-centred returns, credit: episode only; SRFT: the run's GRPO estimator over the
joint group, per episode or per turn with ``credit``) and every token of its turn gets it. The demonstrations in
a group are scored at the sampling temperature like the rollouts (CHORD-phi's, DFT's and ReLIFT's expert batches
at 1, as SFT's); with ``temperature: 1`` (the papers') the two agree. ``chord-phi`` takes ``fixed_mu``, whose
default is 0.5; CHORD-phi reports 0.1 (set it, as ``configs/compare-gp-vl.yaml`` does). LUFFY and SRFT count one
expert example per group and step; ``entropy_rl`` and ``tokens_rl`` of their passes include the demonstration's
tokens. The methods whose
groups hold an expert trajectory, and ReLIFT, whose buffer needs one per start state, draw their
rollouts' start states from the expert set, so each group's demonstration starts where its rollouts do: they
revisit the expert set's start states (up to ``expert_episodes`` of them), while the other methods play fresh
training seeds each step; their training success curves are on that set.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from amft_vlm.run.config import ControllerUse, TrainConfig

if TYPE_CHECKING:
    from amft_vlm.learning.controller import MuController


def _grpo_or_gae(config: TrainConfig) -> str:
    """GRPO's group baseline, or GAE over a critic's values with ``advantage: ppo``."""
    return "gae" if config.advantage == "ppo" else "grpo"


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
    """The run trains on expert trajectories at some step (mu > 0, or inside its RL objective)."""
    collects_rollouts: bool
    """mu < 1 at some step for some valid config: the run plays the policy's own episodes."""
    advantage: Callable[[TrainConfig], str] = _grpo_or_gae
    """The run's advantage estimator, a key of `amft_vlm.learning.advantages.ADVANTAGE_ESTIMATORS`, from its config: by
    default ``grpo``, or ``gae`` with a critic (``advantage: ppo``)."""
    sft_objective: str = "nll"
    """``L_SFT``, a key of `amft_vlm.learning.objectives.OBJECTIVES` weighing each expert token: nll (1), chord_phi
    (sg(p(1-p))), dft (sg(p))."""
    rl_objective: str = "clipped"
    """``L_RL``, a key of `amft_vlm.learning.objectives.OBJECTIVES`: clipped (PPO-clip on group advantages), luffy
    (`amft_vlm.learning.losses.luffy_policy_loss`), srft (`amft_vlm.learning.losses.srft_loss`) or relift (its released form,
    `amft_vlm.learning.losses.relift_policy_loss`, or the paper's PPO-clip)."""
    expert_in_group: bool = False
    """One expert trajectory joins each group of rollouts (which then has group_size - 1 rollouts)."""
    rollouts_from_expert_states: bool = False
    """Rollouts start from the expert set's start states, so each group has its demonstration."""
    sft_buffer: bool = False
    """ReLIFT: start states whose rollouts all failed buffer their expert trajectory for an SFT update."""
    settings: str | None = None
    """The key of the `amft_vlm.run.config.TrainConfig` section this method reads (`amft_vlm.run.config.MethodSettings`),
    e.g. ``luffy``; None: none."""


def _mean_centred(config: TrainConfig) -> str:
    """LUFFY's released code: the joint group's mean-centred returns, no std."""
    return "mean_centred"


def _relift_advantage(config: TrainConfig) -> str:
    """ReLIFT's released code mean-centres the group's returns (no std); its paper's form is GRPO's."""
    return "mean_centred" if config.relift.rl_loss == "released" else "grpo"


def _sft_only(config: TrainConfig, step: int) -> float:
    return 1.0


def _rl_only(config: TrainConfig, step: int) -> float:
    return 0.0


def _sft_then_rl(config: TrainConfig, step: int) -> float:
    """1 for the first ``sft_then_rl.switch`` of the steps, then 0."""
    return 1.0 if step < round(config.sft_then_rl.switch * config.steps) else 0.0


def _fixed_mix(config: TrainConfig, step: int) -> float:
    return config.fixed_mu


def _cosine_decay(config: TrainConfig, step: int) -> float:
    """CHORD's mu schedule (Trinity-RFT's ``mu_schedule_function``): from 0 up to ``schedule_mu_start`` over
    ``schedule_warmup_steps`` linearly, then down to ``schedule_mu_end`` on a cosine over ``schedule_steps`` (every
    step left when None), then flat. CHORD-mu: no warm-up, 0.9 down to 0.05 over 200 steps."""
    warmup = config.schedule_warmup_steps
    if step < warmup:
        return step / warmup * config.schedule_mu_start
    horizon = config.schedule_steps or config.steps - warmup
    progress = min((step - warmup) / max(horizon, 1), 1.0)
    return config.schedule_mu_end + (config.schedule_mu_start - config.schedule_mu_end) * 0.5 * (1 + math.cos(math.pi * progress))


def _chord_mu(config: TrainConfig, step: int) -> float:
    """CHORD-phi's mu: ``fixed_mu`` (CHORD reports 0.1), or the cosine schedule with ``chord_phi.mu: scheduled``."""
    return config.fixed_mu if config.chord_phi.mu == "fixed" else _cosine_decay(config, step)


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
            "sft-then-rl", "SFT for the first sft_then_rl.switch of the steps, then RL (two stages)",
            schedule=_sft_then_rl, controller=None, uses_expert_data=True, collects_rollouts=True, settings="sft_then_rl",
        ),
        Method(
            "fixed-mix", "a constant mix, mu = fixed_mu",
            schedule=_fixed_mix, controller=None, uses_expert_data=True, collects_rollouts=True,
        ),
        Method(
            "scheduled-mix", "CHORD-mu: mu decays on a cosine from schedule_mu_start (0.9) to schedule_mu_end (0.05) over schedule_steps (200)",
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
        Method(
            "chord-phi", "CHORD-phi: the mix with each expert token weighted by sg(p(1-p)); mu = fixed_mu or scheduled (chord_phi.mu)",
            schedule=_chord_mu, controller=None, uses_expert_data=True, collects_rollouts=True, sft_objective="chord_phi",
            settings="chord_phi",
        ),
        Method(
            "dft", "dynamic fine-tuning: SFT with each expert token weighted by sg(p) (mu = 1)",
            schedule=_sft_only, controller=None, uses_expert_data=True, collects_rollouts=False, sft_objective="dft",
        ),
        Method(
            "luffy", "LUFFY: an expert trajectory in each rollout group, joint advantages, policy shaping p/(p+gamma) on its tokens",
            schedule=_rl_only, controller=None, uses_expert_data=True, collects_rollouts=True,
            advantage=_mean_centred, rl_objective="luffy", expert_in_group=True, rollouts_from_expert_states=True,
            settings="luffy",
        ),
        Method(
            "srft", "SRFT: entropy-weighted SFT and off-policy RL on the demonstration in each group, self-RL on the rollouts",
            schedule=_rl_only, controller=None, uses_expert_data=True, collects_rollouts=True,
            rl_objective="srft", expert_in_group=True, rollouts_from_expert_states=True, settings="srft",
        ),
        Method(
            "relift", "ReLIFT: GRPO steps; all-failed start states' expert trajectories buffered for interleaved SFT updates",
            schedule=_rl_only, controller=None, uses_expert_data=True, collects_rollouts=True,
            advantage=_relift_advantage, rl_objective="relift", rollouts_from_expert_states=True, sft_buffer=True,
            settings="relift",
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


def method_mu(method: Method, config: TrainConfig, step: int, controller: MuController | None) -> float:
    """The weight of ``L_SFT`` at `step` (0-based): `method`'s schedule, or `controller`'s mu (1 in its warm-up)."""
    if method.schedule is not None:
        return method.schedule(config, step)
    if controller is None:
        raise ValueError(f"{method.name} takes mu from its controller: pass build_controller(method, config)")
    return controller.mu_for_step(step)


def build_controller(method: Method, config: TrainConfig) -> MuController | None:
    """`method`'s mu controller with the parts it runs (None for a schedule)."""
    use = method.controller
    if use is None:
        return None
    from amft_vlm.learning.controller import MuController  # torch loads only when a method has a controller

    return MuController(config.controller, use)
