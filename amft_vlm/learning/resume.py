"""Whether a run may continue, or start from another run's checkpoint, with the settings it is given now.

A resumed run (`check_resume_settings`) may change where and how it is carried out (`RESUME_MAY_CHANGE`), not what
it computes; a warm start (`warm_start_checkpoint`) must agree with the run it starts from on every setting that
shaped the iterations it skips. Both read the saved ``config.yaml`` through the bounded YAML reader.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

from amft_vlm.learning.checkpoint import CheckpointError, check_checkpoint, first_line
from amft_vlm.learning.methods import build_controller, method_mu
from amft_vlm.learning.optimiser import learning_rate_factors
from amft_vlm.learning.resolve import resolve_method
from amft_vlm.run.config import (
    WARM_START_FIELDS,
    TrainConfig,
    dataclass_from_dict,
    load_config,
    read_yaml_file,
)

RESUME_MAY_CHANGE = (
    "steps", "save_every", "report_to", "output_dir", "warm_start", "device", "distributed", "num_envs",
    "image_cache_mb", "gradient_checkpointing",
)  # fmt: skip
"""Settings a resumed run may change (`check_resume_settings`): where and how the run is carried out and
recorded, not what it computes. ``steps`` may grow when the iterations already done keep their learning
rate and mu. Every other setting shaped the iterations already done and must stay as the run's ``config.yaml`` has it."""

log = logging.getLogger(__name__)


class ResumeSettingsError(ValueError):
    """Settings a resumed run may not change; the message lists each with the run's value and the new one."""


def warm_start_checkpoint(config) -> Path:
    """``config.warm_start`` after checking that its first N iterations are this run's (see `TrainConfig.warm_start`)."""

    path = Path(config.warm_start)
    if not (path / "trainer_state.json").is_file():
        raise ValueError(f"warm_start: {str(path)!r} is not a checkpoint; give a RUN/checkpoints/step-N directory written by the trainer")
    source_path = path.parent.parent / "config.yaml"
    if not source_path.is_file():
        raise ValueError(f"warm_start: {str(path)!r} has no {source_path.name} two levels up; give a checkpoint inside its run directory")
    try:
        step = check_checkpoint(path)["step"]
    except CheckpointError as error:
        raise CheckpointError(f"warm_start: {error}") from None
    source = load_config(source_path)
    differing = [name for name in WARM_START_FIELDS if getattr(source, name) != getattr(config, name)]
    if differing:
        details = "; ".join(f"{name}: {getattr(source, name)!r} there, {getattr(config, name)!r} here" for name in differing)
        raise ValueError(f"warm_start: {str(path)!r} comes from a run with other settings ({details}); its {step} iterations are not this run's")
    for who, run in (("its run", source), ("this run", config)):
        method = resolve_method(run)
        controller = build_controller(method, run)
        if any(method_mu(method, run, s, controller) != 1.0 for s in range(step)):
            raise ValueError(
                f"warm_start: {who} ({run.method}) is not pure SFT for the checkpoint's {step} iterations; warm-start from "
                f"an earlier step (an amft run needs controller.warmup_steps >= {step})"
            )
    return path


def check_resume_settings(config, run_config: Path, done: int) -> None:
    """Refuse to continue a run that has done `done` iterations with `config` unless it continues the same run.

    - ``steps`` below `done` is refused (``steps = done`` ends the run where it is).
    - Any setting outside `RESUME_MAY_CHANGE` that differs from `run_config` (the run's ``config.yaml``) is
      refused: the checkpoint carries the optimiser, schedule and data position those settings produced, so
      a new learning rate, method, batch size, seed... would be recorded but not applied, or would
      splice two different runs into one.
    - A larger ``steps`` continues the run as if it had been set from the start: refused when that would
      have changed the learning rate (a cosine schedule decays to 0 at ``steps``) or mu (scheduled-mix over
      all steps) of an iteration already done. A constant schedule, or a cosine one still in its warm-up,
      extends; so do the sft, rl, fixed-mix and AMFT methods, whose mu does not depend on ``steps``.

    A missing or unreadable `run_config` is reported as a warning and skips the comparison.

    Raises:
        ResumeSettingsError: naming each refused setting with the run's value and the new one.
    """
    if config.steps < done:
        raise ResumeSettingsError(
            f"steps={config.steps} is below the {done} iterations this run has done; resume with steps >= {done} "
            f"(steps={done} stops where it is)"
        )
    saved = _saved_config(run_config)
    if saved is None:
        return
    before, now = _settings(saved), _settings(config)
    changed = [name for name in now if name not in RESUME_MAY_CHANGE and before.get(name) != now[name]]
    if changed:
        details = ", ".join(f"{name}: {before.get(name)!r} -> {now[name]!r}" for name in changed)
        raise ResumeSettingsError(
            f"--resume cannot change what shaped the {done} iterations already done ({details}; the run's settings are "
            f"in {run_config}): resume with those, or start a new run in another output_dir. A resumed run may change "
            f"only {', '.join(RESUME_MAY_CHANGE)}"
        )
    if saved.steps != config.steps:
        _check_extension(saved, config, done)


def _saved_config(path: Path):
    """The `TrainConfig` of a run's ``config.yaml`` (fields it lacks at their defaults), or None with a warning."""

    try:
        values = read_yaml_file(path)
        if not isinstance(values, dict):
            raise ValueError(f"not a mapping of settings but {type(values).__name__}")
        return dataclass_from_dict(TrainConfig, values)
    except ValueError as error:
        log.warning("%s does not read (%s): the resumed run's settings are not compared with the run's", path, first_line(error))
        return None


def _settings(config) -> dict[str, Any]:
    """A config's settings by name, sections' fields dotted (``controller.eta_mu``)."""
    flat = {}
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if dataclasses.is_dataclass(value):
            flat.update({f"{item.name}.{name}": inner for name, inner in _settings(value).items()})
        else:
            flat[item.name] = value
    return flat


def _check_extension(saved, config, done: int) -> None:
    """Refuse a new ``steps`` that changes the learning rate or mu of the `done` iterations already run.

    The learning rate is compared up to iteration `done` included: the optimiser in the checkpoint already
    holds the rate of the next iteration.
    """

    change = f"steps {saved.steps} -> {config.steps}"
    for step, (before, now) in enumerate(zip(learning_rate_factors(saved, done + 1), learning_rate_factors(config, done + 1), strict=True)):
        if not math.isclose(before, now, rel_tol=1e-9, abs_tol=1e-12):
            raise ResumeSettingsError(
                f"{change} would change the learning rate of iteration {step + 1} ({before:.4g} -> {now:.4g} x learning_rate; "
                f"lr_schedule: {config.lr_schedule} depends on steps), and the run has done {done}: only a run whose learning "
                f"rate does not depend on steps (lr_schedule: constant) extends; resume with steps={saved.steps}, or start a new run"
            )
    methods = resolve_method(saved), resolve_method(config)
    controllers = build_controller(methods[0], saved), build_controller(methods[1], config)
    for step in range(done):
        before, now = method_mu(methods[0], saved, step, controllers[0]), method_mu(methods[1], config, step, controllers[1])
        if not math.isclose(before, now, rel_tol=1e-9, abs_tol=1e-12):
            raise ResumeSettingsError(
                f"{change} would change mu of iteration {step + 1} ({before:.4g} -> {now:.4g}; {config.method}'s mu depends "
                f"on steps), and the run has done {done}: start a new run, or resume with steps={saved.steps}"
            )
