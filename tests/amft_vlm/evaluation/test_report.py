"""Training reports from hand-written metrics.jsonl files: PNGs, report.md, runs overlaid, CLI errors."""

import json
import math
import re
import sys
import types

import matplotlib.figure
import pytest

from amft_vlm.cli import main
from amft_vlm.evaluation.report import FIGURES, load_run, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir, method, records):
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"method: {method}\nsteps: {len(records)}\n")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return run_dir


def amft_records(steps=30, warmup=5, meta_interval=5):
    """Every key the trainer logs for an AMFT run: SFT-only warm-up, then rollouts and the controller."""
    records = []
    for step in range(1, steps + 1):
        record = {"step": step, "mu": 1.0 if step <= warmup else 0.8 - 0.005 * step, "lr": 1e-3, "loss_sft": 5.0 / step,
                  "entropy_sft": 4.0 - 0.02 * step, "tokens_sft": 1500, "target_entropy": None if step <= warmup else 3.9,
                  "entropy_term": 0.0, "meta_term": 0.0, "next_mu": 0.8, "grad_norm": 2.0, "step_time": 0.5, "tokens_per_second": 3000.0}
        if step > warmup:
            meta = 0.1 * (-1) ** step if (step - warmup - 1) % meta_interval == 0 else None
            record.update(loss_rl=0.01 * math.sin(step), entropy_rl=4.2 - 0.01 * step, tokens_rl=300, clip_fraction=0.1, approx_kl=0.01,
                          reward=-10 + step / 3, success=min(1.0, step / steps), turns=3.0, cos_sft_rl=0.1,
                          entropy=4.2 - 0.01 * step, meta_signal=meta, entropy_term=-1e-4, meta_term=1e-5 if meta else 0.0)
        record.update(budget_updates=step, budget_rollout_episodes=16 * max(0, step - warmup), budget_validation_episodes=0,
                      budget_expert_examples=32 * step, budget_trained_tokens=1800 * step)
        record["loss"] = record["mu"] * record["loss_sft"] + (1 - record["mu"]) * record.get("loss_rl", 0.0)
        records.append(record)
    return records


def sft_records(steps=20):
    """An SFT run logs few keys; one step's loss is NaN (a diverged micro-batch) and one is null."""
    records = [{"step": step, "mu": 1.0, "lr": 1e-3, "loss_sft": 4.0 / step, "entropy_sft": 4.0, "loss": 4.0 / step} for step in range(1, steps + 1)]
    records[3]["loss_sft"] = records[3]["loss"] = float("nan")
    records[4]["loss_sft"] = None
    return records


@pytest.fixture
def runs(tmp_path):
    return [
        write_run(tmp_path / "runs" / "amft-run", "amft", amft_records()),
        write_run(tmp_path / "runs" / "sft-run", "sft", sft_records()),
    ]


def assert_png(path):
    assert path.is_file(), path
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > len(PNG_SIGNATURE), path


def test_report_writes_every_plot_and_a_summary_of_both_runs(runs, tmp_path):
    report = write_report(runs, tmp_path / "report")
    assert report == tmp_path / "report" / "report.md"
    for figure in FIGURES:
        assert_png(tmp_path / "report" / f"{figure.name}.png")
    text = report.read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "-run" in line}
    assert set(rows) == {"amft-run (amft)", "sft-run (sft)"}
    assert "| amft | 30 |" in rows["amft-run (amft)"] and "100.0%" in rows["amft-run (amft)"]
    assert "| sft | 20 |" in rows["sft-run (sft)"] and "| 1.000 |" in rows["sft-run (sft)"]
    assert "| rollout episodes |" in text and "| 30 | 400 | 0 | 960 | 54,000 |" in rows["amft-run (amft)"]
    assert rows["sft-run (sft)"].endswith("| – | – | – | – | – |")  # an old run without budget counters
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(links) == sorted(f"{figure.name}.png" for figure in FIGURES)
    for link in links:
        assert_png(report.parent / link)
    assert "No evaluation records" in text
    assert not list(report.parent.glob("*.tmp"))


