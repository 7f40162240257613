"""Trajectory data types and the builder that turns dialogues into tokens."""

import dataclasses

import numpy as np
import pytest
import torch

from agents.chat import Dialogue
from agents.policy import Generation
from amft_vlm.rollout.trajectory import Segment, Trajectory, TrajectoryBuilder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _image(seed=0, size=90):
    return np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def _builder(policy, **kwargs):
    settings = {"seed": 3, "group": 1, "env_id": "Test-v0", "source": "expert", "sampling_temperature": None}
    return TrajectoryBuilder(policy, **{**settings, **kwargs})


def _segment(length=6, spans=((3, 5),), logprobs=None):
    if logprobs is None:
        logprobs = torch.full((sum(end - start for start, end in spans),), -0.5)
    return Segment(token_ids=tuple(range(length)), turn_spans=spans, response_logprobs=logprobs)


def test_text_responses_and_follow_ups_give_the_chat_template_tokens(tiny_policies):
    policy = tiny_policies["qwen2.5-vl"]
    image = _image()
    answers = ['{"cards": ["A", "2"], "formula": "1+2"}', "turn_direction(north)", "stop()"]
    feedback = ["Wrong cards, try again.", "Not that way."]
    builder = _builder(policy)
    builder.start_dialogue("Make 24 from the cards.", image=image)
    dialogue = Dialogue.start("Make 24 from the cards.", image=image)
    for index, answer in enumerate(answers):
        builder.add_text_response(answer, reward=-1.0 - index)
        dialogue = dialogue.with_assistant(answer)
        if index < len(feedback):
            builder.add_user_message(feedback[index])
            dialogue = dialogue.with_user(feedback[index])
    trajectory = builder.finish(success=False)

    (segment,) = trajectory.segments
    rendered = policy.encode_dialogue(dialogue, add_generation_prompt=False).token_ids
    # The template writes a newline after the last <|im_end|>; the trajectory ends at the answer.
    assert segment.token_ids == rendered[:-1]
    assert policy.decode(rendered[-1:]) == "\n"
    for turn, answer in enumerate(answers):
        assert policy.decode(segment.response_token_ids(turn)) == answer + "<|im_end|>"
    assert segment.loss_mask.sum() == sum(end - start for start, end in segment.turn_spans)
    assert not segment.loss_mask[torch.tensor(segment.token_ids) == policy.image_token_id].any()
    assert not segment.sampling_logprobs.any()
    assert trajectory.turn_rewards == (-1.0, -2.0, -3.0)
    assert trajectory.episode_return == -6.0 and trajectory.num_turns == 3
    assert not trajectory.has_sampling_logprobs
    assert segment.image_index == 0 and len(trajectory.images) == 1


def test_generated_responses_keep_their_tokens_and_close_only_when_needed(tiny_policies):
    policy = tiny_policies["qwen2-vl"]
    end_of_turn = policy.end_of_turn_token_id
    end_of_text = policy.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    some_tokens = policy.tokenize("abc 12")
    generations = [
        Generation(
            token_ids=[*some_tokens, end_of_turn],
            logprobs=torch.full((len(some_tokens) + 1,), -0.25),
            text="abc 12",
            finished=True,
        ),
        Generation(
            token_ids=some_tokens,
            logprobs=torch.full((len(some_tokens),), -0.5),
            text="abc 12",
            finished=False,
        ),
        Generation(
            token_ids=[*some_tokens, end_of_text],
            logprobs=torch.full((len(some_tokens) + 1,), -0.75),
            text="abc 12",
            finished=True,
        ),
    ]
    builder = _builder(policy, source="policy", sampling_temperature=0.7)
    builder.start_dialogue("Go.")
    for generation in generations:
        builder.add_generation(generation, reward=0.0)
        builder.add_user_message("Again.")
    builder.add_generation(generations[1], reward=1.0)
    trajectory = builder.finish(success=True)

    (segment,) = trajectory.segments
    follow_up = policy.encode_follow_up("Again.")
    for turn, generation in enumerate(generations):
        start, end = segment.turn_spans[turn]
        assert list(segment.token_ids[start:end]) == generation.token_ids
        assert torch.equal(segment.sampling_logprobs[start:end], generation.logprobs)
        after = list(segment.token_ids[end:])
        if generation.token_ids[-1] == end_of_turn:
            assert after[: len(follow_up)] == follow_up
        else:
            # The rollout closes the turn itself; that <|im_end|> is not trainable.
            assert after[: len(follow_up) + 1] == [end_of_turn, *follow_up]
            assert not segment.loss_mask[end]
    assert segment.token_ids[-1] != end_of_turn  # an episode ending on a cut-off answer is left as is
    assert trajectory.has_sampling_logprobs and trajectory.sampling_temperature == 0.7
    assert trajectory.num_response_tokens == sum(len(g.token_ids) for g in [*generations, generations[1]])


