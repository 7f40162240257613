"""Methods x seeds under one budget: the comparison table, learning curves and steps-to-threshold (``amft-vlm compare``).

A compare config is a `TrainConfig` shared by every run (the base) plus a ``compare:`` section
(`CompareSettings`: the methods, the seeds, the evaluation, the success thresholds, the jobs), read by
`load_compare_config` with ``key=value`` overrides as for ``amft-vlm train``. `run_compare` then, in one
output directory ``OUT``:

1. **Checks everything first**: every run's config (`TrainConfig.validate`), the environments, the model,
   the evaluation settings, and the state of each run already in ``OUT`` (`run_progress`: its newest usable
   checkpoint, and that the settings it was trained with are this grid's). Nothing runs until all pass.
2. **Shared inputs**: a ``tiny:ARCH`` model is built once into ``OUT/initial-model`` (seed: the base
   ``seed``) and every run starts from it, as every seed of a real comparison starts from the same
   pretrained weights; with ``expert_data: null`` the oracle expert's ``expert_episodes`` episodes are
   recorded once into ``OUT/expert`` and every run reads them (a method that uses no expert data ignores it).
3. **Training**: every method x seed in ``OUT/runs/METHOD/seed-S`` (an ordinary ``amft-vlm train``
   output directory) with the base config and only ``method``, ``seed`` and ``output_dir`` set per run (and
   what ``compare.method_settings`` sets for one method, listed under the table), so every run is charged
   the same way by the trainer (`amft_vlm.run.budget`: optimiser updates, rollout and validation episodes,
   expert examples, trained tokens). A finished run (its checkpoint at ``steps``) is
   skipped; an unfinished one resumes from its newest checkpoint (``Trainer(config, resume=True)``).
4. **Evaluation** of every final checkpoint with `amft_vlm.evaluate.evaluate`, greedy, on the paper
   settings of the training modality: in distribution on held-out start states (``id``, split ``test``),
   rule OOD and, in vision, visual OOD (both on the papers' protocol, every hand or route). Records go to
   ``OUT/eval/METHOD-seed-S-SETTING.json``; a record that matches the checkpoint and the settings is kept.
5. **Summary**: ``OUT/compare.md`` (`comparison_table`, also printed by the command), ``OUT/curves.png``
   (`plot_curves`) and ``OUT/summary.json`` (every number of the table, per seed and aggregated); the
   settings it ran with are in ``OUT/compare.json``.

The table: one row per method; per evaluation setting the mean success over seeds with its 95%
t-interval (n - 1 degrees of freedom, clipped to [0, 100]%; one seed: no interval); the budget each run
consumed (the last ``metrics.jsonl`` line, mean over seeds), so a method that uses more of something
shows it; and steps-to-threshold, AMFT's efficiency measure: the first step at which the training
rollouts' success rate, as a trailing mean over the last ``smoothing`` logged steps, reaches each
threshold, and the environment episodes (rollouts plus validation) played by then. A method that plays
no rollouts (``sft``) has no training success curve and shows ``—`` there.

``--jobs N`` (``compare.jobs``) trains and evaluates N runs at once, each in its own process (spawned)
with ``threads // N`` torch threads; the logs of a run go to ``RUN/compare.log``. With one job everything
runs in this process. The total ``threads`` is the cores other processes leave free unless given
(`amft_vlm.run.jobs.choose_threads`).

The parts, one module each: `config` (`CompareSettings`, `CompareConfig`, `load_compare_config`: the config,
its checks and the grid's layout under ``OUT``), `estimate` (``--dry-run``: the grid, its tasks, each run's work
and an estimated time from a calibrated cost model, `plan_text`), `runner` (`run_compare`: checks, shared
inputs, training, resume, evaluation), `jobs` (`JobPool`: one job in this process or N spawned processes), `statistics` (the
t-interval, trailing means, steps-to-threshold), `summary` (``summary.json`` and the table) and `curves`
(``curves.png``). Everything a caller needs is importable from `amft_vlm.compare` itself.
"""

from amft_vlm.compare.config import (
    DEFAULT_CONFIG,
    SET_PER_RUN,
    SHARED_INPUTS,
    CompareConfig,
    CompareSettings,
    EvalSetting,
    RunPlan,
    check_grid,
    load_compare_config,
    parse_methods,
    parse_seeds,
    record_path,
)
from amft_vlm.compare.curves import CURVE_PANELS, plot_curves
from amft_vlm.compare.estimate import (
    TINY_CPU_COSTS,
    CostModel,
    GridPlan,
    RunWork,
    cost_model,
    estimate_wall_seconds,
    grid_plan,
    plan_text,
    run_work,
)
from amft_vlm.compare.runner import (
    CompareResult,
    EvalTask,
    final_model,
    record_is_current,
    run_compare,
    run_progress,
    threads_per_job,
)
from amft_vlm.compare.statistics import (
    Interval,
    mean_interval,
    steps_to_threshold,
    t_quantile_975,
    trailing_mean,
)
from amft_vlm.compare.summary import BUDGET_KEYS, SUMMARY_VERSION, comparison_table, summarize

__all__ = [
    "BUDGET_KEYS",
    "CURVE_PANELS",
    "DEFAULT_CONFIG",
    "SET_PER_RUN",
    "SHARED_INPUTS",
    "SUMMARY_VERSION",
    "TINY_CPU_COSTS",
    "CompareConfig",
    "CompareResult",
    "CompareSettings",
    "CostModel",
    "EvalSetting",
    "EvalTask",
    "GridPlan",
    "Interval",
    "RunPlan",
    "RunWork",
    "check_grid",
    "comparison_table",
    "cost_model",
    "estimate_wall_seconds",
    "final_model",
    "grid_plan",
    "load_compare_config",
    "mean_interval",
    "parse_methods",
    "parse_seeds",
    "plan_text",
    "plot_curves",
    "record_is_current",
    "record_path",
    "run_compare",
    "run_progress",
    "run_work",
    "steps_to_threshold",
    "summarize",
    "t_quantile_975",
    "threads_per_job",
    "trailing_mean",
]
