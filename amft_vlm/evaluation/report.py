"""Training reports: PNG plots of ``metrics.jsonl`` with runs overlaid, and a markdown summary.

``write_report(["runs/amft", "runs/sft"], "reports/cmp")`` reads each run directory's
``metrics.jsonl`` (one JSON object per step, written by :class:`amft_vlm.learning.trainer.Trainer`) and its
``config.yaml``, draws one figure per group of quantities (reward and success, the loss parts, mu,
entropy against the target entropy, the controller's terms, the gradients) and writes ``report.md``
with a row per run, the figures, and a table of the evaluation records found as ``RUN_DIR/eval/*.json``.

Not every run logs every key (an SFT run has no reward; RL metrics exist only on steps with
rollouts; ``meta_signal`` only every k steps): a panel shows the runs that have data for it, a
figure with no data at all is not drawn, and missing, null and NaN values are skipped.

A run directory may come from elsewhere: the files read from it (``metrics.jsonl``, ``config.yaml``,
``eval/*.json``) must resolve inside it (`run_file`), so a symlink there cannot make a report show a file from
anywhere else on the machine, and they are read as untrusted input (`amft_vlm.run.safe_io`: a FIFO is refused,
not waited on). An evaluation record given with ``--eval FILE`` is read wherever it is.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from amft_vlm.learning.checkpoint import read_metrics
from amft_vlm.run.config import read_yaml_file
from amft_vlm.run.safe_io import (
    atomic_output,
    output_directory,
    output_file_target,
    resolve_inside,
    write_text_atomic,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Panel:
    """One axes of a figure: the metrics drawn in it (one line per run and key) and its labels."""

    title: str
    ylabel: str
    keys: tuple[str, ...]
    """Metric keys drawn with a solid line (several keys in one panel get their key in the legend)."""
    reference_keys: tuple[str, ...] = ()
    """Metric keys drawn dashed in the run's colour, e.g. the target entropy next to the entropy."""
    ylim: tuple[float, float] | None = None
    yscale: str = "linear"
    smooth: bool = True
    """Draw a running mean over long noisy series; off for step-like series (mu, the controller's terms)."""
    sparse: bool = False
    """Markers only: the metric exists on a few steps (the meta-gradient every k steps)."""
    cumulative: bool = False
    """Draw the running sum of the metric (e.g. each controller term's total contribution to mu)."""


@dataclass(frozen=True)
class Figure:
    """One PNG: a title and its panels side by side."""

    name: str
    title: str
    panels: tuple[Panel, ...]


FIGURES = (
    Figure("reward_success", "Rollout reward and success rate", (
        Panel("Mean episode return", "reward", ("reward",)),
        Panel("Success rate", "success rate", ("success",), ylim=(-0.03, 1.03)),
    )),
    Figure("loss", "Loss parts", (
        Panel("Total loss  mu·L_SFT + (1-mu)·L_RL", "loss", ("loss",)),
        Panel("L_SFT (expert NLL per token)", "loss (log scale)", ("loss_sft",), yscale="log"),
        Panel("L_RL (clipped policy gradient)", "loss", ("loss_rl",)),
    )),
    Figure("mu", "SFT weight mu in mu·L_SFT + (1-mu)·L_RL, and what moved it", (
        Panel("mu", "mu", ("mu",), ylim=(-0.03, 1.03), smooth=False),
        Panel("Running sum of each controller term (before mu's clip)", "sum of terms", ("entropy_term", "meta_term"), smooth=False, cumulative=True),
    )),
    Figure("entropy", "Policy entropy and target entropy H* (dashed)", (
        Panel("The controller's H (its own rollouts or the expert probe, sampling temperature)", "entropy (nats / token)", ("entropy",), ("target_entropy",)),
        Panel("On the SFT batch (expert tokens, temperature 1)", "entropy (nats / token)", ("entropy_sft",)),
    )),
    Figure("controller", "mu controller terms (added to mu each step)", (
        Panel("Entropy term  eta_H·sign·(H* - H)", "change of mu", ("entropy_term",), smooth=False),
        Panel("Meta term  eta_mu·signal", "change of mu", ("meta_term",), smooth=False),
        Panel("Meta evidence every k steps: each step's t of dU/dmu, and the pooled t (the signal applied)", "t", ("meta_t", "meta_pooled_t"), sparse=True),
    )),
    Figure("gradients", "Gradients", (
        Panel("cos(g_SFT, g_RL)", "cosine similarity", ("cos_sft_rl",), ylim=(-1.03, 1.03)),
        Panel("Gradient norm before clipping", "L2 norm", ("grad_norm",)),
    )),
)
"""The figures of a report, in the order ``report.md`` shows them."""

