"""Bad input gets a one-line answer before any work starts, and leaves nothing behind.

Each command's inputs (environment ids and arguments, model paths and ids, expert datasets, devices,
output paths, config files) are checked by `amft_vlm.run.preflight` and the loaders before a model loads
or an episode is played; the command line prints the message on one line and exits with 2.
"""

import json
import shutil

import pytest
import torch

import amft_vlm.run.preflight as preflight
from agents.baselines import ExpertAgent, RandomTextAgent
from amft_vlm.cli import main
from amft_vlm.rollout.expert_data import collect, load_dialogues, read_manifest
from amft_vlm.run.config import load_config
from amft_vlm.run.preflight import (
    check_device,
    check_environment,
    check_expert_dataset,
    check_model_source,
    check_output_file,
    writable_directory,
)

GP_LANGUAGE = {"modality": "language", "split": "train"}


def run_cli(argv, capsys):
    """(exit status, stderr) of ``amft-vlm ARGV``; a clean error exits with 2 and a one-line message."""
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err


def one_line_error(argv, capsys, *expected):
    status, err = run_cli(argv, capsys)
    assert status == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in expected:
        assert fragment in err, err
    return err


@pytest.fixture
def read_only(monkeypatch):
    """Make every directory unwritable to the write check (permissions cannot do it for root, who runs CI)."""

    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", str(dir))

    monkeypatch.setattr(preflight.tempfile, "mkstemp", refuse)


@pytest.fixture(scope="module")
def expert_dataset(tmp_path_factory):
    """A GeneralPoints language dataset on the train split, 3 solved episodes."""
    out = tmp_path_factory.mktemp("data") / "experts"
    collect("GeneralPoints-v0", GP_LANGUAGE, ExpertAgent(), episodes=3, seed=0, out_dir=out, progress=False)
    return out


def copy_with_manifest(source, target, **changes):
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest.update(changes)
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


# --- Environments -----------------------------------------------------------------------------------


def test_environment_checks_name_the_setting_and_what_it_takes():
    with pytest.raises(ValueError, match=r"env_id: no environment 'Nope-v0' is registered; amft-vlm's are GeneralPoints-v0, VIRL-v0"):
        check_environment("Nope-v0", {})
    with pytest.raises(ValueError, match=r"env_kwargs: GeneralPoints-v0 takes no argument 'bogus'; it takes modality, .*num_cards"):
        check_environment("GeneralPoints-v0", {"bogus": 1})
    with pytest.raises(ValueError, match=r"validation_env_kwargs: VIRL-v0 refuses .*modality"):
        check_environment("VIRL-v0", {"modality": "smell"}, what="validation_env_kwargs")
    check_environment("VIRL-v0", {"modality": "language", "split": "val"})


# --- Models and devices -----------------------------------------------------------------------------


def test_model_source_checks(tmp_path, tiny_checkpoints, monkeypatch):
    check_model_source("tiny:qwen2-vl")
    check_model_source(str(tiny_checkpoints["qwen2-vl"]))
    with pytest.raises(ValueError, match=r"model: a tiny model spec is tiny:qwen2-vl or tiny:qwen2.5-vl; got 'tiny:llama'"):
        check_model_source("tiny:llama")
    with pytest.raises(ValueError, match=r"model: /no/such/model does not exist"):
        check_model_source("/no/such/model")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"is a file; give a model directory"):
        check_model_source(str(tmp_path / "weights.bin"))
    run = tmp_path / "step-10"
    (run / "policy").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"has no config.json.*in its policy/ directory"):
        check_model_source(str(run))

    def offline(repo, filename, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr("transformers.utils.cached_file", offline)
    with pytest.raises(ValueError, match=r"model: 'someorg/somemodel' is not a local directory.*couldn't connect"):
        check_model_source("someorg/somemodel")


def test_device_checks(monkeypatch):
    check_device("auto")
    check_device("cpu")
    with pytest.raises(ValueError, match=r"device: 'tpu' is not a device; use auto, cpu, cuda or cuda:N"):
        check_device("tpu")
    with pytest.raises(ValueError, match=r"is not supported"):
        check_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device: cuda:1 was asked for, but this torch .* sees no CUDA device"):
        check_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"device: cuda:2 does not exist; this machine has 2 CUDA device"):
        check_device("cuda:2")


