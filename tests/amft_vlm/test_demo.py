"""The demo end to end in its quick form (a few steps and episodes), and its command-line errors."""

import json
import logging
import logging.handlers
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
    RUNS,
    DemoResult,
    load_demo_config,
    run_demo,
    settings_note,
)
from amft_vlm.evaluation.report import FIGURES
from amft_vlm.run.jobs import busy_cores, choose_threads

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def expected_budget(config, method):
    """What a demo run of `method` consumes by its config: docs/demo.md's budget table, and every quick run's metrics."""
    train, controller = config.train, config.train.controller
    controlled = train.steps - controller.warmup_steps if method.startswith("amft") else 0
    rollouts_per_update = train.episodes_per_step * train.group_size
    parts = 1 if train.mini_batch_size is None else math.ceil(rollouts_per_update / train.mini_batch_size)
    return {
        "budget_updates": train.steps * train.ppo_epochs * parts,
        "budget_expert_examples": train.steps * train.ppo_epochs * train.sft_batch_size,
        "budget_rollout_episodes": controlled * rollouts_per_update,
        "budget_validation_episodes": math.ceil(controlled / controller.meta_interval) * controller.validation_states * controller.validation_samples,
    }


NAMES = [run.name for run in RUNS]


@pytest.fixture(scope="module", params=[1, 2], ids=["one-process", "side-by-side"])
def quick_demo(request, tmp_path_factory):
    """The quick demo, in this process (one thread) and with its runs side by side in two worker processes."""
    out = tmp_path_factory.mktemp(f"demo-{request.param}") / "demo"
    quick = load_demo_config(quick=True)
    handler = logging.handlers.MemoryHandler(capacity=10_000)
    logger = logging.getLogger("amft_vlm.demo")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        result = run_demo(out, quick, threads=request.param, progress=False)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    logged = "\n".join(record.getMessage() for record in handler.buffer)
    return out, quick, result, logged


