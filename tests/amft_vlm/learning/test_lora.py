"""LoRA through peft on tiny Qwen2-VL / Qwen2.5-VL policies: targets, gradients, checkpoints, merging."""

import sys

import numpy as np
import pytest
import torch

from agents.chat import Dialogue
from agents.policy import VLMPolicy
from agents.tiny import ARCHITECTURES
from amft_vlm.learning.checkpoint import save_policy
from amft_vlm.learning.lora import (
    ADAPTER_FILE,
    CONFIG_FILE,
    DEFAULT_TARGETS,
    apply_lora,
    has_lora,
    load_lora,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    read_lora_settings,
    save_lora,
)
from tests.conftest import MAX_PIXELS

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fresh_policy(tiny_checkpoints, arch, **kwargs):
    """A policy of its own: LoRA changes the model in place, so the shared session policies stay out."""
    return VLMPolicy.from_pretrained(tiny_checkpoints[arch], max_pixels=MAX_PIXELS, **kwargs)


def _prompt(policy):
    image = np.random.default_rng(0).integers(0, 256, size=(120, 160, 3), dtype=np.uint8)
    return policy.encode_dialogue(Dialogue.start("Cards on the table. Reach 24.", image=image))


def _logits(policy, sequence):
    batch = policy.collate([sequence])
    with torch.no_grad():
        return policy.model(
            **batch.model_inputs(policy.dtype), position_ids=policy.position_ids(batch), use_cache=False
        ).logits


def _gradient_step(policy, parameters, *, learning_rate=0.5):
    """One plain gradient step on the adapters, raising the log-prob of a fixed response."""
    sequence = _prompt(policy).extended(policy.tokenize('{"formula": "(10+2)*2"}'))
    prompt_length = len(_prompt(policy))
    (logprobs,) = policy.token_logprobs([sequence], [range(prompt_length, len(sequence))])
    gradients = torch.autograd.grad(-logprobs.sum(), parameters)
    with torch.no_grad():
        for parameter, gradient in zip(parameters, gradients, strict=True):
            parameter -= learning_rate * gradient
    return gradients


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_only_language_model_projections_get_trainable_adapters(tiny_checkpoints, arch):
    policy = _fresh_policy(tiny_checkpoints, arch)
    model = policy.model
    parameters = apply_lora(policy, rank=4)

    assert policy.model is model
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert [id(p) for p in parameters] == [id(p) for p in model.parameters() if p.requires_grad]
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert not any("visual" in name or "lm_head" in name for name in trainable)
    adapted = sorted({name.split(".lora_")[0] for name in trainable})
    layers = model.config.get_text_config().num_hidden_layers
    block = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
    expected = sorted(
        f"model.language_model.layers.{layer}.{block.get(target, 'mlp')}.{target}"
        for layer in range(layers)
        for target in DEFAULT_TARGETS
    )
    assert adapted == expected
    assert len(parameters) == 2 * len(expected)
    assert has_lora(policy)
    # The Hugging Face entry points the trainer uses are still there.
    assert callable(policy.model.model.get_rope_index)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fresh_adapter_keeps_logits_and_a_step_changes_them(tiny_checkpoints, arch):
    policy = _fresh_policy(tiny_checkpoints, arch)
    sequence = _prompt(policy)
    before = _logits(policy, sequence)
    torch.manual_seed(0)
    parameters = apply_lora(policy, rank=4)
    assert torch.equal(_logits(policy, sequence), before)

    gradients = _gradient_step(policy, parameters)
    names = list(lora_state_dict(policy))
    # B starts at zero, so only the B weights get a gradient on the first step.
    for name, gradient in zip(names, gradients, strict=True):
        assert (gradient.abs().sum() > 0) == (".lora_B." in name), name
    assert not torch.allclose(_logits(policy, sequence), before, atol=1e-4)