def test_runs_are_overlaid_with_a_legend_entry_each(runs, tmp_path, monkeypatch):
    legends = {}
    savefig = matplotlib.figure.Figure.savefig

    def recording_savefig(figure, path, **kwargs):
        legends[str(path)] = [text.get_text() for axis in figure.axes for text in axis.get_legend().get_texts()]
        return savefig(figure, path, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recording_savefig)
    write_report(runs, tmp_path / "report")
    mu_legend = next(labels for path, labels in legends.items() if "mu.png" in path)
    # mu of both runs, then what moved it: the running sums of the AMFT run's two controller terms.
    assert mu_legend == ["amft-run (amft)", "sft-run (sft)", "amft-run (amft): entropy_term", "amft-run (amft): meta_term"]
    loss_legend = next(labels for path, labels in legends.items() if "loss.png" in path)
    assert loss_legend.count("sft-run (sft)") == 2  # total loss and L_SFT; no L_RL line for an SFT run
    assert all(figure.title for figure in FIGURES)


def test_an_sft_run_alone_skips_the_plots_it_has_no_data_for(runs, tmp_path):
    out = tmp_path / "report"
    (out).mkdir()
    (out / "reward_success.png").write_bytes(b"stale plot of another run")
    report = write_report(runs[1:], out)
    for name in ("loss", "mu", "entropy"):
        assert_png(out / f"{name}.png")
    for name in ("reward_success", "controller", "gradients"):
        assert not (out / f"{name}.png").exists(), name
    assert "reward_success.png" not in report.read_text()
    assert "| sft-run (sft) | sft | 20 | – | – | – | – | 1.000 |" in report.read_text()


def test_nan_null_and_a_cut_short_last_line_are_skipped(runs):
    with open(runs[1] / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 21, "mu": 1.0, "loss_s')
    run = load_run(runs[1])
    steps, values = run.series("loss_sft")
    assert len(run.records) == 20 and 4 not in steps and 5 not in steps and len(values) == 18
    assert run.series("reward")[0].size == 0


def test_evaluation_records_make_the_evaluation_table(runs, tmp_path, monkeypatch):
    (runs[0] / "eval").mkdir()
    (runs[0] / "eval" / "gp-l-id.json").write_text('{"success_rate": 0.5}')
    extra = tmp_path / "extra.json"
    extra.write_text('{"success_rate": 0.25}')
    evaluate = types.ModuleType("amft_vlm.evaluation.evaluate")
    evaluate.load_record = lambda path: json.loads(path.read_text())
    evaluate.comparison_table = lambda records: "| success |\n|---|\n" + "\n".join(f"| {r['success_rate']} |" for r in records)
    monkeypatch.setitem(sys.modules, "amft_vlm.evaluation.evaluate", evaluate)
    text = write_report(runs, tmp_path / "report", eval_files=[extra]).read_text()
    assert "| 0.5 |\n| 0.25 |" in text


def test_cli_writes_the_report_and_prints_where(runs, tmp_path, capsys):
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "cli" / "report.md") in printed and str(tmp_path / "cli" / "mu.png") in printed


@pytest.mark.parametrize("problem", ["missing", "no-metrics"])
def test_cli_exits_2_on_a_bad_run_directory(runs, tmp_path, capsys, problem):
    bad = tmp_path / problem
    if problem == "no-metrics":
        bad.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(runs[0]), str(bad), "--out", str(tmp_path / "cli")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert str(bad) in error and ("does not exist" if problem == "missing" else "no metrics.jsonl") in error
    assert not (tmp_path / "cli").exists()


def test_cli_exits_2_on_a_bad_evaluation_record_before_writing_anything(runs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(runs[0]), "--out", str(tmp_path / "cli"), "--eval", str(runs[0] / "metrics.jsonl")])
    assert exit_info.value.code == 2
    assert "metrics.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()
