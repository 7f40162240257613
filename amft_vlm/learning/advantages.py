"""Advantage estimators: pure functions from episode rewards to one advantage per turn, in one table.

Every estimator reads an `EpisodeRewards` (each episode's turn rewards, its group, the run's ``credit`` and,
for GAE, the critic's values per turn) and returns `TurnAdvantages`: one tensor per episode with one
advantage per response turn (and GAE's value targets). The scorer (`amft_vlm.learning.batch`) spreads a turn's
advantage over that turn's tokens. A method's row (`amft_vlm.learning.methods.Method.advantage`) names the entry of
`ADVANTAGE_ESTIMATORS` a run uses:

| name | ``credit`` | estimator | baseline |
|---|---|---|---|
| ``grpo`` | ``episode`` | `grpo_episode_advantages` | the group's mean return, scaled by its std (GRPO) |
| ``grpo`` | ``turn`` | `grpo_turn_advantages` | the same turn of the group's other episodes |
| ``mean_centred`` | ``episode`` | `mean_centred_advantages` | the group's mean return, no std (LUFFY's, ReLIFT's released code) |
| ``gae`` | either | `gae_advantages` | a learned value per turn (`amft_vlm.learning.critic`, ``advantage: ppo``) |

A group is the set of episodes started from one start state (`Trajectory.group`; LUFFY's and SRFT's joint
groups hold a demonstration too). `leave_one_out_advantages` is the meta-gradient's baseline (AMFT's
validation episodes), kept here with the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


def group_advantages(returns: torch.Tensor, groups: Sequence[int], *, scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: each return minus its group's mean, divided by the group's std.

    Episodes of a group start from the same state (same seed). A group whose returns are all equal
    carries no signal: its advantages are exactly 0 (not 0/0). ``scale_by_std=False`` keeps only the
    mean baseline (Dr. GRPO).
    """
    returns = returns.to(torch.float32)
    advantages = torch.zeros_like(returns)
    group_ids = torch.as_tensor(list(groups))
    if group_ids.shape != returns.shape:
        raise ValueError(f"need one group id per return; got {tuple(group_ids.shape)} ids for {tuple(returns.shape)} returns")
    for group in group_ids.unique():
        members = group_ids == group
        values = returns[members]
        centred = values - values.mean()
        if scale_by_std and values.numel() > 1:
            std = values.std(unbiased=False)
            centred = centred / (std + eps) if std > eps else torch.zeros_like(centred)
        advantages[members] = centred
    return advantages


def grpo_episode_advantages(turn_rewards: Sequence[Sequence[float]], groups: Sequence[int]) -> list[torch.Tensor]:
    """Episode credit: every turn of an episode gets the episode's GRPO advantage (`group_advantages` of the returns)."""
    returns = torch.tensor([float(sum(rewards)) for rewards in turn_rewards], dtype=torch.float32)
    per_episode = group_advantages(returns, groups)
    return [per_episode[i].expand(len(rewards)).clone() for i, rewards in enumerate(turn_rewards)]


def grpo_turn_advantages(turn_rewards: Sequence[Sequence[float]], groups: Sequence[int], *, eps: float = 1e-6) -> list[torch.Tensor]:
    """Turn credit: each turn's reward-to-go against the same turn of the other episodes of its group.

    Turn t of an episode is compared with turn t of the episodes from the same start state that reached
    it: its advantage is its reward-to-go minus their mean reward-to-go at turn t, divided by the std
    of all these centred values in the group. Comparing across turn positions instead (pooling every
    turn of the group) would credit a turn for where it sits: a failing 6-turn GeneralPoints episode
    has rewards-to-go -6, -5, ..., -1, so its later failed attempts would look better than its first
    one by position alone. A turn that no other episode of its group reached gets 0 (nothing to compare
    it with), as does every turn of a group without spread.
    """
    to_go = [torch.flip(torch.cumsum(torch.flip(torch.tensor(r, dtype=torch.float32), [0]), 0), [0]) for r in turn_rewards]
    advantages = [torch.zeros_like(values) for values in to_go]
    by_group: dict[int, list[int]] = {}
    for index, group in enumerate(groups):
        by_group.setdefault(int(group), []).append(index)
    for members in by_group.values():
        centred = {i: torch.zeros_like(to_go[i]) for i in members}
        for turn in range(max(to_go[i].numel() for i in members)):
            reached = [i for i in members if to_go[i].numel() > turn]
            baseline = sum(float(to_go[i][turn]) for i in reached) / len(reached)
            for i in reached:
                centred[i][turn] = to_go[i][turn] - baseline
        std = torch.cat(list(centred.values())).std(unbiased=False)
        if std > eps:
            for i in members:
                advantages[i] = centred[i] / std
    return advantages