def test_generate_and_token_logprobs_agree_with_adapters(tiny_checkpoints):
    policy = _fresh_policy(tiny_checkpoints, "qwen2.5-vl")
    torch.manual_seed(0)
    _gradient_step(policy, apply_lora(policy, rank=2, alpha=8))
    prompt = _prompt(policy)
    torch.manual_seed(1)
    (generation,) = policy.generate([prompt], max_new_tokens=6)
    sequence = prompt.extended(generation.token_ids)
    with torch.no_grad():
        (logprobs,) = policy.token_logprobs([sequence], [range(len(prompt), len(sequence))])
    torch.testing.assert_close(logprobs, generation.logprobs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_and_load_restore_identical_logits_and_parameter_order(tiny_checkpoints, arch, tmp_path):
    policy = _fresh_policy(tiny_checkpoints, arch)
    torch.manual_seed(0)
    parameters = apply_lora(policy, rank=3, dropout=0.1)
    # The policy's model is in eval mode, so adapter dropout stays off as well.
    assert not any(module.training for module in policy.model.modules())
    _gradient_step(policy, parameters)
    sequence = _prompt(policy)
    expected = _logits(policy, sequence)
    save_lora(policy, tmp_path / "lora")

    assert sorted(path.name for path in (tmp_path / "lora").iterdir()) == sorted([ADAPTER_FILE, CONFIG_FILE])
    settings = read_lora_settings(tmp_path / "lora")
    assert (settings.rank, settings.alpha, settings.dropout) == (3, 6, 0.1)
    assert settings.target_modules == DEFAULT_TARGETS
    assert settings.base_model == str(tiny_checkpoints[arch])

    restored = _fresh_policy(tiny_checkpoints, arch)
    restored_parameters = load_lora(restored, tmp_path / "lora")
    assert torch.equal(_logits(restored, sequence), expected)
    assert list(lora_state_dict(restored)) == list(lora_state_dict(policy))
    assert all(torch.equal(a, b) for a, b in zip(restored_parameters, parameters, strict=True))
    assert [p.requires_grad for p in restored.model.parameters()].count(True) == len(parameters)

    # Loading again onto a policy that already has matching adapters overwrites them in place.
    with torch.no_grad():
        restored_parameters[-1].add_(1.0)
    assert load_lora(restored, tmp_path / "lora") == restored_parameters
    assert torch.equal(_logits(restored, sequence), expected)


def test_optimizer_state_restores_onto_reloaded_adapters(tiny_checkpoints, tmp_path):
    policy = _fresh_policy(tiny_checkpoints, "qwen2-vl")
    torch.manual_seed(0)
    parameters = apply_lora(policy, rank=2)
    optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    for _ in range(2):
        gradients = _gradient_step(policy, parameters, learning_rate=0.0)
        for parameter, gradient in zip(parameters, gradients, strict=True):
            parameter.grad = gradient
        optimizer.step()
    save_lora(policy, tmp_path)
    optimizer_state = optimizer.state_dict()

    restored = _fresh_policy(tiny_checkpoints, "qwen2-vl")
    restored_parameters = load_lora(restored, tmp_path)
    restored_optimizer = torch.optim.AdamW(restored_parameters, lr=1e-2)
    restored_optimizer.load_state_dict(optimizer_state)
    for original, reloaded in zip(parameters, restored_parameters, strict=True):
        assert torch.equal(
            optimizer.state[original]["exp_avg"], restored_optimizer.state[reloaded]["exp_avg"]
        )


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_merged_model_saves_and_loads_as_a_plain_checkpoint(tiny_checkpoints, arch, tmp_path):
    policy = _fresh_policy(tiny_checkpoints, arch)
    torch.manual_seed(0)
    _gradient_step(policy, apply_lora(policy, rank=4))
    sequence = _prompt(policy)
    adapted = _logits(policy, sequence)

    merge_lora(policy)
    assert not has_lora(policy)
    assert not any("lora_" in name or "base_layer" in name for name in policy.model.state_dict())
    merged = _logits(policy, sequence)
    # (W + s B A) x and W x + s B (A x) round differently in float32: ~2e-5 on logits of size ~10.
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=0)

    save_policy(policy, tmp_path / "merged")
    reloaded = VLMPolicy.from_pretrained(tmp_path / "merged", max_pixels=MAX_PIXELS)
    base = _fresh_policy(tiny_checkpoints, arch)
    assert set(reloaded.model.state_dict()) == set(base.model.state_dict())
    torch.testing.assert_close(_logits(reloaded, sequence), merged, atol=1e-5, rtol=0)


def test_adapters_stay_float32_on_a_bfloat16_model(tiny_checkpoints):
    policy = _fresh_policy(tiny_checkpoints, "qwen2-vl", dtype="bfloat16")
    parameters = apply_lora(policy, rank=2)
    assert {parameter.dtype for parameter in parameters} == {torch.float32}
    assert policy.dtype == torch.bfloat16
    _gradient_step(policy, parameters)
    assert _logits(policy, _prompt(policy)).dtype == torch.bfloat16


def test_bad_arguments_raise_clear_errors(tiny_checkpoints):
    policy = _fresh_policy(tiny_checkpoints, "qwen2.5-vl")
    with pytest.raises(ValueError, match="rank must be an integer >= 1; got 0"):
        apply_lora(policy, rank=0)
    with pytest.raises(ValueError, match="target_modules must name"):
        apply_lora(policy, rank=2, target_modules=("qkv",))
    with pytest.raises(ValueError, match="no LoRA adapters"):
        lora_parameters(policy)
    apply_lora(policy, rank=2, target_modules=("q_proj", "v_proj"))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(policy, rank=2)


def test_state_dict_with_missing_or_extra_keys_is_refused(tiny_checkpoints):
    policy = _fresh_policy(tiny_checkpoints, "qwen2-vl")
    apply_lora(policy, rank=2)
    state = lora_state_dict(policy)
    dropped = next(iter(state))
    del state[dropped]
    state["model.lm_head.lora_A.default.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="missing keys") as error:
        load_lora_state_dict(policy, state)
    assert dropped in str(error.value) and "model.lm_head.lora_A.default.weight" in str(error.value)


def test_loading_adapters_of_another_rank_is_refused(tiny_checkpoints, tmp_path):
    policy = _fresh_policy(tiny_checkpoints, "qwen2-vl")
    apply_lora(policy, rank=2)
    save_lora(policy, tmp_path)
    other = _fresh_policy(tiny_checkpoints, "qwen2-vl")
    apply_lora(other, rank=4)
    with pytest.raises(ValueError, match="differ from the saved ones"):
        load_lora(other, tmp_path)


def test_missing_peft_names_the_install_command(tiny_checkpoints, monkeypatch):
    policy = _fresh_policy(tiny_checkpoints, "qwen2-vl")
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r"pip install peft .*amft-vlm\[lora\]"):
        apply_lora(policy, rank=2)
