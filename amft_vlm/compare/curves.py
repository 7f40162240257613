"""The comparison's learning curves (``OUT/curves.png``): each method's mean over seeds per step, with a min-max band."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from amft_vlm.compare.config import CompareConfig, RunPlan
from amft_vlm.compare.statistics import trailing_mean
from amft_vlm.evaluation.report import finish_step_axis, is_finite_number, load_run, panel_row, save_figure

CURVE_PANELS = (
    ("success", "Training success (trailing mean)", True),
    ("reward", "Mean episode return (trailing mean)", True),
    ("mu", "mu (weight of L_SFT)", False),
)
"""The panels of ``curves.png``: metric, title, and whether it is drawn as a trailing mean."""


def plot_curves(config: CompareConfig, grid: Sequence[RunPlan], path: Path) -> Path | None:
    """Draw each method's mean over seeds per step with a min-max band, per panel of `CURVE_PANELS`; None without data."""
    series: dict[str, dict[str, list[dict[int, float]]]] = {key: {} for key, _, _ in CURVE_PANELS}
    for run in grid:
        records = load_run(run.run_dir).records
        for key, _, smooth in CURVE_PANELS:
            logged = [record for record in records if is_finite_number(record.get(key))]
            if not logged:
                continue
            values = [record[key] for record in logged]
            values = trailing_mean(values, config.compare.smoothing) if smooth else values
            series[key].setdefault(run.method, []).append({int(r["step"]): v for r, v in zip(logged, values, strict=True)})
    panels = [(key, title) for key, title, _ in CURVE_PANELS if series[key]]
    if not panels:
        return None
    import matplotlib

    fig, axes = panel_row(len(panels))
    colours = {method: matplotlib.colormaps["tab10"](index % 10) for index, method in enumerate(config.compare.methods)}
    for axis, (key, title) in zip(axes, panels, strict=True):
        for index, (method, seeds) in enumerate(series[key].items()):
            steps = sorted(set().union(*seeds))
            by_step = [[seed[step] for seed in seeds if step in seed] for step in steps]
            mean = [sum(values) / len(values) for values in by_step]
            axis.plot(steps, mean, color=colours[method], linewidth=max(1.0, 3.0 - 0.5 * index), marker="o" if len(steps) < 20 else None, markersize=3, label=f"{method} ({len(seeds)} seeds)")
            axis.fill_between(steps, [min(v) for v in by_step], [max(v) for v in by_step], color=colours[method], alpha=0.2, linewidth=0)
        if key == "success":
            for threshold in config.compare.thresholds:
                axis.axhline(threshold, color="grey", linestyle="--", linewidth=1)
        if key in ("success", "mu"):
            axis.set_ylim(-0.03, 1.03)
        axis.set_title(title, fontsize=10)
        finish_step_axis(axis)
    fig.suptitle(f"Mean over seeds, band: min-max over seeds; trailing mean over {config.compare.smoothing} logged steps")
    save_figure(fig, path)
    return path

