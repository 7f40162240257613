"""ChatEncoder on the tiny checkpoints: image-token expansion, pixel bounds, turn concatenation, and
loading without a model gives exactly the token ids, stop ids and images a `VLMPolicy` uses."""

import shutil

import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

from agents.chat import Dialogue
from agents.policy import ChatEncoder, VLMPolicy
from agents.tiny import ARCHITECTURES
from agents.vision_inputs import image_token_count
from tests.conftest import MAX_PIXELS


def _image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _what_the_policy_reads(encoder):
    """Everything a policy or trajectory builder takes from an encoder (or a policy), for comparison."""
    dialogue = Dialogue.start("Cards on the table. Reach 24.", image=_image(300, 500)).with_assistant("11")
    sequence = encoder.encode_dialogue(dialogue.with_user("Wrong."))
    return {
        "ids": (
            encoder.end_of_turn_token_id,
            encoder.image_token_id,
            encoder.video_token_id,
            encoder.suppressed_token_ids,
            encoder.stop_token_ids,
            encoder.pad_token_id,
            encoder.min_pixels,
            encoder.max_pixels,
        ),
        "token_ids": sequence.token_ids,
        "follow_up": encoder.encode_follow_up("Wrong.", close_assistant_turn=True),
        "pixel_values": sequence.images.pixel_values,
        "image_grid_thw": sequence.images.image_grid_thw,
        "prepared": encoder.prepare_images([_image(1200, 900, seed=2)]).pixel_values,
    }


def _assert_same(first, second):
    assert first.keys() == second.keys()
    for key, value in first.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, second[key]), key
        else:
            assert value == second[key], key


def _policy_from_model(path):
    """A policy built the pre-encoder way: every id read from the loaded model's configs."""
    return VLMPolicy(
        AutoModelForImageTextToText.from_pretrained(path),
        AutoTokenizer.from_pretrained(path),
        AutoImageProcessor.from_pretrained(path, backend="pil"),
        max_pixels=MAX_PIXELS,
    )


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_encoder_gives_what_the_policy_uses(tiny_checkpoints, tiny_encoders, tiny_policies, arch):
    expected = _what_the_policy_reads(_policy_from_model(tiny_checkpoints[arch]))
    _assert_same(_what_the_policy_reads(tiny_encoders[arch]), expected)
    _assert_same(_what_the_policy_reads(tiny_policies[arch]), expected)
    # The checkpoint's generation config stops at <|im_end|> and <|endoftext|>, which also pads.
    assert len(expected["ids"][4]) == 2 and expected["ids"][5] in expected["ids"][4]


@pytest.mark.parametrize("with_generation_config", [True, False])
def test_encoder_loads_without_the_model_weights(tiny_checkpoints, tmp_path, with_generation_config):
    """No weights needed; without generation_config.json both fall back to config.json's eos alike."""
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(
        tiny_checkpoints["qwen2-vl"],
        checkpoint,
        ignore=None if with_generation_config else shutil.ignore_patterns("generation_config.json"),
    )
    expected = _what_the_policy_reads(_policy_from_model(checkpoint))
    tokenizer_only = tmp_path / "no-weights"
    shutil.copytree(checkpoint, tokenizer_only, ignore=shutil.ignore_patterns("*.safetensors"))
    assert not list(tokenizer_only.glob("*.safetensors"))
    _assert_same(_what_the_policy_reads(ChatEncoder.from_pretrained(tokenizer_only, max_pixels=MAX_PIXELS)), expected)
    assert len(expected["ids"][4]) == (2 if with_generation_config else 1)


def test_policy_takes_an_encoder_of_its_checkpoint_only(tiny_checkpoints, tiny_encoders):
    path = tiny_checkpoints["qwen2-vl"]
    model = AutoModelForImageTextToText.from_pretrained(path)
    policy = VLMPolicy(model, encoder=tiny_encoders["qwen2-vl"])
    assert policy.encoder is tiny_encoders["qwen2-vl"]
    assert model.generation_config.eos_token_id == list(policy.stop_token_ids)
    assert policy.checkpoint_generation_config.top_k == 1
    with pytest.raises(ValueError, match="not both"):
        VLMPolicy(model, AutoTokenizer.from_pretrained(path), encoder=tiny_encoders["qwen2-vl"])
    model.config.image_token_id += 1
    with pytest.raises(ValueError, match="different checkpoints"):
        VLMPolicy(model, encoder=tiny_encoders["qwen2-vl"])
    with pytest.raises(ValueError, match="different checkpoints"):
        ChatEncoder(tiny_encoders["qwen2-vl"].tokenizer, tiny_encoders["qwen2-vl"].image_processor, image_token_id=model.config.image_token_id)


