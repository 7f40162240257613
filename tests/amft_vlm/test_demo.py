"""The demo end to end in its quick form (a few steps and episodes), and its command-line errors."""

import json
import os
import time

import pytest
import yaml

from amft_vlm.cli import main
from amft_vlm.demo import EVALUATIONS, FULL, METHODS, QUICK, busy_cores, choose_threads, run_demo
from amft_vlm.report import FIGURES

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_quick_demo_writes_runs_records_report_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "demo"
    result = run_demo(out, quick=True, threads=1, progress=False)
    printed = capsys.readouterr().out

    for method in METHODS:
        run = out / method
        lines = (run / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == list(range(1, QUICK.steps + 1))
        assert (run / "config.yaml").is_file()
        assert list((run / "checkpoints").glob("step-*/policy/config.json"))
    amft_mu = [json.loads(line)["mu"] for line in (out / "amft" / "metrics.jsonl").read_text().splitlines()]
    assert amft_mu[: QUICK.warmup_steps] == [1.0] * QUICK.warmup_steps and all(mu < 1 for mu in amft_mu[QUICK.warmup_steps :])
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
            assert record["episodes"] == QUICK.eval_episodes, path
            assert record["model"].startswith(row), path
    assert json.loads((out / "sft" / "eval" / "test.json").read_text())["split"] == "test"
    assert json.loads((out / "amft" / "eval" / "ood-rule.json").read_text())["setting"] == "GP-L ood-rule"
    sampled = json.loads((out / "amft" / "eval" / "test-sampled.json").read_text())
    assert sampled["decoding"]["temperature"] == 1.0 and sampled["split"] == "test"
    expert = result.records["expert"]
    assert all(expert[name].metrics["success_rate"].value == 1.0 for name in greedy)
    # AMFT started from the SFT run's checkpoint at the end of its warm-up, and its metrics hold every step.
    assert yaml.safe_load((out / "amft" / "config.yaml").read_text())["warm_start"] == str(
        out / "sft" / "checkpoints" / f"step-{QUICK.warmup_steps:06d}"
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
    assert result.table in printed and result.table in (out / "demo.md").read_text()
    assert str(out / "report" / "report.md") in printed
    assert set(result.train_seconds) == set(METHODS)


def test_demo_refuses_a_non_empty_directory_unless_forced(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        run_demo(tmp_path, quick=True, threads=1, progress=False)
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]


def test_demo_steps_must_leave_room_for_warm_up_and_controller(tmp_path):
    with pytest.raises(ValueError, match="steps must be at least 2"):
        run_demo(tmp_path / "demo", steps=1, quick=True, progress=False)


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


def test_full_settings_share_the_budget_and_give_the_controller_a_quarter_of_the_steps(tmp_path):
    from amft_vlm.config import WARM_START_FIELDS

    sft = FULL.train_config("sft", model="m", expert_data=str(tmp_path), output_dir="o")
    amft = FULL.train_config("amft", model="m", expert_data=str(tmp_path), output_dir="o")
    assert [name for name in WARM_START_FIELDS if getattr(sft, name) != getattr(amft, name)] == []
    assert amft.steps - amft.controller.warmup_steps >= amft.steps / 4
    assert sft.save_every == amft.controller.warmup_steps  # the checkpoint AMFT starts from
    assert amft.validation_env_kwargs["split"] == "val"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--steps", "0"], "--steps: expected a positive integer"),
        (["demo", "--threads", "-1"], "--threads: expected a positive integer"),
        (["demo", "--threads", "two"], "--threads: expected a positive integer"),
        (["demo", "--bogus"], "unrecognized arguments"),
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
