"""The demo end to end in its quick form (a few steps and episodes), and its command-line errors."""

import json
import logging
import math
import os
import re
import time
from pathlib import Path

import pytest
import yaml

from amft_vlm.cli import main
from amft_vlm.demo import (
    DEFAULT_CONFIG,
    EVALUATIONS,
    METHODS,
    DemoResult,
    busy_cores,
    choose_threads,
    load_demo_config,
    run_demo,
    settings_note,
)
from amft_vlm.report import FIGURES

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
README = Path(__file__).resolve().parents[2] / "README.md"


def expected_budget(config, method):
    """What a demo run of `method` consumes by its config: the README's budget table, and every quick run's metrics."""
    train, controller = config.train, config.train.controller
    controlled = train.steps - controller.warmup_steps if method == "amft" else 0
    rollouts_per_update = train.episodes_per_step * train.group_size
    parts = 1 if train.mini_batch_size is None else math.ceil(rollouts_per_update / train.mini_batch_size)
    return {
        "budget_updates": train.steps * train.ppo_epochs * parts,
        "budget_expert_examples": train.steps * train.ppo_epochs * train.sft_batch_size,
        "budget_rollout_episodes": controlled * rollouts_per_update,
        "budget_validation_episodes": math.ceil(controlled / controller.meta_interval) * controller.validation_states * controller.validation_samples,
    }


