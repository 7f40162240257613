"""Config loading: YAML + overrides, types, and validation messages that name the field."""

import re
from pathlib import Path

import pytest
import yaml

from amft_vlm.learning.resolve import resolve_method
from amft_vlm.run.config import (
    MOVED_TO_SECTIONS,
    config_to_dict,
    load_config,
    parse_key_value,
    parse_yaml,
)

CONFIGS = sorted((Path(__file__).resolve().parents[3] / "configs").glob("*.yaml"))
"""The shipped configs (the demo's has a demo: section besides its TrainConfig)."""


def shipped_train_configs():
    """Every shipped config's training config: a train config, the demo's, or a comparison's base."""
    from amft_vlm.compare import load_compare_config
    from amft_vlm.demo import load_demo_config

    for path in CONFIGS:
        sections = parse_yaml(path.read_text())
        if "demo" in sections:
            yield path, load_demo_config(path).train
        elif "compare" in sections:
            yield path, load_compare_config(path).train
        else:
            yield path, load_config(path)


def test_defaults_are_valid_and_round_trip_through_yaml(tmp_path):
    config = load_config()
    assert config.method == "amft" and config.controller.meta_interval == 20
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    assert load_config(path) == config


def test_overrides_reach_nested_fields_and_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: fixed-mix\nsteps: 40\ncontroller:\n  warmup_steps: 5\n")
    config = load_config(path, ["fixed_mu=0.3", "controller.eta_mu=1e-2", "env_kwargs={modality: vision}", "learning_rate=2e-3"])
    assert (config.method, config.steps, config.fixed_mu) == ("fixed-mix", 40, 0.3)
    assert config.controller.warmup_steps == 5 and config.controller.eta_mu == 0.01
    assert config.env_kwargs == {"modality": "vision"} and config.learning_rate == 0.002


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["steps=0"], "steps"),
        (["steps=ten"], "steps"),
        (["learning_rate=-1"], "learning_rate"),
        (["fixed_mu=1.5"], "fixed_mu"),
        (["controller.mu_init=0.99"], "controller"),
        (["controller.entropy_sign=2"], "controller.entropy_sign"),
        (["controller.warmup_steps=600"], "controller.warmup_steps"),
        (["controller.bogus=1"], "controller.bogus"),
        (["stepz=3"], "stepz"),
        (["freeze_vision_tower=maybe"], "freeze_vision_tower"),
        (["expert_data=/no/such/dir"], "expert_data"),
        (["advantage=a2c"], "advantage"),
        (["steps"], "key=value"),
        (["learning_rate=.inf"], "learning_rate"),
        (["temperature=.inf"], "temperature"),
        (["controller.eta_h=.nan"], "controller.eta_h"),
        (["controller.eta_mu=-0.1"], "controller.eta_mu"),
        (["controller.mu_max=1.0"], "controller.mu_max"),
        (["controller.validation_samples=1"], "controller.validation_samples"),
        (["controller.meta_signal=cosine"], "controller.meta_signal"),
        (["ppo_epochs=0"], "ppo_epochs"),
        (["mini_batch_size=0"], "mini_batch_size"),
        (["mini_batch_size=1", "episodes_per_step=8", "group_size=8", "sft_batch_size=32"], "sft_batch_size"),
        (["mixed_precision=maybe"], "mixed_precision"),
        (["lr_warmup_steps=-5"], "lr_warmup_steps"),
        (["device=tpu"], "device"),
        (["weight_decay=-0.1"], "weight_decay"),
        (["max_grad_norm=-1"], "max_grad_norm"),
        (["min_pixels=0"], "min_pixels"),
        (["min_pixels=1000000", "max_pixels=50176"], "min_pixels"),
        (["image_cache_mb=-1"], "image_cache_mb"),
        (["seed=-5"], "seed"),
        (["seed=4294967296"], "seed"),
        (["schedule_steps=-3"], "schedule_steps"),
        (["clip_epsilon=0"], "clip_epsilon"),
        (["gamma=1.5"], "gamma"),
        (["lora_dropout=1.0"], "lora_dropout"),
        (["controller.meta_clip=.inf"], "controller.meta_clip"),
    ],
)
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        resolve_method(load_config(overrides=overrides))  # values on their own, then what depends on the method


def test_a_config_file_must_be_a_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(path)


def test_method_settings_live_in_their_section_from_yaml_or_the_command_line(tmp_path):
    path = tmp_path / "luffy.yaml"
    path.write_text("method: luffy\nluffy: {shaping_gamma: 0.2}\n")
    from_file = load_config(path)
    assert from_file.luffy.shaping_gamma == 0.2 and from_file.luffy.normaliser == "max_length"  # the rest keep defaults
    assert load_config(overrides=["method=luffy", "luffy.shaping_gamma=0.2"]) == from_file
    assert resolve_method(from_file).name == "luffy"


