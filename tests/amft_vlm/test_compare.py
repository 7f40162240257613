"""`amft-vlm compare` on a shortened grid: its runs, records, table and summary, resume, parallel jobs, and its checks."""

import json
import math
import shutil

import pytest
import yaml

from amft_vlm.cli import main
from amft_vlm.compare import (
    DEFAULT_CONFIG,
    CostModel,
    RunWork,
    cost_model,
    estimate_wall_seconds,
    grid_plan,
    load_compare_config,
    mean_interval,
    parse_seeds,
    run_compare,
    run_work,
    runner,
    steps_to_threshold,
    t_quantile_975,
    threads_per_job,
    trailing_mean,
)
from amft_vlm.evaluation.evaluate import load_record
from amft_vlm.learning.methods import METHODS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PAPER_CONFIG = DEFAULT_CONFIG.with_name("compare-gp-vl.yaml")

SHORT = [
    "steps=3", "save_every=2", "episodes_per_step=2", "group_size=2", "sft_batch_size=4", "num_envs=4", "max_new_tokens=16",
    "expert_episodes=12", "compare.eval_episodes=3", "compare.eval_envs=3", "compare.smoothing=2", "compare.thresholds=[0.5]",
]
"""A shortened grid: 3 steps per run (checkpoints at 2 and 3), 3 episodes per evaluation."""


def short_config(model, *overrides, methods=("sft", "rl"), seeds=2, jobs=1):
    return load_compare_config(overrides=[*SHORT, f"model={model}", *overrides], methods=list(methods), seeds=seeds, jobs=jobs, threads=1)


@pytest.fixture(scope="module")
def grid(tiny_checkpoints, tmp_path_factory):
    """sft and rl x seeds 0 and 1, run once in this process; the tests below read it (the resume test leaves it whole)."""
    out = tmp_path_factory.mktemp("compare")
    config = short_config(tiny_checkpoints["qwen2-vl"])
    return config, out, run_compare(config, out, progress=False)


def table_rows(table):
    return {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]] for line in table.splitlines() if line.startswith("| ") and "---" not in line}


def test_grid_writes_every_run_record_table_and_curve(grid):
    config, out, result = grid
    for method in ("sft", "rl"):
        for seed in (0, 1):
            run = out / "runs" / method / f"seed-{seed}"
            saved = yaml.safe_load((run / "config.yaml").read_text())
            assert (saved["method"], saved["seed"], saved["output_dir"]) == (method, seed, str(run))
            assert saved["expert_data"] == str(out / "expert")
            assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
            assert (run / "checkpoints" / "step-000003" / "policy" / "config.json").is_file()
            for setting, split in (("id", "test"), ("ood-rule", "all")):
                record = load_record(out / "eval" / f"{method}-seed-{seed}-{setting}.json")
                assert (record.episodes, record.split) == (3, split)
                assert record.model.endswith(f"{method}/seed-{seed}/checkpoints/step-000003/policy")
    assert sorted(result.trained) == ["rl/seed-0", "rl/seed-1", "sft/seed-0", "sft/seed-1"]
    assert len(result.evaluated) == 8

    rows = table_rows(result.table)
    header = rows.pop("method")
    assert header[:2] == ["GP-L id, held-out (test)", "GP-L ood-rule"]
    assert {"updates", "rollout episodes", "validation episodes", "expert examples", "trained tokens", "steps to 50%"} <= set(header)
    assert list(rows) == ["sft", "rl"]
    for cells in rows.values():
        assert all(" [" in cell and cell.endswith("]") for cell in cells[:2])  # mean [low, high]
    by_title = {method: dict(zip(header, cells, strict=True)) for method, cells in rows.items()}
    assert by_title["sft"]["updates"] == by_title["rl"]["updates"] == "3"
    assert (by_title["sft"]["rollout episodes"], by_title["rl"]["rollout episodes"]) == ("0", "12")  # 3 steps x 2 x 2
    assert (by_title["sft"]["expert examples"], by_title["rl"]["expert examples"]) == ("12", "0")
    assert by_title["sft"]["steps to 50%"] == "—¹" and "¹ plays no rollouts" in result.table
    assert by_title["rl"]["steps to 50%"] == "not reached"  # a random tiny model solves no hand
    assert result.table in (out / "compare.md").read_text()
    assert result.curves == out / "curves.png" and result.curves.read_bytes().startswith(PNG_SIGNATURE)