def test_quick_demo_writes_runs_records_report_and_the_table(tmp_path, caplog):
    out = tmp_path / "demo"
    quick = load_demo_config(quick=True)
    warmup = quick.train.controller.warmup_steps
    with caplog.at_level(logging.INFO, logger="amft_vlm.demo"):
        result = run_demo(out, quick, threads=1, progress=False)
    logged = caplog.text

    for method in METHODS:
        run = out / method
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == list(range(1, quick.train.steps + 1))
        assert {key: metrics[-1][key] for key in expected_budget(quick, method)} == expected_budget(quick, method), method
        assert (run / "config.yaml").is_file()
        assert list((run / "checkpoints").glob("step-*/policy/config.json"))
    amft_mu = [json.loads(line)["mu"] for line in (out / "amft" / "metrics.jsonl").read_text().splitlines()]
    assert amft_mu[:warmup] == [1.0] * warmup and all(mu < 1 for mu in amft_mu[warmup:])
    assert (out / "expert" / "manifest.json").is_file() and (out / "initial-model" / "config.json").is_file()

    greedy = [e.name for e in EVALUATIONS if e.temperature is None]
    record_files = {
        "expert": [out / "baselines" / "eval" / f"expert-{name}.json" for name in greedy],
        "random": [out / "baselines" / "eval" / f"random-{name}.json" for name in greedy],
        **{method: [out / method / "eval" / f"{e.name}.json" for e in EVALUATIONS] for method in METHODS},
    }
    for row, files in record_files.items():
        for path in files:
            record = json.loads(path.read_text())
            assert record["episodes"] == quick.demo.eval_episodes, path
            assert record["model"].startswith(row), path
    assert json.loads((out / "sft" / "eval" / "test.json").read_text())["split"] == "test"
    assert json.loads((out / "amft" / "eval" / "ood-rule.json").read_text())["setting"] == "GP-L ood-rule"
    sampled = json.loads((out / "amft" / "eval" / "test-sampled.json").read_text())
    assert sampled["decoding"]["temperature"] == 1.0 and sampled["split"] == "test"
    expert = result.records["expert"]
    assert all(expert[name].metrics["success_rate"].value == 1.0 for name in greedy)
    # AMFT started from the SFT run's checkpoint at the end of its warm-up, and its metrics hold every step.
    assert yaml.safe_load((out / "amft" / "config.yaml").read_text())["warm_start"] == str(
        out / "sft" / "checkpoints" / f"step-{warmup:06d}"
    )

    report = (out / "report" / "report.md").read_text()
    assert result.report == out / "report" / "report.md"
    for figure in FIGURES:
        assert (out / "report" / f"{figure.name}.png").read_bytes().startswith(PNG_SIGNATURE)
    assert report.count("| GP-L ") == 2 * len(greedy) + len(METHODS) * len(EVALUATIONS)  # every record

    first_table = result.table.split("\n\n")[1]
    rows = [line for line in first_table.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["expert", "random", *METHODS]
    assert "shared with sft" in rows[-1]
    assert "retry success, training hands" in result.table and "RL rollout episodes" in result.table
    assert result.table in (out / "demo.md").read_text() and result.table.endswith(settings_note(quick))
    assert "5/5 writing the report" in logged and str(out / "report" / "report.md") in logged
    assert set(result.train_seconds) == set(METHODS)


def test_demo_refuses_a_non_empty_directory_unless_forced(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        run_demo(tmp_path, load_demo_config(quick=True), threads=1, progress=False)
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]


def test_demo_steps_must_leave_room_for_warm_up_and_controller():
    with pytest.raises(ValueError, match="steps must be at least 2"):
        load_demo_config(steps=1, quick=True)
    scaled = load_demo_config(steps=100)  # the shipped 262 of 350 warm-up steps, scaled
    assert (scaled.train.steps, scaled.train.controller.warmup_steps) == (100, 75)
    assert load_demo_config(steps=2).train.controller.warmup_steps == 1


def test_demo_config_overrides_and_quick(tmp_path):
    full, quick = load_demo_config(), load_demo_config(quick=True)
    assert (quick.train.steps, quick.demo.eval_episodes) == (4, 3) and quick.train.learning_rate == full.train.learning_rate
    overridden = load_demo_config(DEFAULT_CONFIG, ["demo.eval_episodes=20", "seed=1", "controller.eta_h=0.02"], quick=True)
    assert (overridden.demo.eval_episodes, overridden.train.seed, overridden.train.controller.eta_h) == (20, 1, 0.02)
    assert overridden.train.steps == 4  # the quick overrides stay under the user's
    sft = full.train_config("sft", model="m", expert_data=str(tmp_path), output_dir="o")
    assert sft.method == "sft" and sft.save_every == full.train.controller.warmup_steps  # the checkpoint AMFT starts from


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=rl"], "method: the demo sets it for each run"),
        (["output_dir=x"], "output_dir: the demo sets it"),
        (["model=Qwen/Qwen2-VL-2B-Instruct"], "model: the demo builds a tiny model"),
        (["demo.eval_episodes=0"], "demo.eval_episodes must be a positive integer"),
        (["demo.bogus=1"], "unknown config field 'demo.bogus'"),
        (["steps=100"], "controller.warmup_steps"),
        (["env_kwargs={modality: vision, split: train}"], "env_id / env_kwargs: the demo trains and evaluates GeneralPoints-v0"),
        (["env_id=VIRL-v0"], "env_id / env_kwargs: the demo trains and evaluates GeneralPoints-v0"),
    ],
)
def test_bad_demo_configs_are_explained(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_demo_config(overrides=overrides)


def test_a_demo_config_needs_its_demo_section(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text("model: tiny:qwen2-vl\ndemo: {hidden_size: 64}\n")
    with pytest.raises(ValueError, match="'demo.num_layers' is missing"):
        load_demo_config(path)
    path.write_text("model: tiny:qwen2-vl\n")
    with pytest.raises(ValueError, match="demo: section"):
        load_demo_config(path)


def test_threads_follow_the_load(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr("amft_vlm.demo.busy_cores", lambda: 1.0)
    assert choose_threads() == 1
    monkeypatch.setattr("amft_vlm.demo.busy_cores", lambda: 0.1)
    assert choose_threads() == 2
    monkeypatch.setattr("amft_vlm.demo.busy_cores", lambda: 5.0)
    assert choose_threads() == 1
    assert choose_threads(3) == 3
    with pytest.raises(ValueError, match="at least 1"):
        choose_threads(0)


def test_busy_cores_sees_a_spinning_process():
    import multiprocessing

    idle = busy_cores(window=0.3)
    spinner = multiprocessing.get_context("spawn").Process(target=_spin, args=(3.0,))
    spinner.start()
    try:
        time.sleep(0.5)  # let it start
        busy = busy_cores(window=0.5)
    finally:
        spinner.terminate()
        spinner.join()
    assert 0.0 <= idle <= (os.cpu_count() or 1)
    assert busy > idle + 0.5 or busy > 0.8


def _spin(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_the_readme_states_the_shipped_demo_config_and_its_budget():
    """The README's demo numbers (prose, the table's note, the budget table) are the shipped config's."""
    config = load_demo_config()
    train, controller, sizes = config.train, config.train.controller, config.demo
    readme = " ".join(README.read_text().split())
    controlled = train.steps - controller.warmup_steps
    assert controlled >= train.steps / 4  # the controller runs for at least the last quarter
    for phrase in (
        f"hidden size {sizes.hidden_size}, {sizes.num_layers} layers",
        f"a {sizes.vocab_size}-entry tokenizer",
        f"records {train.expert_episodes} expert episodes",
        f"{train.steps} steps of {train.sft_batch_size} expert dialogues",
        f"AMFT's first {controller.warmup_steps} steps are SFT's warm-up",
        f"for its last {controlled} steps",
        f"{train.episodes_per_step}x{train.group_size} RL rollouts per step",
        f"a meta-gradient every {controller.meta_interval} steps on {controller.validation_states}x{controller.validation_samples} episodes",
        settings_note(config),
    ):
        assert phrase in readme, phrase
    for method in METHODS:
        row = re.search(rf"^\| {method} \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \| [\d,]+ \|$", README.read_text(), re.MULTILINE)
        assert row, f"no budget row for {method} in the README"
        stated = [int(cell.replace(",", "")) for cell in row.groups()]
        assert stated == list(expected_budget(config, method).values()), method


def test_cli_prints_the_table_and_passes_config_and_overrides(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_run_demo(out_dir, config, *, threads, force):
        seen.update(out=out_dir, config=config, threads=threads, force=force)
        return DemoResult(Path(out_dir), "| the table |", {}, Path(out_dir) / "report" / "report.md", {}, 1.0, 1)

    monkeypatch.setattr("amft_vlm.demo.run_demo", fake_run_demo)
    assert main(["demo", "--out", str(tmp_path), "--quick", "--threads", "1", "--steps", "6", "demo.eval_episodes=7", "seed=3"]) == 0
    assert "| the table |" in capsys.readouterr().out
    config = seen["config"]
    assert (config.train.steps, config.train.controller.warmup_steps, config.demo.eval_episodes, config.train.seed) == (6, 3, 7, 3)
    assert (seen["threads"], seen["force"]) == (1, False)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--steps", "0"], "--steps: expected a positive integer"),
        (["demo", "--threads", "-1"], "--threads: expected a positive integer"),
        (["demo", "--threads", "two"], "--threads: expected a positive integer"),
        (["demo", "--bogus"], "unrecognized arguments"),
        (["demo", "steps"], "overrides must be key=value"),
        (["demo", "--config", "/no/such.yaml"], "demo config /no/such.yaml not found"),
    ],
)
def test_cli_argument_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_a_non_empty_out_directory(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(tmp_path), "--quick"])
    assert exit_info.value.code == 2
    assert "is not empty" in capsys.readouterr().err
