"""The comparison's results: every number as plain data (`summarize`, ``summary.json``) and the markdown table.

The table (`comparison_table`): one row per method; per evaluation setting the mean success over seeds with
its 95% t-interval; the budget each run consumed (the last ``metrics.jsonl`` line, mean over seeds); and
steps-to-threshold with the environment episodes played by then.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from amft_vlm.compare.config import CompareConfig, RunPlan, record_path
from amft_vlm.compare.statistics import mean_interval, steps_to_threshold
from amft_vlm.evaluation.evaluate import load_record
from amft_vlm.evaluation.report import BUDGET_COLUMNS, is_finite_number, load_run, markdown_table
from amft_vlm.learning.methods import METHODS

SUMMARY_VERSION = 1
"""Version of the layout of ``summary.json``."""

BUDGET_KEYS = ("budget_env_episodes", *(key for key, _ in BUDGET_COLUMNS))
"""The budget counters summarised: environment episodes (rollouts plus validation), then the table's columns."""


def summarize(config: CompareConfig, out: Path, grid: Sequence[RunPlan] | None = None) -> dict[str, Any]:
    """Every number of the comparison from the runs' ``metrics.jsonl`` and the evaluation records, as plain data."""
    grid = config.grid(out) if grid is None else grid
    items = config.eval_settings()
    settings = config.compare
    results: dict[str, Any] = {}
    for method in settings.methods:
        runs = []
        for run in (run for run in grid if run.method == method):
            records = load_run(run.run_dir).records
            last = records[-1]
            evaluations = {item.setting: load_record(record_path(out, run, item)) for item in items}
            runs.append({
                "seed": run.seed,
                "run_dir": str(run.run_dir),
                "final_step": int(last["step"]),
                "train_seconds": sum(record.get("step_time") or 0.0 for record in records),
                "budget": {key: int(last.get(key) or 0) for key in BUDGET_KEYS},
                "success": {setting: record.metrics["success_rate"].value for setting, record in evaluations.items()},
                "records": {item.setting: str(record_path(out, run, item)) for item in items},
                "reached": {_key(t): steps_to_threshold(records, t, settings.smoothing) for t in settings.thresholds},
                "logs_success": any(is_finite_number(record.get("success")) for record in records),
            })  # fmt: skip
        reached = {}
        for threshold in settings.thresholds:
            hits = [run["reached"][_key(threshold)] for run in runs if run["reached"][_key(threshold)] is not None]
            reached[_key(threshold)] = {
                "reached": len(hits),
                "of": len(runs),
                "steps": mean_interval([hit["step"] for hit in hits], bounds=(0, math.inf)).to_dict() if hits else None,
                "env_episodes": mean_interval([hit["env_episodes"] for hit in hits], bounds=(0, math.inf)).to_dict() if hits else None,
            }
        results[method] = {
            "steps": config.method_configs.get(method, config.train).steps,
            "collects_rollouts": METHODS[method].collects_rollouts,
            "logs_success": any(run["logs_success"] for run in runs),
            "runs": runs,
            "success": {item.setting: mean_interval([run["success"][item.setting] for run in runs], bounds=(0.0, 1.0)).to_dict() for item in items},
            "budget": {key: sum(run["budget"][key] for run in runs) / len(runs) for key in BUDGET_KEYS},
            "steps_to_threshold": reached,
        }
    return {
        "format_version": SUMMARY_VERSION,
        "env_id": config.train.env_id,
        "methods": list(settings.methods),
        "seeds": list(settings.seeds),
        "steps": config.train.steps,
        "settings": [
            {"setting": item.setting, "split": item.split, "name": item.name, "title": item.title, "episodes": config.eval_episodes(item.setting)}
            for item in items
        ],
        "thresholds": list(settings.thresholds),
        "smoothing": settings.smoothing,
        "method_settings": {method: changes for method, changes in settings.method_settings.items() if method in settings.methods},
        "results": results,
    }


def _key(threshold: float) -> str:
    return f"{threshold:g}"


def _rate(interval: dict) -> str:
    if interval["low"] is None:
        return f"{100 * interval['mean']:.1f} [—]"
    return f"{100 * interval['mean']:.1f} [{100 * interval['low']:.1f}, {100 * interval['high']:.1f}]"


def _amount(interval: dict | None, reached: int, of: int) -> str:
    if interval is None:
        return "not reached"
    if reached < of:
        return f"{interval['mean']:,.1f} ({reached}/{of} seeds)"
    if interval["low"] is None:
        return f"{interval['mean']:,.0f} [—]"
    return f"{interval['mean']:,.1f} [{interval['low']:,.1f}, {interval['high']:,.1f}]"


def comparison_table(summary: dict[str, Any]) -> str:
    """The comparison as markdown: a row per method (success, budget, steps-to-threshold), then what each column means."""
    settings = summary["settings"]
    thresholds = summary["thresholds"]
    header = ["method", *(item["title"] for item in settings), *(title for _, title in BUDGET_COLUMNS)]
    for threshold in thresholds:
        header += [f"steps to {100 * threshold:g}%", f"env episodes to {100 * threshold:g}%"]
    rows = []
    no_curve = False
    for method, result in summary["results"].items():
        cells = [method, *(_rate(result["success"][item["setting"]]) for item in settings)]
        cells += [f"{result['budget'][key]:,.0f}" for key, _ in BUDGET_COLUMNS]
        for threshold in thresholds:
            if not result["logs_success"]:
                cells += ["—¹", "—¹"]
                no_curve = True
                continue
            reached = result["steps_to_threshold"][_key(threshold)]
            cells += [_amount(reached["steps"], reached["reached"], reached["of"]), _amount(reached["env_episodes"], reached["reached"], reached["of"])]
        rows.append(cells)
    lines = markdown_table(header, rows)
    seeds = summary["seeds"]
    steps = {result["steps"] for result in summary["results"].values()}
    episodes = sorted({item["episodes"] for item in settings})
    lines += [
        "",
        f"Success: each run's final checkpoint{f' (step {steps.pop()})' if len(steps) == 1 else ''}, greedy, {' / '.join(map(str, episodes))} episodes per "
        f"setting; mean over {len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))}) [95% t-interval, "
        "n - 1 degrees of freedom, clipped to 0-100]; [—]: one seed, no interval.",
        "Budget: what each run consumed as the trainer counted it (metrics.jsonl budget_*), mean over seeds; validation "
        "episodes are the AMFT controller's meta-gradient.",
        f"Steps to X%: the first step at which the training rollouts' success rate, a trailing mean over the last "
        f"{summary['smoothing']} logged steps, reaches X%, and the environment episodes (rollouts + validation) played by "
        "then; mean [95% interval] over seeds, or (k/n seeds): the mean of the k seeds that reached it.",
    ]
    if summary.get("method_settings"):
        changed = "; ".join(
            f"{method}: " + ", ".join(f"{key}={value}" for key, value in changes.items()) for method, changes in summary["method_settings"].items()
        )
        lines.append(f"Per-method settings (every other setting is shared): {changed}.")
    if no_curve:
        lines.append("¹ plays no rollouts, so it has no training success curve.")
    return "\n".join(lines)

