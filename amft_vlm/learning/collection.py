"""What each training iteration trains on: the next expert batch for ``L_SFT``, and the policy's own rollouts with
one advantage per turn for ``L_RL`` (the estimator the method's row names, `amft_vlm.learning.advantages`).

Every process holds the whole expert set and the whole list of the iteration's start states, and takes its
share of them (every ``world``-th, from its rank), so a run on several processes plays the same episodes as one
process. The methods whose groups hold a demonstration (LUFFY, SRFT) and ReLIFT, whose buffer needs one per start
state, draw their start states from the expert set (`amft_vlm.learning.peers.expert_start_states`); the others play fresh
training seeds each iteration.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from amft_vlm.learning.advantages import ADVANTAGE_ESTIMATORS, EpisodeRewards
from amft_vlm.learning.batch import CriticTargets, RolloutBatch
from amft_vlm.learning.peers import ReliftBuffer, all_failed_groups, expert_start_states, with_demonstrations

if TYPE_CHECKING:
    from agents.policy import VLMPolicy
    from amft_vlm.learning.controller import MuController
    from amft_vlm.learning.critic import Critic
    from amft_vlm.learning.distributed import Parallel
    from amft_vlm.learning.methods import Method
    from amft_vlm.rollout.engine import RolloutEngine
    from amft_vlm.rollout.trajectory import Trajectory
    from amft_vlm.run.budget import Budget
    from amft_vlm.run.config import TrainConfig

T = TypeVar("T")

ROLLOUT_STREAM, VALIDATION_STREAM = 1, 2
"""Streams of `mix_seed` for the training rollouts and the validation episodes."""


def mix_seed(seed: int, step: int, stream: int) -> int:
    """A sampling seed that depends only on (seed, step, stream), so a resumed run samples the same."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1)[0])


class Collector:
    """This process's share of each iteration's expert batch and rollouts, counted in the run's `budget`.

    Args:
        config, method: the run's settings and its method's row.
        parallel: the processes.
        policy, engine: the policy that plays the rollouts, and the engine it plays them on.
        expert: the expert set; `expert_after_warmup`: the one used once the controller's warm-up is over (None: the same).
        controller: the run's mu controller (None: a schedule).
        critic: the value head, for an estimator that reads values (None otherwise).
        relift: ReLIFT's buffer (None for the other methods).
        budget: the run's budget, added to as episodes are played and examples drawn.
        sft_position: expert examples drawn so far (the next SFT batch starts there).
    """

    def __init__(
        self, config: TrainConfig, method: Method, parallel: Parallel, policy: VLMPolicy, engine: RolloutEngine, expert: list[Trajectory], *,
        expert_after_warmup: list[Trajectory] | None, controller: MuController | None, critic: Critic | None, relift: ReliftBuffer | None,
        budget: Budget, sft_position: int = 0,
    ) -> None:  # fmt: skip
        self.config, self.method, self.parallel, self.policy, self.engine = config, method, parallel, policy, engine
        self.expert, self.expert_after_warmup, self.controller = expert, expert_after_warmup, controller
        self.critic, self.relift, self.budget, self.sft_position = critic, relift, budget, sft_position
        self.advantage = method.advantage(config)

    def share(self, items: Sequence[T]) -> Sequence[T]:
        """This process's share of `items` (which every process holds in full): every world-th, from its rank."""
        return items[self.parallel.rank :: self.parallel.world]

    def expert_share(self, indices: Sequence[int], expert: Sequence[Trajectory] | None = None) -> list[Trajectory]:
        """This process's share of the expert trajectories at `indices` (of `expert`, the run's set by default), with their images prepared."""
        expert = self.expert if expert is None else expert
        return [expert[i].with_image_inputs(self.policy.encoder) for i in self.share(indices)]

    def sft_batch(self, step: int) -> RolloutBatch:
        """This process's share of the next ``sft_batch_size`` expert trajectories: epoch-wise permutations seeded by (seed, epoch)
        of the step's expert set (``expert_data_after_warmup``'s once the warm-up is over, if there is one)."""
        expert = self.expert
        if self.expert_after_warmup is not None and not self.controller.in_warmup(step):
            expert = self.expert_after_warmup
        size, count = self.config.sft_batch_size, len(expert)
        indices, orders = [], {}
        for position in range(self.sft_position, self.sft_position + size):
            epoch, offset = divmod(position, count)
            if epoch not in orders:
                orders[epoch] = np.random.default_rng([self.config.seed, epoch]).permutation(count)
            indices.append(orders[epoch][offset])
        self.sft_position += size
        return RolloutBatch(self.expert_share(indices, expert))

    def rollouts(self, step: int) -> tuple[RolloutBatch, dict]:
        """This process's share of the iteration's rollouts with one advantage per turn (the method's estimator),
        and the global episode metrics."""
        config, method = self.config, self.method
        states, seeds = self._start_states(step)
        shard = self.share(seeds)
        members = config.group_size - 1 if method.expert_in_group else config.group_size  # LUFFY, SRFT: G - 1 + the demonstration
        self.budget.rollout_episodes += config.episodes_per_step * members
        with self.parallel.full_weights():
            rollouts, stats = self.engine.collect(shard, group_size=members, sampling_seed=mix_seed(config.seed, step, ROLLOUT_STREAM), progress=False)
        extra: dict = {"rollout_digest": self.parallel.digest([t.token_digest for t in rollouts])}
        if self.relift is not None:  # ReLIFT: start states on which every rollout failed wait in its buffer
            failed = all_failed_groups(rollouts, len(shard))
            extra["relift_added"] = self.relift.add_failed(self.parallel, states, failed, self.parallel.rank, self.parallel.world)
            extra["relift_buffer"] = len(self.relift.items)
        if method.expert_in_group:  # LUFFY, SRFT: the demonstration joins its group; advantages over the joint group
            rollouts = with_demonstrations(rollouts, self.expert_share(states))
            self.budget.expert_examples += config.episodes_per_step
        features = values = None
        if self.critic is not None:
            with self.parallel.full_weights():
                features, values = self.critic.values(self.policy, rollouts)
        rewards = EpisodeRewards(
            [t.turn_rewards for t in rollouts], [t.group for t in rollouts], credit=config.credit, values=values, gamma=config.gamma, lam=config.gae_lambda
        )
        advantages = ADVANTAGE_ESTIMATORS[self.advantage].estimate(rewards)
        critic = CriticTargets(features, values, advantages.value_targets) if self.critic is not None else None
        episodes, returns, successes, turns = self.parallel.sums(
            [stats.episodes, stats.mean_return * stats.episodes, stats.successes, stats.mean_turns * stats.episodes]
        )
        metrics = {"reward": returns / episodes, "success": successes / episodes, "turns": turns / episodes, **extra}
        return RolloutBatch(rollouts, advantages.advantages, critic), metrics

    def _start_states(self, step: int) -> tuple[list[int] | None, list[int]]:
        """The iteration's start states (every process's): the expert-set indices they come from (None for the
        methods that play fresh training seeds) and their environment seeds."""
        config = self.config
        if not self.method.rollouts_from_expert_states:
            return None, [config.seed * 1_000_003 + step * config.episodes_per_step + i for i in range(config.episodes_per_step)]
        states = expert_start_states(len(self.expert), step, config.episodes_per_step, config.seed)
        return states, [self.expert[i].seed for i in states]  # each group starts where its demonstration does