def generalized_advantages(rewards: torch.Tensor, values: torch.Tensor, *, gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over one episode's turns: ``(advantages, returns)``, both shaped like ``rewards``.

    ``rewards[t]`` is the reward of turn t and ``values[t]`` the value estimate before it; the
    episode ends after the last turn (value 0 beyond it). ``returns = advantages + values`` are the
    value head's regression targets.
    """
    advantages = torch.zeros_like(rewards, dtype=torch.float32)
    running = torch.zeros((), dtype=torch.float32)
    for t in reversed(range(rewards.shape[0])):
        next_value = values[t + 1] if t + 1 < values.shape[0] else torch.zeros((), dtype=values.dtype)
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages, advantages + values.to(torch.float32)


def gae_turn_advantages(
    rewards: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    *,
    gamma: float,
    lam: float,
    normalize: bool = True,
    eps: float = 1e-6,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """GAE per episode over its turns: (advantages, value targets), one tensor per episode.

    With `normalize`, advantages are shifted and scaled to mean 0, std 1 over all turns of the batch
    (left as they are when all are equal); the value targets ``advantages + values`` use the raw GAE.
    """
    advantages, targets = [], []
    for episode_rewards, episode_values in zip(rewards, values, strict=True):
        advantage, target = generalized_advantages(episode_rewards, episode_values.detach().float(), gamma=gamma, lam=lam)
        advantages.append(advantage)
        targets.append(target)
    if normalize and advantages:
        pooled = torch.cat(advantages)
        mean, std = pooled.mean(), pooled.std(unbiased=False)
        if std > eps:
            advantages = [(advantage - mean) / std for advantage in advantages]
    return advantages, targets


def leave_one_out_advantages(returns: torch.Tensor, groups: Sequence[int]) -> torch.Tensor:
    """Each return minus the mean return of the *other* episodes of its group (0 for a group of one).

    With K episodes from one start state this is ``K / (K - 1) * (R - mean(R))``: an unbiased baseline,
    since it does not depend on the episode it is subtracted from.
    """
    returns = returns.to(torch.float64)
    group_ids = torch.as_tensor(list(groups))
    if group_ids.shape != returns.shape:
        raise ValueError(f"need one group id per return; got {tuple(group_ids.shape)} ids for {tuple(returns.shape)} returns")
    advantages = torch.zeros_like(returns)
    for group in group_ids.unique():
        members = group_ids == group
        count = int(members.sum())
        if count > 1:
            values = returns[members]
            advantages[members] = (values - values.mean()) * count / (count - 1)
    return advantages


def leave_one_out_turn_advantages(turn_rewards: Sequence[Sequence[float]], groups: Sequence[int]) -> list[torch.Tensor]:
    """Reward-to-go per turn minus the mean reward-to-go of the *other* episodes of its group at the same turn.

    An answer cannot change the rewards before it, so REINFORCE may weigh turn t's log-prob by the reward
    from t on instead of the whole return (Williams 1992; the "reward-to-go" form of the policy gradient):
    the same expectation with less variance when early turns' rewards are noise to later answers. An
    episode that ended before turn t has 0 reward to go there, so every other episode of the group counts
    in the baseline; as in `leave_one_out_advantages` the baseline never depends on the episode itself, so
    the estimate stays unbiased. float64; a group of one gets 0.
    """
    if len(groups) != len(turn_rewards):
        raise ValueError(f"need one group id per episode; got {len(groups)} ids for {len(turn_rewards)} episodes")
    to_go = [torch.tensor(list(rewards), dtype=torch.float64).flip(0).cumsum(0).flip(0) for rewards in turn_rewards]
    advantages = [torch.zeros_like(values) for values in to_go]
    by_group: dict[int, list[int]] = {}
    for index, group in enumerate(groups):
        by_group.setdefault(int(group), []).append(index)
    for members in by_group.values():
        if len(members) < 2:
            continue
        turns = max(to_go[i].numel() for i in members)
        padded = torch.zeros(len(members), turns, dtype=torch.float64)
        for row, i in enumerate(members):
            padded[row, : to_go[i].numel()] = to_go[i]
        others = (padded.sum(0, keepdim=True) - padded) / (len(members) - 1)
        for row, i in enumerate(members):
            advantages[i] = padded[row, : to_go[i].numel()] - others[row, : to_go[i].numel()]
    return advantages


def credited_turn_rewards(turn_rewards: Sequence[float], credit: str) -> torch.Tensor:
    """Per-turn rewards as a critic sees them: each turn's own (``"turn"``), or the episode's return at its last turn
    (``"episode"``: the same total, given later)."""
    rewards = torch.tensor(list(turn_rewards), dtype=torch.float32)
    if credit == "turn":
        return rewards
    if credit == "episode":
        credited = torch.zeros_like(rewards)
        credited[-1] = float(sum(turn_rewards))
        return credited
    raise ValueError(f"credit must be 'turn' or 'episode'; got {credit!r}")


GRPO_CREDITS: dict[str, Callable[[Sequence[Sequence[float]], Sequence[int]], list[torch.Tensor]]] = {
    "episode": grpo_episode_advantages,
    "turn": grpo_turn_advantages,
}
"""GRPO's estimator for each ``credit``: ``(turn rewards per episode, group id per episode) -> advantages per turn``."""


@dataclass(frozen=True)
class EpisodeRewards:
    """What an advantage estimator reads about a batch of episodes."""

    turn_rewards: Sequence[Sequence[float]]
    """Per episode, the reward of each of its turns."""
    groups: Sequence[int]
    """Per episode, its group (the episodes from one start state)."""
    credit: str = "episode"
    """``episode`` (every turn gets the episode's credit) or ``turn`` (each turn its own)."""
    values: Sequence[torch.Tensor] | None = None
    """Per episode, a critic's value of each turn at collection (GAE only)."""
    gamma: float = 1.0
    """GAE's discount per turn."""
    lam: float = 0.95
    """GAE's lambda over turns."""


@dataclass(frozen=True)
class TurnAdvantages:
    """An estimator's answer: one advantage per turn of each episode (and a critic's regression targets)."""

    advantages: list[torch.Tensor]
    value_targets: list[torch.Tensor] | None = None
    """GAE's returns ``advantages + values`` (raw, before normalisation); None for the estimators without a critic."""


def grpo_advantages(episodes: EpisodeRewards) -> TurnAdvantages:
    """GRPO: `grpo_episode_advantages` or `grpo_turn_advantages`, as ``credit`` says."""
    if episodes.credit not in GRPO_CREDITS:
        raise ValueError(f"credit must be one of {', '.join(GRPO_CREDITS)}; got {episodes.credit!r}")
    return TurnAdvantages(GRPO_CREDITS[episodes.credit](episodes.turn_rewards, episodes.groups))


def mean_centred_advantages(episodes: EpisodeRewards) -> TurnAdvantages:
    """Each episode's return minus its group's mean return (no std, Dr. GRPO's baseline), on every turn of the episode."""
    returns = torch.tensor([float(sum(rewards)) for rewards in episodes.turn_rewards], dtype=torch.float32)
    per_episode = group_advantages(returns, episodes.groups, scale_by_std=False)
    return TurnAdvantages([per_episode[i].expand(len(rewards)).clone() for i, rewards in enumerate(episodes.turn_rewards)])


def gae_advantages(episodes: EpisodeRewards) -> TurnAdvantages:
    """GAE over each episode's turns from the critic's values (`gae_turn_advantages`, normalised over the batch),
    the rewards credited as ``credit`` says (`credited_turn_rewards`)."""
    if episodes.values is None:
        raise ValueError("gae needs the critic's values per turn (EpisodeRewards.values)")
    rewards = [credited_turn_rewards(r, episodes.credit).to(v.device) for r, v in zip(episodes.turn_rewards, episodes.values, strict=True)]
    advantages, targets = gae_turn_advantages(rewards, episodes.values, gamma=episodes.gamma, lam=episodes.lam)
    return TurnAdvantages(advantages, targets)


@dataclass(frozen=True)
class AdvantageEstimator:
    """An entry of `ADVANTAGE_ESTIMATORS`."""

    estimate: Callable[[EpisodeRewards], TurnAdvantages]
    needs_values: bool = False
    """Whether it reads a critic's values (the trainer then keeps a critic, `amft_vlm.learning.critic.Critic`)."""


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "grpo": AdvantageEstimator(grpo_advantages),
    "mean_centred": AdvantageEstimator(mean_centred_advantages),
    "gae": AdvantageEstimator(gae_advantages, needs_values=True),
}
"""The advantage estimators by the name a method's row gives (`amft_vlm.learning.methods.Method.advantage`)."""