def test_dialogue_restarts_make_segments_with_their_own_images(tiny_policies):
    policy = tiny_policies["qwen2-vl"]
    builder = _builder(policy)
    images = [_image(0), _image(1)]
    builder.start_dialogue("Point one.", image=images[0])
    builder.add_text_response("forward()", reward=1.0)
    builder.start_dialogue("Point two.", image=images[1])
    first_prompt = builder.prompt()
    builder.add_text_response("wrong", reward=-1.0)
    builder.add_user_message("Try again.")
    assert builder.prompt().images is first_prompt.images  # prepared once per dialogue
    builder.add_text_response("stop()", reward=1.0)
    images[1][:] = 0  # the environment reusing its buffer does not change the trajectory
    trajectory = builder.finish(success=True)

    assert [segment.image_index for segment in trajectory.segments] == [0, 1]
    assert [segment.num_turns for segment in trajectory.segments] == [1, 2]
    assert trajectory.turn_rewards == (1.0, -1.0, 1.0)
    assert np.array_equal(trajectory.images[1], _image(1))
    assert not trajectory.images[1].flags.writeable
    # The images were prepared once, when their dialogues started, and scoring reuses them.
    assert [inputs is None for inputs in trajectory.image_inputs] == [False, False]
    sequences = trajectory.token_sequences()
    assert sequences[1].images is trajectory.image_inputs[1] and sequences[1].images is first_prompt.images
    expected = policy.encode_dialogue(Dialogue.start("Point two.", image=_image(1)))
    assert torch.equal(sequences[1].images.pixel_values, expected.images.pixel_values)
    # A trajectory without them prepares them from its uint8 images with the encoder it is given.
    bare = dataclasses.replace(trajectory, image_inputs=())
    with pytest.raises(ValueError, match="no prepared images"):
        bare.token_sequences()
    assert torch.equal(bare.token_sequences(policy)[1].images.pixel_values, expected.images.pixel_values)
    assert bare == trajectory  # prepared inputs are derived data, not part of the value
    assert sequences[1].token_ids[: len(expected)] == expected.token_ids


def test_trajectories_compare_by_value(tiny_policies):
    policy = tiny_policies["qwen2-vl"]

    def build(answer):
        builder = _builder(policy)
        builder.start_dialogue("Hi.", image=_image())
        builder.add_text_response(answer, reward=1.0)
        return builder.finish(success=True)

    assert build("yes") == build("yes")
    assert build("yes") != build("no")


def test_invalid_segments_and_trajectories_are_rejected():
    _segment()  # valid
    assert _segment().loss_mask.tolist() == [False, False, False, True, True, False]
    assert _segment().sampling_logprobs.tolist() == [0, 0, 0, -0.5, -0.5, 0]
    with pytest.raises(ValueError, match=r"\(2,\) float32 tensor"):
        _segment(logprobs=torch.full((6,), -1.0))
    with pytest.raises(ValueError, match="finite"):
        _segment(logprobs=torch.tensor([0, float("nan")]))
    with pytest.raises(ValueError, match="turn spans"):
        _segment(spans=((0, 2),))
    with pytest.raises(ValueError, match="turn spans"):
        _segment(spans=((3, 5), (4, 6)))
    with pytest.raises(ValueError, match="turn rewards"):
        Trajectory(
            segments=(_segment(),),
            images=(),
            turn_rewards=(1.0, 2.0),
            success=False,
            seed=0,
            group=0,
            env_id="Test-v0",
            source="policy",
            sampling_temperature=1.0,
        )


def test_builder_rejects_events_out_of_order(tiny_policies):
    builder = _builder(tiny_policies["qwen2-vl"])
    with pytest.raises(RuntimeError, match="start_dialogue"):
        builder.add_text_response("hi", reward=0.0)
    builder.start_dialogue("Hello.")
    with pytest.raises(RuntimeError, match="before any response"):
        builder.add_user_message("Again.")