def test_summary_holds_the_records_numbers_with_their_interval(grid):
    _, out, result = grid
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(result.summary))
    for method in ("sft", "rl"):
        for setting in ("id", "ood-rule"):
            values = [load_record(out / "eval" / f"{method}-seed-{seed}-{setting}.json").metrics["success_rate"].value for seed in (0, 1)]
            mean = sum(values) / 2
            half = 12.706 * math.sqrt(sum((v - mean) ** 2 for v in values)) / math.sqrt(2)  # t(0.975, 1 dof) s / sqrt(n)
            assert summary["results"][method]["success"][setting] == pytest.approx(
                {"mean": mean, "low": max(0.0, mean - half), "high": min(1.0, mean + half), "n": 2}
            )
        last = [json.loads((out / "runs" / method / f"seed-{seed}" / "metrics.jsonl").read_text().splitlines()[-1]) for seed in (0, 1)]
        budget = summary["results"][method]["budget"]
        assert budget["budget_trained_tokens"] == pytest.approx(sum(line["budget_trained_tokens"] for line in last) / 2)
        assert budget["budget_env_episodes"] == last[0]["budget_env_episodes"]


def test_a_second_run_skips_every_finished_run_and_record(grid, monkeypatch):
    config, out, first = grid

    def refuse(*args, **kwargs):
        raise AssertionError("nothing should train or evaluate")

    monkeypatch.setattr("amft_vlm.learning.trainer.Trainer", refuse)
    monkeypatch.setattr(runner, "evaluate", refuse)
    again = run_compare(config, out, progress=False)
    assert (again.trained, again.evaluated) == ([], [])
    assert again.table == first.table


def test_an_interrupted_run_resumes_from_its_checkpoint(grid, monkeypatch):
    config, out, first = grid
    run = out / "runs" / "rl" / "seed-1"
    before = (run / "metrics.jsonl").read_text().splitlines()
    shutil.rmtree(run / "checkpoints" / "step-000003")  # as if killed before the last checkpoint: `latest` names a missing one
    from amft_vlm.learning import trainer

    started = []

    class Recording(trainer.Trainer):
        def __init__(self, train_config, **kwargs):
            super().__init__(train_config, **kwargs)
            started.append((train_config.output_dir, kwargs["resume"], self.start_step))

    monkeypatch.setattr(trainer, "Trainer", Recording)
    again = run_compare(config, out, progress=False)
    assert started == [(str(run), True, 2)]
    assert again.trained == ["rl/seed-1"]
    assert sorted(again.evaluated) == ["rl-seed-1-id.json", "rl-seed-1-ood-rule.json"]  # its new checkpoint, evaluated again
    after = (run / "metrics.jsonl").read_text().splitlines()
    assert after[:2] == before[:2] and [json.loads(line)["step"] for line in after] == [1, 2, 3]
    assert (run / "checkpoints" / "step-000003" / "policy" / "config.json").is_file()


def test_parallel_jobs_run_the_same_runs_in_their_own_processes(grid, tiny_checkpoints, tmp_path):
    _, serial_out, _ = grid
    config = short_config(tiny_checkpoints["qwen2-vl"], methods=("sft",), jobs=2)
    result = run_compare(config, tmp_path, progress=False)
    assert sorted(result.trained) == ["sft/seed-0", "sft/seed-1"] and len(result.evaluated) == 4
    for seed in (0, 1):
        run = tmp_path / "runs" / "sft" / f"seed-{seed}"
        assert "amft_vlm.learning.trainer" in (run / "compare.log").read_text()  # the worker's log
        parallel = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        serial = [json.loads(line)["loss"] for line in (serial_out / "runs" / "sft" / f"seed-{seed}" / "metrics.jsonl").read_text().splitlines()]
        assert parallel == pytest.approx(serial, rel=1e-5)
    assert "| sft |" in result.table


def test_unknown_method_is_refused_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        main(["compare", "--methods", "sft,not-a-method", "--out", str(out)])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "unknown method 'not-a-method'" in error and all(name in error for name in METHODS)
    assert not out.exists()