# --- Output paths -----------------------------------------------------------------------------------


def test_output_path_checks(tmp_path, read_only):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match=r"--out: .*a-file is a file; give a directory"):
        writable_directory(tmp_path / "a-file", what="--out")
    with pytest.raises(ValueError, match=r"--out: cannot write in .*a-file/sub \(Not a directory\)"):
        writable_directory(tmp_path / "a-file" / "sub", what="--out")
    with pytest.raises(ValueError, match=r"--out: cannot write in .*ro \(Permission denied\); choose a writable directory"):
        writable_directory(tmp_path / "ro", what="--out")
    with pytest.raises(ValueError, match=r"--out: .* is a directory; give a file name"):
        check_output_file(tmp_path, what="--out")
    with pytest.raises(ValueError, match=r"--out: .*missing does not exist"):
        check_output_file(tmp_path / "missing" / "record.json", what="--out")


def test_writable_directory_creates_it_and_leaves_no_probe(tmp_path):
    target = writable_directory(tmp_path / "a" / "b", what="output_dir")
    assert target.is_dir() and list(target.iterdir()) == []


# --- Config files -----------------------------------------------------------------------------------


def test_config_file_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(ValueError, match=r"is a directory; --config takes a YAML file"):
        load_config(tmp_path)
    with pytest.raises(ValueError, match=r"nothing.yaml not found"):
        load_config(tmp_path / "nothing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("steps: 10\nenv_kwargs: {modality: language\nseed: 1\n")
    with pytest.raises(ValueError, match=r"broken.yaml, line \d+, column \d+: not valid YAML"):
        load_config(broken)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00steps")
    with pytest.raises(ValueError, match=r"binary.yaml cannot be read"):
        load_config(binary)


# --- Expert datasets --------------------------------------------------------------------------------


def test_a_matching_dataset_passes_and_counts_its_solved_dialogues(expert_dataset):
    assert check_expert_dataset(expert_dataset, "GeneralPoints-v0", GP_LANGUAGE) == 3
    # Arguments left at their defaults on either side are compared as the environment is built.
    assert check_expert_dataset(expert_dataset, "GeneralPoints-v0", {**GP_LANGUAGE, "num_cards": 4}) == 3


def test_a_dataset_of_another_environment_or_modality_is_refused(expert_dataset, tmp_path):
    with pytest.raises(ValueError, match=r"was recorded in GeneralPoints-v0, but the run trains on VIRL-v0"):
        check_expert_dataset(expert_dataset, "VIRL-v0", {"modality": "language"})
    with pytest.raises(ValueError, match=r"modality: 'language' there, 'vision' here"):
        check_expert_dataset(expert_dataset, "GeneralPoints-v0", {**GP_LANGUAGE, "modality": "vision"})
    with pytest.raises(ValueError, match=r"split: 'train' there, 'all' here"):
        check_expert_dataset(expert_dataset, "GeneralPoints-v0", {"modality": "language"})


def test_empty_and_all_failed_datasets_are_refused(expert_dataset, tmp_path):
    empty = copy_with_manifest(expert_dataset, tmp_path / "empty")
    (empty / "dialogues.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"has no dialogue of a solved episode"):
        check_expert_dataset(empty, "GeneralPoints-v0", GP_LANGUAGE)
    failed = tmp_path / "failed"
    collect("GeneralPoints-v0", GP_LANGUAGE, RandomTextAgent(seed=0), episodes=2, seed=0, out_dir=failed, progress=False)
    assert load_dialogues(failed, successful_only=False)
    with pytest.raises(ValueError, match=r"has no dialogue of a solved episode"):
        check_expert_dataset(failed, "GeneralPoints-v0", GP_LANGUAGE)


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ("[1, 2]", r"a manifest is a JSON object; got list"),
        ("{not json", r"is not readable JSON"),
        ('{"format_version": 1, "env_kwargs": {}, "agent": "expert"}', r"env_id must be a JSON string; got None"),
        ('{"format_version": 1, "env_id": "GeneralPoints-v0", "env_kwargs": [], "agent": "x"}', r"env_kwargs must be a JSON object"),
        ('{"format_version": 7}', r"format_version 7 is not the supported 1"),
    ],
)
def test_damaged_manifests_are_named(expert_dataset, tmp_path, manifest, message):
    damaged = copy_with_manifest(expert_dataset, tmp_path / "damaged")
    (damaged / "manifest.json").write_text(manifest)
    with pytest.raises(ValueError, match=message):
        read_manifest(damaged)


def test_dialogue_lines_that_are_not_objects_are_named(expert_dataset, tmp_path):
    damaged = copy_with_manifest(expert_dataset, tmp_path / "damaged")
    (damaged / "dialogues.jsonl").write_text("[1]\n")
    with pytest.raises(ValueError, match=r"dialogues.jsonl, line 1: not a dialogue record \(a JSON list\)"):
        check_expert_dataset(damaged, "GeneralPoints-v0", GP_LANGUAGE)
    (damaged / "dialogues.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"dialogues.jsonl not found: the dataset .* is incomplete"):
        load_dialogues(damaged)


# --- The command line -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--env", "NoSuchEnv-v0"], "--env: no environment 'NoSuchEnv-v0' is registered"),
        (["--env-arg", "bogus=1"], "--env-arg: GeneralPoints-v0 takes no argument 'bogus'"),
        (["--env-arg", "num_cards=-1"], "--env-arg: GeneralPoints-v0 refuses {'num_cards': -1}"),
    ],
)
def test_collect_refuses_bad_environments_and_leaves_nothing(tmp_path, capsys, extra, expected):
    one_line_error(["collect", "--episodes", "2", "--out", str(tmp_path / "data"), *extra], capsys, expected)
    assert list(tmp_path.iterdir()) == []