DENSE_POINTS = 20
"""Series with at least this many points are drawn without markers, and smoothed where the panel allows."""


@dataclass
class Run:
    """One run directory's metrics: ``records`` are the ``metrics.jsonl`` lines, in step order."""

    path: Path
    records: list[dict]
    config: dict = field(default_factory=dict)
    label: str = ""

    @property
    def method(self) -> str:
        """The training method from the run's ``config.yaml``, or '?' without one."""
        return str(self.config.get("method", "?"))

    @property
    def last_step(self) -> int:
        """The last step logged."""
        return int(self.records[-1]["step"])

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one metric over the steps that logged a finite number for it."""
        pairs = [(record["step"], value) for record in self.records if is_finite_number(value := record.get(key))]
        if not pairs:
            return np.zeros(0), np.zeros(0)
        steps, values = zip(*pairs, strict=True)
        return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def is_finite_number(value: object) -> bool:
    """Whether a ``metrics.jsonl`` value is a logged number: an int or a finite float, not a bool, None or NaN."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def run_file(run_dir: Path, path: Path) -> Path:
    """`path`, a file of the run directory `run_dir` that a report reads, once checked to resolve inside it.

    Raises:
        amft_vlm.run.safe_io.OutsideDirectoryError: a symlink (or one of its directories) leads outside `run_dir`.
    """
    resolve_inside(
        run_dir, path, what="the run directory",
        advice="a report reads only a run's own files: put the file itself there, or pass an evaluation record kept "
        "elsewhere with --eval FILE",
    )  # fmt: skip
    return path


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read ``RUN_DIR/metrics.jsonl`` (and ``config.yaml`` if present) into a :class:`Run`.

    A truncated last line (a run killed while writing) is skipped with a warning; any other line
    that is not JSON is an error, as is a file that leads outside the run directory (`run_file`) or is
    not a regular file.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {str(path)!r} does not exist; pass directories written by `amft-vlm train`")
    metrics_path = path / "metrics.jsonl"
    if not metrics_path.exists():
        raise FileNotFoundError(f"{str(path)!r} has no metrics.jsonl; pass directories written by `amft-vlm train`")
    records = read_metrics(run_file(path, metrics_path))
    if not records:
        raise ValueError(f"{metrics_path} has no steps yet; train for at least one step first")
    records.sort(key=lambda record: record["step"])
    config_path = path / "config.yaml"
    try:
        config = read_yaml_file(run_file(path, config_path)) if config_path.exists() else {}
    except ValueError as error:
        raise ValueError(f"{error}; fix it or remove it to report without the run's method") from None
    return Run(path=path, records=records, config=config if isinstance(config, dict) else {})


def _label_runs(runs: list[Run]) -> None:
    """Legend labels: the directory name, with the parent directory where names repeat, and the method if the name lacks it."""
    names = [run.path.resolve().name for run in runs]
    for run, name in zip(runs, names, strict=True):
        if names.count(name) > 1:
            name = f"{run.path.resolve().parent.name}/{name}"
        run.label = name if run.method in ("?", *name.split("/")) else f"{name} ({run.method})"
    labels = [run.label for run in runs]
    for index, run in enumerate(runs):
        if labels.count(run.label) > 1:
            run.label = f"{run.label} #{index + 1}"


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred running mean that shrinks at the ends (no padding artefacts)."""
    kernel = np.ones(window)
    return np.convolve(values, kernel, mode="same") / np.convolve(np.ones_like(values), kernel, mode="same")


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
KEY_LINES = ("-", "--", ":", "-.")
"""Line styles of the keys of a panel with several keys (a run keeps its colour)."""


def _run_styles(count: int) -> list[dict]:
    """Colour, marker and size per run; earlier runs are drawn wider, so identical curves stay visible."""
    import matplotlib

    return [
        {
            "color": matplotlib.colormaps["tab10"](index % 10),
            "marker": MARKERS[index % len(MARKERS)],
            "linewidth": max(1.0, 3.0 - 0.7 * index),
            "markersize": max(3.0, 7.0 - 1.5 * index),
        }
        for index in range(count)
    ]


def panel_row(count: int) -> tuple[Any, list[Any]]:
    """A matplotlib figure of `count` panels side by side (the Agg backend: no display needed) and its axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, count, figsize=(5.2 * count, 4.0), squeeze=False, layout="constrained")
    return fig, list(axes[0])