def test_a_setting_of_another_method_is_refused_naming_its_method():
    config = load_config(overrides=["method=amft", "luffy.shaping_gamma=0.2"])
    with pytest.raises(ValueError, match=r"luffy\.shaping_gamma is a setting of luffy, but method is amft: remove it, or set method: luffy"):
        resolve_method(config)
    assert resolve_method(load_config(overrides=["method=amft", "luffy.shaping_gamma=0.1"])).name == "amft"  # the default: no change


@pytest.mark.parametrize(("old", "new"), sorted(MOVED_TO_SECTIONS.items()))
def test_old_flat_keys_name_their_new_section_key(old, new):
    with pytest.raises(ValueError, match=f"'{old}' was replaced: it moved into its method's section: write {re.escape(new)}"):
        load_config(overrides=[f"{old}=1"])


def test_an_unknown_method_lists_the_table():
    config = load_config(overrides=["method=ppo2"])
    with pytest.raises(ValueError, match="method must be one of sft, rl, .*relift; got 'ppo2'"):
        resolve_method(config)


def test_every_shipped_config_loads_and_validates():
    assert len(CONFIGS) > 1
    for path, config in shipped_train_configs():
        assert config.steps > 0, path


def test_train_command_rejects_a_bad_override(capsys):
    from amft_vlm.cli import main

    with pytest.raises(SystemExit):
        main(["train", "steps=oops"])
    assert "steps must be an integer" in capsys.readouterr().err


def test_yaml_no_and_yes_are_strings_not_booleans(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("mixed_precision: no\nfreeze_vision_tower: true\n")
    config = load_config(path)
    assert config.mixed_precision == "no" and config.freeze_vision_tower is True
    assert load_config(overrides=["mixed_precision=no"]).mixed_precision == "no"
    with pytest.raises(ValueError, match="freeze_vision_tower must be true or false"):
        load_config(overrides=["freeze_vision_tower=yes"])


def test_shipped_configs_validate_on_the_val_split_never_on_test():
    for path, config in shipped_train_configs():
        if config.method != "sft":
            assert config.validation_env_kwargs.get("split") == "val", path
            assert config.env_kwargs.get("split") == "train", path


@pytest.mark.parametrize(
    ("pair", "key", "value"),
    [
        ("x=0.5", "x", 0.5),
        ("x=1e-3", "x", 0.001),  # YAML 1.2: a float without a dot
        ("x=4", "x", 4),
        ("x=010", "x", 10),  # decimal, not YAML 1.1's octal
        ("x=-3", "x", -3),
        ("x=true", "x", True),
        ("x=no", "x", "no"),  # only true/false are booleans
        ("x=None", "x", None),
        ("x=null", "x", None),
        ("x=abc", "x", "abc"),
        ("x='0.5'", "x", "0.5"),  # quoted: a string
        ("x=1:20", "x", "1:20"),  # not YAML 1.1's sexagesimal 80
        ("x=2026-11-30", "x", "2026-11-30"),  # not a date
        ("x={modality: vision}", "x", {"modality": "vision"}),
        ("x=", "x", ""),
        ("controller.eta_mu=0.1", "controller.eta_mu", 0.1),
        ("x=a=b", "x", "a=b"),
    ],
)
def test_one_key_value_parser(pair, key, value):
    assert parse_key_value(pair) == (key, value)


@pytest.mark.parametrize(("pair", "message"), [("x", "must be key=value"), ("=3", "must be key=value"), ("x={", "not a YAML value")])
def test_key_value_syntax_errors_are_explained(pair, message):
    with pytest.raises(ValueError, match=message):
        parse_key_value(pair)


def test_env_args_and_overrides_read_values_alike():
    from amft_vlm.cli import parse_env_args

    pairs = ["x=0.5", "n=4", "render_mode=None", "modality=language", "flag=false"]
    expected = {"x": 0.5, "n": 4, "render_mode": None, "modality": "language", "flag": False}
    assert parse_env_args(pairs) == expected
    assert load_config(overrides=[f"env_kwargs.{pair}" for pair in pairs]).env_kwargs == expected
    with pytest.raises(ValueError, match="--env-arg must be key=value, like modality=language; got 'modality'"):
        parse_env_args(["modality"])


def test_config_files_read_yaml_1_2_numbers_and_none(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-3\nsteps: 0100\nexpert_data: None\nmodel: '1e3'\n")
    config = load_config(path)
    assert (config.learning_rate, config.steps, config.expert_data, config.model) == (0.001, 100, None, "1e3")
    with pytest.raises(ValueError, match="learning_rate must be a number"):
        load_config(overrides=["learning_rate='1e-3'"])


def test_cuda_is_refused_where_torch_sees_no_cuda_device(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device: cuda was asked for"):
        load_config(overrides=["device=cuda"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert load_config(overrides=["device=cuda"]).device == "cuda"