def test_collect_refuses_a_file_and_a_read_only_place(tmp_path, capsys, read_only):
    (tmp_path / "a-file").write_text("")
    one_line_error(["collect", "--episodes", "2", "--out", str(tmp_path / "a-file")], capsys, "a-file is a file")
    one_line_error(["collect", "--episodes", "2", "--out", str(tmp_path / "data")], capsys, "--out: cannot write in")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file"]


def test_a_collection_that_fails_midway_leaves_nothing(tmp_path):
    class FailsOnSecond(ExpertAgent):
        answered = 0

        def act(self, observation, env):
            self.answered += 1
            if self.answered == 2:
                raise RuntimeError("the agent's server went away")
            return super().act(observation, env)

    with pytest.raises(RuntimeError, match="went away"):
        collect("GeneralPoints-v0", GP_LANGUAGE, FailsOnSecond(), episodes=3, seed=0, out_dir=tmp_path / "data", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_eval_checks_out_device_and_model_before_playing(tmp_path, capsys, monkeypatch):
    played = []
    monkeypatch.setattr("amft_vlm.evaluation.evaluate.RolloutEngine", lambda *args, **kwargs: played.append(args))
    base = ["eval", "--agent", "expert", "--episodes", "2"]
    one_line_error([*base, "--out", str(tmp_path)], capsys, "--out:", "is a directory; give a file name")
    one_line_error([*base, "--out", str(tmp_path / "no" / "r.json")], capsys, "does not exist; create it")
    one_line_error([*base, "--env-arg", "bogus=2"], capsys, "takes no argument 'bogus'")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = ["eval", "--model", "tiny:qwen2-vl", "--episodes", "1"]
    one_line_error([*model, "--device", "cuda"], capsys, "device: cuda was asked for, but this torch")
    one_line_error([*model, "--device", "tpu"], capsys, "device: 'tpu' is not a device")
    one_line_error(["eval", "--model", str(tmp_path / "missing"), "--episodes", "1"], capsys, "model:", "does not exist")
    assert played == [] and list(tmp_path.iterdir()) == []


def test_read_only_outputs_are_refused_before_the_work(tmp_path, capsys, read_only, monkeypatch):
    monkeypatch.setattr("amft_vlm.evaluation.evaluate.RolloutEngine", lambda *args, **kwargs: pytest.fail("an evaluation ran"))
    (tmp_path / "ro").mkdir()
    one_line_error(["eval", "--agent", "expert", "--episodes", "2", "--out", str(tmp_path / "ro" / "r.json")], capsys, "cannot write in")
    one_line_error(["report", str(tmp_path), "--out", str(tmp_path / "ro")], capsys, "--out: cannot write in")
    one_line_error(["demo", "--quick", "--out", str(tmp_path / "ro")], capsys, "--out: cannot write in")


def test_verbose_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="takes no argument 'bogus'"):
        main(["-v", "collect", "--episodes", "1", "--env-arg", "bogus=1", "--out", str(tmp_path / "d")])