def finish_step_axis(axis: Any) -> None:
    """The common look of a panel over training steps: integer steps on the x axis, a light grid, a small legend."""
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("step")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)


def save_figure(fig: Any, path: Path) -> None:
    """Write `fig` to `path` as a PNG, whole or not at all (`amft_vlm.run.safe_io.atomic_output`: a temporary file
    renamed into place; a symlink is written through, a FIFO or device refused), and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_output(path) as staging:
            fig.savefig(staging, format="png", dpi=100)
    finally:
        plt.close(fig)


def _draw_figure(figure: Figure, runs: list[Run], path: Path) -> bool:
    """Draw one figure to ``path`` (atomically); False, and no file, when no run has data for it."""
    panels = [panel for panel in figure.panels if any(run.series(key)[0].size for run in runs for key in panel.keys)]
    if not panels:
        return False
    fig, axes = panel_row(len(panels))
    smoothed = False
    for axis, panel in zip(axes, panels, strict=True):
        for run, style in zip(runs, _run_styles(len(runs)), strict=True):
            colour, linewidth = style["color"], style["linewidth"]
            for key, line in zip(panel.keys, itertools.cycle(KEY_LINES)):  # several keys: one line style each
                steps, values = run.series(key)
                if not steps.size:
                    continue
                if panel.cumulative:
                    values = np.cumsum(values)
                label = run.label if len(panel.keys) == 1 else f"{run.label}: {key}"
                if panel.sparse or steps.size == 1:
                    axis.plot(steps, values, linestyle="none", fillstyle="none", markeredgewidth=1.5, label=label, **style)
                elif steps.size >= DENSE_POINTS and not panel.smooth:
                    axis.plot(steps, values, line, color=colour, linewidth=linewidth, label=label)
                elif steps.size >= DENSE_POINTS:
                    axis.plot(steps, values, line, color=colour, alpha=0.3, linewidth=1)
                    axis.plot(steps, _smooth(values, max(3, steps.size // 20)), line, color=colour, linewidth=linewidth, label=label)
                    smoothed = True
                else:
                    axis.plot(steps, values, line, fillstyle="none", label=label, **style)
            for key in panel.reference_keys:
                steps, values = run.series(key)
                if steps.size:
                    label = f"{run.label}: H*" if key == "target_entropy" else f"{run.label}: {key}"
                    axis.plot(steps, values, "--", color=colour, linewidth=1.5, label=label)
        axis.set_yscale(panel.yscale)
        if panel.ylim is not None:
            axis.set_ylim(*panel.ylim)
        if len(panels) > 1:
            axis.set_title(panel.title, fontsize=10)
        axis.set_ylabel(panel.ylabel)
        finish_step_axis(axis)
    fig.suptitle(f"{figure.title}\n(faint: raw values; solid: running mean)" if smoothed else figure.title)
    save_figure(fig, path)
    return True


def _tail_mean(run: Run, key: str, fraction: float = 0.1) -> float:
    """Mean of a metric over the last ``fraction`` of the run's steps (NaN if it has none there)."""
    first, last = run.records[0]["step"], run.last_step
    start = last - max(1, math.ceil(fraction * (last - first + 1))) + 1
    steps, values = run.series(key)
    tail = values[steps >= start]
    return float(tail.mean()) if tail.size else float("nan")


def _final(run: Run, key: str) -> float:
    values = run.series(key)[1]
    return float(values[-1]) if values.size else float("nan")


def _number(value: float, *, percent: bool = False) -> str:
    if not math.isfinite(value):
        return "–"
    return f"{100 * value:.1f}%" if percent else f"{value:.3f}"