def test_encode_dialogue_expands_the_image_placeholder(tiny_encoders):
    encoder = tiny_encoders["qwen2-vl"]
    image = _image(1200, 900)
    sequence = encoder.encode_dialogue(Dialogue.start("Describe.", image=image))
    expected_tokens = image_token_count(1200, 900, min_pixels=encoder.min_pixels, max_pixels=MAX_PIXELS)

    assert sequence.images.num_image_tokens == [expected_tokens]
    assert sequence.token_ids.count(encoder.image_token_id) == expected_tokens
    # The template's single placeholder became a contiguous run between vision_start and vision_end.
    vision_start = encoder.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    start = sequence.token_ids.index(vision_start)
    run = sequence.token_ids[start + 1 : start + 1 + expected_tokens]
    assert set(run) == {encoder.image_token_id}
    assert sequence.token_ids[start + 1 + expected_tokens] == encoder.tokenizer.convert_tokens_to_ids(
        "<|vision_end|>"
    )
    # Same as expanding in text before tokenising, as Hugging Face processors do.
    text = encoder.render(Dialogue.start("Describe.", image=image), add_generation_prompt=True)
    assert list(sequence.token_ids) == encoder.tokenize(
        text.replace("<|image_pad|>", "<|image_pad|>" * expected_tokens)
    )
    assert encoder.decode(sequence.token_ids).endswith("Describe.<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("max_pixels", [28 * 28 * 4, 28 * 28 * 64, 28 * 28 * 256])
def test_max_pixels_sets_the_image_token_count(tiny_checkpoints, max_pixels):
    encoder = ChatEncoder.from_pretrained(tiny_checkpoints["qwen2.5-vl"], min_pixels=28 * 28, max_pixels=max_pixels)
    sequence = encoder.encode_dialogue(Dialogue.start("Look.", image=_image(1200, 1200)))
    expected = image_token_count(1200, 1200, min_pixels=28 * 28, max_pixels=max_pixels)
    assert sequence.token_ids.count(encoder.image_token_id) == expected
    assert expected <= max_pixels // (28 * 28)


def test_min_pixels_sets_the_image_token_count(tiny_checkpoints):
    small = _image(40, 60)
    counts = []
    for min_pixels in (28 * 28 * 4, 28 * 28 * 36):
        encoder = ChatEncoder.from_pretrained(
            tiny_checkpoints["qwen2-vl"], min_pixels=min_pixels, max_pixels=28 * 28 * 256
        )
        sequence = encoder.encode_dialogue(Dialogue.start("Look.", image=small))
        counts.append(sequence.token_ids.count(encoder.image_token_id))
        assert counts[-1] == image_token_count(40, 60, min_pixels=min_pixels, max_pixels=28 * 28 * 256)
        assert counts[-1] >= min_pixels // (28 * 28)
    assert counts[0] < counts[1]
    with pytest.raises(ValueError, match="max_pixels"):
        ChatEncoder.from_pretrained(tiny_checkpoints["qwen2-vl"], min_pixels=28 * 28 * 4, max_pixels=28 * 28)


def test_multi_turn_token_concatenation_equals_the_chat_template(tiny_encoders):
    encoder = tiny_encoders["qwen2.5-vl"]
    responses = [
        '{"cards": ["10", "J", "2", "K"], "formula": "(10+2)*2"}',
        "turn_direction(left)",
        "Sorry, 23.",
    ]
    feedback = ["You recognized the wrong cards.", "The formula does not evaluate to 24!", "Try again."]
    dialogue = Dialogue.start("Make 24 from the four cards.", image=_image(600, 800))
    trajectory = encoder.encode_dialogue(dialogue)
    for response, message in zip(responses, feedback, strict=True):
        # Canonical response tokens stand in for generated ones (a trained model emits these).
        trajectory = trajectory.extended([*encoder.tokenize(response), encoder.end_of_turn_token_id])
        trajectory = trajectory.extended(encoder.encode_follow_up(message))
        dialogue = dialogue.with_assistant(response).with_user(message)

    assert trajectory.token_ids == encoder.encode_dialogue(dialogue, add_generation_prompt=True).token_ids
    # Ending after the third response: the template only adds its newline after the final <|im_end|>.
    closed = encoder.encode_dialogue(
        Dialogue(turns=dialogue.turns[:-1], image=dialogue.image), add_generation_prompt=False
    )
    without_last_follow_up = trajectory.token_ids[
        : len(trajectory) - len(encoder.encode_follow_up(feedback[-1]))
    ]
    assert closed.token_ids[: len(without_last_follow_up)] == without_last_follow_up
    assert encoder.decode(closed.token_ids[len(without_last_follow_up) :]) == "\n"