@pytest.mark.parametrize(
    ("overrides", "keywords", "message"),
    [
        (["method=sft"], {}, "compare.methods"),
        (["output_dir=x"], {}, "--out"),
        ([], {"seeds": 0}, "at least 1"),
        ([], {"seeds": [1, 1]}, "a seed twice"),
        ([], {"jobs": 0}, "compare.jobs must be a positive integer"),
        ([], {"methods": []}, "compare.methods is empty"),
        (["compare.thresholds=[0]"], {}, r"\(0, 1\]"),
        (["compare.eval_settings={ood-visual: null}"], {}, "modality vision"),
        (["compare.method_settings={sft: {seed: 3}}"], {}, "the same for every run"),
        (["compare.method_settings={sft: {fixed_muu: 0.1}}"], {}, "compare.method_settings.sft: unknown config field 'fixed_muu'"),
        (["steps=4", "controller.warmup_steps=4"], {"methods": ["amft"]}, "warmup_steps"),
    ],
)
def test_config_errors_name_the_setting(overrides, keywords, message):
    with pytest.raises(ValueError, match=message):
        load_compare_config(overrides=overrides, **keywords)


def test_command_line_flags_replace_the_section():
    config = load_compare_config(methods=["rl", "sft"], seeds=parse_seeds("4,9"), jobs=3, threads=6)
    assert (config.compare.methods, config.compare.seeds, config.compare.jobs, config.compare.threads) == (["rl", "sft"], [4, 9], 3, 6)
    assert load_compare_config(overrides=["seed=7"], seeds=parse_seeds("3")).compare.seeds == [7, 8, 9]
    with pytest.raises(ValueError, match="--seeds takes"):
        parse_seeds("two")
    changed = load_compare_config(overrides=["compare.method_settings={fixed-mix: {fixed_mu: 0.1, controller.eta_mu: 0.3}}"])
    runs = {run.method: run.config for run in changed.grid("out")}
    assert (runs["fixed-mix"].fixed_mu, runs["fixed-mix"].controller.eta_mu, runs["amft"].fixed_mu) == (0.1, 0.3, 0.5)
    assert runs["fixed-mix"].controller.warmup_steps == runs["amft"].controller.warmup_steps


def test_shipped_configs():
    tiny = load_compare_config()
    assert tiny.train.model == "tiny:qwen2-vl" and tiny.compare.methods == ["amft", "sft", "rl", "fixed-mix", "relift"]
    assert "SMOKE TEST, NOT A RESULT" in DEFAULT_CONFIG.read_text()
    listed = yaml.safe_load(PAPER_CONFIG.read_text())["compare"]["methods"]
    paper = load_compare_config(PAPER_CONFIG, methods=[name for name in listed if name in METHODS])
    assert [item.name for item in paper.eval_settings()] == ["GP-VL id", "GP-VL ood-rule", "GP-VL ood-visual"]
    assert paper.compare.seeds == [0, 1, 2] and paper.eval_episodes("id") == 234
    assert {"amft", "sft", "rl", "sft-then-rl"} <= set(paper.compare.methods)


def test_statistics():
    assert t_quantile_975(1) == 12.706 and t_quantile_975(30) == 2.042
    assert t_quantile_975(31) == pytest.approx(2.040, abs=1e-3) and t_quantile_975(1000) == pytest.approx(1.962, abs=1e-3)
    one = mean_interval([0.4])
    assert (one.mean, one.low, one.high) == (0.4, None, None)
    three = mean_interval([0.2, 0.4, 0.6])
    assert three.mean == pytest.approx(0.4) and three.high - three.mean == pytest.approx(4.303 * 0.2 / math.sqrt(3))
    assert mean_interval([0.0, 1.0], bounds=(0.0, 1.0)).to_dict() == {"mean": 0.5, "low": 0.0, "high": 1.0, "n": 2}
    assert trailing_mean([0, 1, 1, 0], 2) == [0, 0.5, 1, 0.5]


def test_steps_to_threshold_reads_the_logged_success_only():
    records = [
        {"step": 1, "mu": 1.0, "budget_env_episodes": 0},  # a warm-up step: no rollouts, no success
        {"step": 2, "success": 0.0, "budget_env_episodes": 8, "budget_rollout_episodes": 8},
        {"step": 3, "success": 1.0, "budget_env_episodes": 20, "budget_rollout_episodes": 16},
        {"step": 4, "success": 0.5, "budget_env_episodes": 28, "budget_rollout_episodes": 24},
    ]
    assert steps_to_threshold(records, 0.5, 2) == {"step": 3, "env_episodes": 20, "rollout_episodes": 16}
    assert steps_to_threshold(records, 0.75, 2) == {"step": 4, "env_episodes": 28, "rollout_episodes": 24}
    assert steps_to_threshold(records, 0.75, 3) is None
    assert steps_to_threshold(records[:1], 0.1, 2) is None