BUDGET_COLUMNS = (
    ("budget_updates", "updates"),
    ("budget_rollout_episodes", "rollout episodes"),
    ("budget_validation_episodes", "validation episodes"),
    ("budget_expert_examples", "expert examples"),
    ("budget_trained_tokens", "trained tokens"),
)
"""The cumulative budget counters the trainer logs, and their column titles in the summary."""


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a markdown table: the first column left-aligned (names), the others right-aligned (numbers)."""
    return ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1), *("| " + " | ".join(row) + " |" for row in rows)]


def summary_table(runs: Sequence[Run]) -> str:
    """Markdown table: a row per run with its method, steps, final and last-10% reward and success, final mu,
    and the budget it consumed (so "the same budget" can be checked)."""
    budget_titles = " | ".join(title for _, title in BUDGET_COLUMNS)
    rows = [
        f"| run | method | steps | reward (final) | reward (last 10%) | success (final) | success (last 10%) | mu (final) | {budget_titles} |",
        "|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(BUDGET_COLUMNS),
    ]
    for run in runs:
        planned = run.config.get("steps")
        steps = f"{run.last_step} / {planned}" if isinstance(planned, int) and planned != run.last_step else str(run.last_step)
        budget = " | ".join(_count(_final(run, key)) for key, _ in BUDGET_COLUMNS)
        rows.append(
            f"| {run.label} | {run.method} | {steps} "
            f"| {_number(_final(run, 'reward'))} | {_number(_tail_mean(run, 'reward'))} "
            f"| {_number(_final(run, 'success'), percent=True)} | {_number(_tail_mean(run, 'success'), percent=True)} "
            f"| {_number(_final(run, 'mu'))} | {budget} |"
        )
    return "\n".join(rows)


def _count(value: float) -> str:
    return f"{int(value):,}" if math.isfinite(value) else "–"


def _evaluation_section(eval_files: Sequence[Path]) -> list[str]:
    """The evaluation table of ``report.md``; reads every record first, so a bad one fails before any file is written."""
    if not eval_files:
        return ["No evaluation records (`RUN_DIR/eval/*.json` or `--eval FILE`)."]
    from amft_vlm.evaluation.evaluate import comparison_table, load_record

    records = [load_record(path) for path in eval_files]
    return [comparison_table(records), "", "Records: " + ", ".join(f"`{path}`" for path in eval_files)]


def write_report(
    run_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    eval_files: Sequence[str | os.PathLike] = (),
) -> Path:
    """Write the plots and ``report.md`` for ``run_dirs`` into ``out_dir``; returns the path of ``report.md``.

    Args:
        run_dirs: training output directories (each with ``metrics.jsonl``); their runs are overlaid.
        out_dir: where the PNGs and ``report.md`` go (created if needed; earlier report files are replaced, a
            symlink among them is written through: `amft_vlm.run.safe_io`).
        eval_files: evaluation records (JSON, see :mod:`amft_vlm.evaluation.evaluate`) shown in addition to
            those found as ``RUN_DIR/eval/*.json``.

    Raises:
        amft_vlm.run.safe_io.OutputPathError: before anything is written, when ``out_dir`` is not a directory or the
            path of ``report.md`` or of a plot is a directory, FIFO, socket or device (or a symlink to one).
    """
    if not run_dirs:
        raise ValueError("give at least one run directory")
    runs = [load_run(run_dir) for run_dir in run_dirs]
    _label_runs(runs)
    missing = [str(path) for path in eval_files if not Path(path).exists()]
    if missing:
        raise FileNotFoundError(f"evaluation record(s) not found: {', '.join(missing)}")
    record_paths = [run_file(run.path, path) for run in runs for path in sorted((run.path / "eval").glob("*.json"))]
    record_paths += [Path(path) for path in eval_files if Path(path) not in record_paths]
    evaluation = _evaluation_section(record_paths)

    out = Path(out_dir)
    output_directory(out)
    report = out / "report.md"
    for path in [report, *(out / f"{figure.name}.png" for figure in FIGURES)]:
        output_file_target(path)  # a FIFO, device or directory among them is refused before anything is written
    drawn = []
    for figure in FIGURES:
        path = out / f"{figure.name}.png"
        if _draw_figure(figure, runs, path):
            drawn.append((figure, path))
        else:  # a plot from an earlier report of other runs would be misleading here; a symlink goes, not its target
            path.unlink(missing_ok=True)

    lines = ["# Training report", "", "Runs:", ""]
    lines += [f"- **{run.label}**: `{run.path}` ({len(run.records)} logged steps)" for run in runs]
    lines += ["", "## Summary", "", summary_table(runs), "", "## Plots", ""]
    lines += [f"### {figure.title}\n\n![{figure.title}]({path.name})\n" for figure, path in drawn]
    lines += ["## Evaluation", "", *evaluation, ""]
    write_text_atomic(report, "\n".join(lines))
    log.info("report of %d run(s): %s with %d plot(s)", len(runs), report, len(drawn))
    return report