def test_quick_demo_writes_runs_records_report_and_the_table(quick_demo):
    out, quick, result, logged = quick_demo
    warmup = quick.train.controller.warmup_steps

    for name in NAMES:
        run = out / name
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == list(range(1, quick.train.steps + 1))
        assert {key: metrics[-1][key] for key in expected_budget(quick, name)} == expected_budget(quick, name), name
        assert (run / "config.yaml").is_file()
        assert list((run / "checkpoints").glob("step-*/policy/config.json"))
    for name in ("amft", "amft-corrupted"):
        mu = [json.loads(line)["mu"] for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert mu[:warmup] == [1.0] * warmup and all(value < 1 for value in mu[warmup:])
    assert (out / "expert" / "manifest.json").is_file() and (out / "initial-model" / "config.json").is_file()
    manifest = json.loads((out / "expert-corrupted" / "manifest.json").read_text())
    assert manifest["corruption"]["kind"] == quick.demo.corruption.kind and manifest["corruption"]["dialogues"] > 0

    greedy = [e.name for e in EVALUATIONS if e.temperature is None]
    record_files = {
        "expert": [out / "baselines" / "eval" / f"expert-{name}.json" for name in greedy],
        "random": [out / "baselines" / "eval" / f"random-{name}.json" for name in greedy],
        **{name: [out / name / "eval" / f"{e.name}.json" for e in EVALUATIONS] for name in NAMES},
    }
    for row, files in record_files.items():
        for path in files:
            record = json.loads(path.read_text())
            assert record["episodes"] == quick.demo.eval_episodes, path
            assert record["model"].startswith(row), path
    assert json.loads((out / "sft" / "eval" / "test.json").read_text())["split"] == "test"
    assert json.loads((out / "amft" / "eval" / "ood-rule.json").read_text())["setting"] == "GP-L ood-rule"
    sampled = json.loads((out / "amft" / "eval" / "train-sampled.json").read_text())
    assert sampled["decoding"]["temperature"] == 1.0 and sampled["split"] == "train"
    expert = result.records["expert"]
    assert all(expert[name].metrics["success_rate"].value == 1.0 for name in greedy)
    # Both AMFT runs started from the SFT run's checkpoint at the end of its warm-up; the corrupted one
    # imitates the corrupted expert after it.
    checkpoint = str(out / "sft" / "checkpoints" / f"step-{warmup:06d}")
    clean, corrupted = (yaml.safe_load((out / name / "config.yaml").read_text()) for name in ("amft", "amft-corrupted"))
    assert clean["warm_start"] == corrupted["warm_start"] == checkpoint
    assert clean["expert_data_after_warmup"] is None and corrupted["expert_data_after_warmup"] == str(out / "expert-corrupted")

    report = (out / "report" / "report.md").read_text()
    assert result.report == out / "report" / "report.md"
    for figure in FIGURES:
        assert (out / "report" / f"{figure.name}.png").read_bytes().startswith(PNG_SIGNATURE)
    assert report.count("| GP-L ") == 2 * len(greedy) + len(NAMES) * len(EVALUATIONS)  # every record

    first_table = result.table.split("\n\n")[1]
    rows = [line for line in first_table.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["expert", "random", *NAMES]
    assert "shared with sft" in rows[-1] and "shared with sft" in rows[-2]
    assert "retry success, training hands" in result.table and "RL rollout episodes" in result.table
    assert "What the controller did" in result.table and "pooled t at the end" in result.table
    assert result.table in (out / "demo.md").read_text() and result.table.endswith(settings_note(quick))
    assert "5/5 writing the report" in logged and str(out / "report" / "report.md") in logged
    assert set(result.train_seconds) == set(NAMES)


def test_the_quick_demo_summary_says_what_each_run_was_and_what_mu_did(quick_demo):
    out, quick, result, _ = quick_demo
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(result.summary))
    runs = {run["name"]: run for run in summary["runs"]}
    assert [(run["name"], run["method"], run["expert"]) for run in summary["runs"]] == [(r.name, r.method, r.expert) for r in RUNS]
    assert runs["sft"]["mu_start"] == runs["sft"]["mu_end"] == 1.0
    warmup = quick.train.controller.warmup_steps
    for name in ("amft", "amft-corrupted"):
        metrics = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert runs[name]["mu_start"] == quick.train.controller.mu_init
        assert runs[name]["mu_end"] == metrics[-1]["next_mu"]
        assert runs[name]["meta_term_sum"] == pytest.approx(sum(m["meta_term"] or 0.0 for m in metrics[warmup:]))
        assert runs[name]["entropy_term_sum"] == pytest.approx(sum(m["entropy_term"] or 0.0 for m in metrics[warmup:]))
        assert runs[name]["meta_steps"] == sum(m.get("meta_signal") is not None for m in metrics)
        assert set(runs[name]["success"]) == {e.name for e in EVALUATIONS}
    assert summary["seed"] == quick.train.seed and summary["threads"] in (1, 2) and "cores" in summary["machine"]


def test_demo_refuses_a_non_empty_directory_unless_forced(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        run_demo(tmp_path, load_demo_config(quick=True), threads=1, progress=False)
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]


def test_demo_steps_must_leave_room_for_warm_up_and_controller():
    with pytest.raises(ValueError, match="steps must be at least 2"):
        load_demo_config(steps=1, quick=True)
    scaled = load_demo_config(steps=100)  # the shipped 276 of 300 warm-up steps, scaled
    assert (scaled.train.steps, scaled.train.controller.warmup_steps) == (100, 92)
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
    monkeypatch.setattr("amft_vlm.run.jobs.busy_cores", lambda: 1.0)
    assert choose_threads() == 1
    monkeypatch.setattr("amft_vlm.run.jobs.busy_cores", lambda: 0.1)
    assert choose_threads() == 2
    monkeypatch.setattr("amft_vlm.run.jobs.busy_cores", lambda: 5.0)
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


def test_cli_prints_the_table_and_passes_config_and_overrides(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_run_demo(out_dir, config, *, threads, force):
        seen.update(out=out_dir, config=config, threads=threads, force=force)
        return DemoResult(Path(out_dir), "| the table |", {}, Path(out_dir) / "report" / "report.md", {}, 1.0, 1, {})

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
