"""Expert SFT examples: a recorded expert dataset turned into token-level trajectories.

An expert dataset (``amft-vlm collect --agent expert``, `amft_vlm.rollout.expert_data`) holds dialogues as
text. `sft_trajectories` turns each episode's dialogues into one `amft_vlm.rollout.trajectory.Trajectory`
with the same token layout a rollout has: one segment per dialogue, the chat template's prompt
tokens, each expert answer tokenised and closed with ``<|im_end|>`` (loss mask 1), each environment
message as `ChatEncoder.encode_follow_up` tokens (loss mask 0). The tokens come from the same
`amft_vlm.rollout.trajectory.TrajectoryBuilder` the rollout engine uses when a model-free agent answers, so
``RolloutEngine.collect(seeds, responder=ExpertAgent())`` and ``collect -> load_sft_trajectories``
give identical trajectories for the same seeds. Expert examples carry no sampling log-probs
(``Trajectory.sampling_temperature is None``; ``response_logprobs`` are all 0). Only a `ChatEncoder` is
needed: the data is tokenised without loading a model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from amft_vlm.rollout.expert_data import ExpertDialogue, load_dialogues, read_manifest
from amft_vlm.rollout.trajectory import Trajectory, TrajectoryBuilder

if TYPE_CHECKING:
    from agents.policy import ChatEncoder


def sft_trajectories(
    dialogues: Sequence[ExpertDialogue],
    encoder: ChatEncoder,
    *,
    env_id: str = "",
    source: str = "expert",
) -> list[Trajectory]:
    """One trajectory per episode of `dialogues`, tokenised with `encoder`'s chat template (no model needed).

    Args:
        dialogues: recorded dialogues (e.g. from `amft_vlm.rollout.expert_data.load_dialogues`); an episode's
            dialogues must all be present, in any order.
        encoder: the tokenizer, chat template and image processing (a `ChatEncoder`, or a `VLMPolicy`'s).
        env_id: `Trajectory.env_id` of the examples (the dataset manifest's ``env_id``).
        source: `Trajectory.source` of the examples (the dataset manifest's ``agent``).

    Returns:
        The trajectories ordered by episode; `Trajectory.group` is the episode number.
    """
    episodes: dict[int, list[ExpertDialogue]] = {}
    for item in dialogues:
        episodes.setdefault(item.episode, []).append(item)
    trajectories = []
    for episode in sorted(episodes):
        parts = sorted(episodes[episode], key=lambda item: item.index)
        if [part.index for part in parts] != list(range(len(parts))):
            raise ValueError(
                f"episode {episode} has dialogues {[part.index for part in parts]}; expected 0..{len(parts) - 1} "
                "(load the whole dataset, or filter whole episodes)"
            )
        builder = TrajectoryBuilder(
            encoder,
            seed=parts[0].seed,
            group=episode,
            env_id=env_id,
            source=source,
            sampling_temperature=None,
        )
        for part in parts:
            _add_dialogue(builder, part)
        trajectories.append(builder.finish(success=parts[0].success))
    return trajectories


def load_sft_trajectories(
    dataset_dir: str | os.PathLike, encoder: ChatEncoder, *, successful_only: bool = True
) -> list[Trajectory]:
    """Load an expert dataset directory and turn it into SFT trajectories (see `sft_trajectories`).

    Args:
        dataset_dir: a directory written by ``amft-vlm collect``.
        encoder: the tokenizer, chat template and image processing (a `ChatEncoder`, or a `VLMPolicy`'s).
        successful_only: keep only the episodes the agent solved.
    """
    manifest = read_manifest(dataset_dir)
    dialogues = load_dialogues(dataset_dir, successful_only=successful_only)
    return sft_trajectories(dialogues, encoder, env_id=manifest["env_id"], source=manifest["agent"])


def _add_dialogue(builder: TrajectoryBuilder, item: ExpertDialogue) -> None:
    """Add one recorded dialogue as a segment: prompt, then answer / environment message alternating."""
    turns = item.dialogue.turns
    system = turns[0].text if turns and turns[0].role == "system" else None
    conversation = turns[1:] if system is not None else turns
    answers = [turn for turn in conversation if turn.role == "assistant"]
    if not conversation or conversation[-1].role != "assistant" or len(answers) != len(item.rewards):
        raise ValueError(
            f"episode {item.episode}, dialogue {item.index}: expected user/assistant turns ending with an "
            f"answer and one reward per answer; got {len(conversation)} turns, {len(answers)} answers and "
            f"{len(item.rewards)} rewards"
        )
    builder.start_dialogue(conversation[0].text, image=item.dialogue.image, system=system)
    rewards = iter(item.rewards)
    for turn in conversation[1:]:
        if turn.role == "assistant":
            builder.add_text_response(turn.text, next(rewards))
        else:
            builder.add_user_message(turn.text)
