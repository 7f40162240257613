"""The tiny Qwen-VL checkpoints: real architectures, Qwen special tokens and chat template, determinism."""

import filecmp

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoTokenizer,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)

from agents.tiny import ARCHITECTURES, DEFAULT_SYSTEM_PROMPT, QWEN_SPECIAL_TOKENS, build_tiny_model

MODEL_CLASSES = {
    "qwen2-vl": Qwen2VLForConditionalGeneration,
    "qwen2.5-vl": Qwen2_5_VLForConditionalGeneration,
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_checkpoint_loads_back_through_auto_classes(tiny_checkpoints, arch):
    path = tiny_checkpoints[arch]
    model, loading_info = AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")

    assert type(model) is MODEL_CLASSES[arch]
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    assert type(image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert model.config.text_config.vocab_size == len(tokenizer)
    assert sum(parameter.numel() for parameter in model.parameters()) < 1_000_000
    # Every saved tensor is loaded (the file uses the Hub's key names, so compare contents, not names).
    assert not any(loading_info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    saved = load_file(path / "model.safetensors")
    loaded = model.state_dict()
    assert len(saved) == len(loaded)
    fingerprint = sorted((tuple(tensor.shape), float(tensor.double().sum())) for tensor in saved.values())
    assert fingerprint == sorted(
        (tuple(tensor.shape), float(tensor.double().sum())) for tensor in loaded.values()
    )


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_config_special_token_ids_match_tokenizer(tiny_checkpoints, arch):
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoints[arch])
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints[arch])
    config = model.config

    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_end_token_id == tokenizer.convert_tokens_to_ids("<|vision_end|>")
    assert (
        config.text_config.eos_token_id
        == tokenizer.eos_token_id
        == tokenizer.convert_tokens_to_ids("<|im_end|>")
    )
    assert (
        config.text_config.pad_token_id
        == tokenizer.pad_token_id
        == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    )
    assert set(model.generation_config.eos_token_id) == {tokenizer.eos_token_id, tokenizer.pad_token_id}
    head_dim = config.text_config.hidden_size // config.text_config.num_attention_heads
    assert sum(config.text_config.rope_parameters["mrope_section"]) == head_dim // 2


def test_same_seed_same_checkpoint_other_seed_other_weights(tmp_path):
    first = build_tiny_model("qwen2.5-vl", tmp_path / "first", seed=7)
    again = build_tiny_model("qwen2.5-vl", tmp_path / "again", seed=7)
    other = build_tiny_model("qwen2.5-vl", tmp_path / "other", seed=8)

    for name in ("model.safetensors", "tokenizer.json", "config.json", "preprocessor_config.json"):
        assert filecmp.cmp(first / name, again / name, shallow=False), name
    assert not filecmp.cmp(first / "model.safetensors", other / "model.safetensors", shallow=False)
    assert filecmp.cmp(first / "tokenizer.json", other / "tokenizer.json", shallow=False)


def test_build_does_not_touch_the_global_torch_seed(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model("qwen2-vl", tmp_path, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_tokenizer_round_trips_special_tokens_and_task_text(tiny_checkpoints):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["qwen2-vl"])
    special_ids = [tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS]
    # Qwen's layout: special tokens right after the BPE vocabulary, in Qwen's order.
    assert special_ids == list(range(special_ids[0], special_ids[0] + len(QWEN_SPECIAL_TOKENS)))
    assert special_ids[-1] == len(tokenizer) - 1

    text = "".join(QWEN_SPECIAL_TOKENS) + ' {"cards": ["10", "J"], "formula": "(10+2)*2=24"} north-west é😀\n'
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[: len(special_ids)] == special_ids
    assert tokenizer.decode(ids) == text
    # Qwen splits numbers into single digits.
    assert tokenizer.tokenize("2024") == ["2", "0", "2", "4"]


def test_chat_template_renders_qwen_chatml(tiny_checkpoints):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["qwen2.5-vl"])
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many cards?"}]},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Sure?"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many cards?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nSure?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


def test_rejects_unknown_architecture(tmp_path):
    with pytest.raises(ValueError, match="arch must be one of"):
        build_tiny_model("llava", tmp_path)


def test_tokenizer_is_trained_on_the_environments_text():
    import gymnasium as gym

    from agents.tiny import build_tokenizer, task_corpus

    assert task_corpus.__wrapped__() == task_corpus()  # recomputed from fixed seeds: the same text
    prompt = gym.make("GeneralPoints-v0", modality="language").reset(seed=3)[0]["text"]
    assert prompt in task_corpus()
    small, large = build_tokenizer(vocab_size=512), build_tokenizer(vocab_size=1024)
    assert small.get_vocab() == build_tokenizer(vocab_size=512).get_vocab()
    # Words the prompt repeats are whole tokens, as with a real Qwen tokenizer, not spelled letter by letter.
    for word in (" cards", " card", " the"):
        assert small.tokenize(word) == [word.replace(" ", "Ġ")]
    # A bigger vocabulary compresses the prompt further (the demo uses 1024).
    assert len(large.tokenize(prompt)) < len(small.tokenize(prompt)) < 0.5 * len(prompt)


def test_rope_theta_is_a_size_knob(tmp_path):
    import json

    from agents.tiny import QWEN_ROPE_THETA

    default = json.loads((build_tiny_model("qwen2-vl", tmp_path / "a", num_layers=1) / "config.json").read_text())
    other = json.loads((build_tiny_model("qwen2-vl", tmp_path / "b", num_layers=1, rope_theta=1e4) / "config.json").read_text())
    assert default["text_config"]["rope_parameters"]["rope_theta"] == QWEN_ROPE_THETA == 1e6
    assert other["text_config"]["rope_parameters"]["rope_theta"] == 1e4