def test_threads_are_shared_by_the_jobs():
    assert [threads_per_job(8, jobs) for jobs in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]


def test_dry_run_prints_the_grid_and_its_estimate_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out, runs/compare-tiny-gp-l, would be made here
    assert main(["compare", "--dry-run", "--methods", "amft,sft,relift", "--seeds", "2"]) == 0
    printed = capsys.readouterr().out
    assert "grid: 3 methods x 2 seeds [0, 1] = 6 runs of" in printed and "runs/compare-tiny-gp-l" in printed
    assert "tasks: 18 (6 trainings + 12 evaluations)" in printed
    assert "GP-L id, held-out (test), " in printed and "GP-L ood-rule, " in printed
    assert "estimated time: " in printed and "cost model (measured" in printed
    assert list(tmp_path.iterdir()) == []
    out = tmp_path / "elsewhere"
    assert main(["compare", "--dry-run", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out and not out.exists()


def test_dry_run_counts_each_runs_work_as_the_trainer_does(grid):
    config, _, result = grid
    plan = grid_plan(config)
    for method in ("sft", "rl"):
        work = plan.work[f"{method}/seed-0"]
        budget = result.summary["results"][method]["budget"]
        assert work.rollout_episodes == budget["budget_rollout_episodes"]
        assert work.validation_episodes == budget["budget_validation_episodes"]
        assert work.expert_examples == budget["budget_expert_examples"]
    # AMFT on the smoke config, by hand: 6 warm-up steps of SFT, then 6 of both; meta-gradient at steps 7 and 10.
    smoke = load_compare_config(methods=["amft", "luffy", "relift"], seeds=1)
    works = {run.method: run_work(run.config) for run in smoke.grid("out")}
    steps, states, group, sft = smoke.train.steps, smoke.train.episodes_per_step, smoke.train.group_size, smoke.train.sft_batch_size
    warmup, interval = smoke.train.controller.warmup_steps, smoke.train.controller.meta_interval
    meta_steps = len(range(warmup, steps, interval))
    validation = smoke.train.controller.validation_states * smoke.train.controller.validation_samples
    assert works["amft"] == RunWork(steps, (steps - warmup) * states * group, meta_steps * validation, steps * sft, works["amft"].checkpoints, smoke.train.max_new_tokens)
    assert (works["luffy"].rollout_episodes, works["luffy"].expert_examples) == (steps * states * (group - 1), steps * states)
    assert (works["relift"].rollout_episodes, works["relift"].expert_examples) == (steps * states * group, steps * states)


def test_the_estimate_replays_the_runners_order_of_tasks():
    costs = CostModel("by hand", run_start=10, step=0, policy_token=0, expert_example=0, checkpoint=0, evaluation_start=2,
                      evaluation_token=0, grid_start=1)  # fmt: skip
    config = load_compare_config(methods=["sft", "rl"], seeds=1)
    plan = grid_plan(config)  # 2 trainings of 10 s, each followed by 2 evaluations of 2 s
    assert estimate_wall_seconds(plan, costs, jobs=1, max_new_tokens=40) == (1 + 28, 28)
    # Two workers: both trainings at once (0-10), then the four evaluations two by two (10-12, 12-14).
    assert estimate_wall_seconds(plan, costs, jobs=2, max_new_tokens=40) == (1 + 14, 28)
    three = grid_plan(load_compare_config(methods=["sft", "rl", "amft"], seeds=1))
    # Trainings 0-10, 0-10 and 10-20 on the worker freed first; the first four evaluations fill the other to 18,
    # the last two follow the third training: 20-22 and 20-22.
    assert estimate_wall_seconds(three, costs, jobs=2, max_new_tokens=40) == (1 + 22, 42)


def test_a_model_without_a_calibration_gets_counts_and_no_time(capsys):
    listed = yaml.safe_load(PAPER_CONFIG.read_text())["compare"]["methods"]
    assert main(["compare", "--dry-run", "--config", str(PAPER_CONFIG), "--methods", ",".join(listed)]) == 0
    printed = capsys.readouterr().out
    assert f"grid: {len(listed)} methods x 3 seeds" in printed and "estimated time: none" in printed
    assert cost_model(load_compare_config(PAPER_CONFIG, methods=listed)) is None
