"""Config loading: YAML + overrides, types, and validation messages that name the field."""

import pytest
import yaml

from amft_vlm.config import METHODS, TrainConfig, config_to_dict, load_config


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


@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_accepted(method):
    assert load_config(overrides=[f"method={method}"]).method == method


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["method=ppo2"], "method"),
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
    ],
)
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(overrides=overrides)


def test_a_config_file_must_be_a_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(path)


def test_validate_returns_the_config():
    config = TrainConfig()
    assert config.validate() is config


def test_every_shipped_config_loads_and_validates():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        assert load_config(path).steps > 0, path


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
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")):
        config = load_config(path)
        if config.method != "sft":
            assert config.validation_env_kwargs.get("split") == "val", path
            assert config.env_kwargs.get("split") == "train", path