# --- Training ---------------------------------------------------------------------------------------


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if the trainer gets as far as building or loading a model."""

    def loaded(*args, **kwargs):
        pytest.fail("a model was built or loaded before the bad input was refused")

    monkeypatch.setattr("amft_vlm.learning.trainer.resolve_model_spec", loaded)
    monkeypatch.setattr("amft_vlm.learning.trainer.load_training_policy", loaded)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["env_id=Nope-v0"], r"env_id: no environment 'Nope-v0' is registered"),
        (["env_kwargs={modality: language, bogus: 1}"], r"env_kwargs: GeneralPoints-v0 takes no argument 'bogus'"),
        (["validation_env_kwargs={modality: smell}"], r"validation_env_kwargs: GeneralPoints-v0 refuses"),
        (["model=/no/such/model"], r"model: /no/such/model does not exist"),
        (["model=tiny:llama"], r"model: a tiny model spec is"),
        (["method=sft", "env_kwargs={modality: vision, split: train}"], r"modality: 'language' there, 'vision' here"),
        (["method=sft", "env_id=VIRL-v0", "env_kwargs={modality: language}", "validation_env_kwargs={modality: language}"],
         r"was recorded in GeneralPoints-v0, but the run trains on VIRL-v0"),
    ],
)  # fmt: skip
def test_training_refuses_bad_inputs_before_any_model_loads(tmp_path, expert_dataset, no_model_loads, overrides, expected):
    from amft_vlm.learning.trainer import Trainer

    config = load_config(None, [f"output_dir={tmp_path / 'run'}", f"expert_data={expert_dataset}", "method=rl", *overrides])
    with pytest.raises(ValueError, match=expected):
        Trainer(config, progress=False)


def test_training_refuses_an_unwritable_run_directory_and_empty_data(tmp_path, expert_dataset, no_model_loads, read_only, capsys):
    run = ["train", f"output_dir={tmp_path / 'run'}", "method=rl"]
    one_line_error(run, capsys, "output_dir: cannot write in")
    empty = copy_with_manifest(expert_dataset, tmp_path / "empty")
    (empty / "dialogues.jsonl").write_text("")
    one_line_error(["train", "method=sft", f"expert_data={empty}"], capsys, "has no dialogue of a solved episode")
    one_line_error(["train", "--config", str(tmp_path)], capsys, "is a directory; --config takes a YAML file")


def test_an_expert_that_solves_nothing_is_refused(tmp_path, tiny_checkpoints, monkeypatch):
    from amft_vlm.learning.trainer import Trainer

    monkeypatch.setattr("amft_vlm.learning.training_setup.ExpertAgent", lambda: RandomTextAgent(seed=0))
    config = load_config(None, [f"output_dir={tmp_path}", f"model={tiny_checkpoints['qwen2-vl']}", "method=sft", "expert_episodes=2"])
    with pytest.raises(ValueError, match=r"the expert solved none of 2 episodes of GeneralPoints-v0"):
        Trainer(config, progress=False)
