"""Checkpoints that are either complete or absent.

A checkpoint is a directory ``checkpoints/step-NNNNNN`` holding the policy (``save_pretrained``, the
full weights even when training shards them), the optimiser state, the scheduler, controller and RNG
states and the trainer's position. The optimiser state is written through ``torch.distributed.checkpoint``
(``optimizer/``: each process writes its shards, and any process count loads it, so a run sharded over 8
GPUs resumes on 4 and a one-process SFT run warm-starts a sharded one); a LoRA run's adapters and their
optimiser state are plain files (``lora/``, ``optimizer.pt``). A checkpoint is written under a
temporary name and renamed into place (atomic on POSIX), and only then does the
``checkpoints/latest`` pointer (itself replaced atomically) name it. A run killed at any moment
leaves the previous checkpoint intact and at most an ignorable ``.tmp-*`` directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest"
METRICS = "metrics.jsonl"

log = logging.getLogger(__name__)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_states() -> dict[str, Any]:
    """Python, NumPy and torch RNG states (CUDA too when present)."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Undo :func:`rng_states`."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_policy(policy, directory: Path, *, state_dict: dict | None = None) -> None:
    """Save a `VLMPolicy` so that ``VLMPolicy.from_pretrained(directory)`` loads it back (model, tokenizer, image processor).

    `state_dict` gives the full weights of a model whose parameters are sharded.
    """
    policy.model.save_pretrained(directory, state_dict=state_dict)
    policy.tokenizer.save_pretrained(directory)
    policy.image_processor.save_pretrained(directory)


def _single_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


def _sharded(model) -> bool:
    return any(hasattr(parameter, "device_mesh") for parameter in model.parameters())


def save_checkpoint(
    root: Path,
    step: int,
    *,
    policy,
    optimizer,
    scheduler,
    trainer_state: dict[str, Any],
    extra: dict[str, Any] | None = None,
    lora_base_model: str | None = None,
    is_main: bool = True,
    barrier=None,
) -> Path | None:
    """Write checkpoint ``step`` under ``root`` atomically and point ``latest`` at it; every process calls it.

    It is built under a temporary name: every process writes its shards of the optimiser state, the main
    process the policy (the full weights, gathered when sharded: a collective), the rest of the state,
    and then renames it into place. With ``lora_base_model`` only the LoRA adapters go to ``lora/``, with
    that base model's path or id (`amft_vlm.lora.load_policy` loads it), and the optimiser state to
    ``optimizer.pt`` (LoRA runs on one process). ``extra`` maps names to picklable states (e.g. a critic's
    weights and optimiser), saved as ``NAME.pt``. Returns the path on the main process, None elsewhere.
    """
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    barrier = barrier or (lambda: None)
    name = f"step-{step:06d}"
    final, staging = root / name, root / f".tmp-{name}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    barrier()
    if lora_base_model is not None:
        if is_main:
            from amft_vlm.lora import save_lora

            save_lora(policy, staging / "lora", base_model=lora_base_model)
            torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    else:
        optimizer_state = get_optimizer_state_dict(policy.model, optimizer)
        dcp_save({"optimizer": optimizer_state}, checkpoint_id=str(staging / "optimizer"), no_dist=_single_process())
        full_weights = None
        if _sharded(policy.model):
            full_weights = get_model_state_dict(policy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if is_main:
            save_policy(policy, staging / "policy", state_dict=full_weights)
    if is_main:
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        torch.save(rng_states(), staging / "rng.pt")
        for part, state in (extra or {}).items():
            torch.save(state, staging / f"{part}.pt")
        (staging / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        if final.exists():  # a re-run of the same step replaces it whole
            shutil.rmtree(final)
        os.replace(staging, final)
        _write_text_atomic(root / LATEST, name + "\n")
    barrier()
    return final if is_main else None


def load_optimizer_state(checkpoint: Path, policy, optimizer) -> None:
    """Load the optimiser state of `checkpoint` into `optimizer` (over `policy`'s model, sharded or not).

    ``optimizer/`` (torch.distributed.checkpoint) loads on any process count; a LoRA checkpoint's
    ``optimizer.pt`` on one process. Parameters that never had a gradient (a text-only run's vision
    tower) have no saved state: torch initialises theirs (step 1, zero moments), and they never step.
    """
    if (checkpoint / "optimizer").is_dir():
        from torch.distributed.checkpoint import DefaultLoadPlanner
        from torch.distributed.checkpoint import load as dcp_load
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        state = {"optimizer": get_optimizer_state_dict(policy.model, optimizer)}
        planner = DefaultLoadPlanner(allow_partial_load=True)
        dcp_load(state, checkpoint_id=str(checkpoint / "optimizer"), planner=planner, no_dist=_single_process())
        set_optimizer_state_dict(policy.model, optimizer, optim_state_dict=state["optimizer"])
    elif _sharded(policy.model):
        raise ValueError(f"{checkpoint} holds a LoRA run's optimizer.pt, which loads on one process only")
    else:
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=False))


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is incomplete or missing; delete the pointer to start over")
    return path


def load_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer's position saved in checkpoint ``path``."""
    return json.loads((path / "trainer_state.json").read_text())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a ``metrics.jsonl``, in file order.

    A truncated last line (a run killed while writing) is skipped with a warning; any other line that
    is not a JSON object with a numeric ``step`` is an error naming the file and line.
    """
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records = []
    for index, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if index == len(lines) - 1:
                log.warning("%s:%d is cut short (run stopped while writing?); skipped", path, number)
                continue
            raise ValueError(f"{path}:{number} is not a JSON object ({error}); fix or remove that line") from error
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int | float) or isinstance(step, bool) or not math.isfinite(step):
            raise ValueError(f"{path}:{number} has no numeric 'step'; is this a metrics.jsonl from `amft-vlm train`?")
        records.append(record)
    return records


class MetricsLog:
    """A run's ``metrics.jsonl``: one JSON line per iteration, written by the main process only.

    Non-finite numbers are written as null: JSON has no NaN, and a missing signal is not a number.
    """

    def __init__(self, output_dir: Path, *, is_main: bool) -> None:
        self.path = output_dir / METRICS
        self.is_main = is_main

    def append(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Write one iteration's metrics; returns them with non-finite numbers as None."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        if self.is_main:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(clean) + "\n")
        return clean

    def keep_until(self, step: int, *, source: Path) -> None:
        """Keep only the lines of steps up to `step`, from `source`'s file (this run's, or a warm start's run), atomically."""
        path = source / METRICS
        if not self.is_main or not path.exists():
            return
        kept = [json.dumps(record) + "\n" for record in read_metrics(path) if record["step"] <= step]
        _write_text_atomic(self.path, "".join(kept))


def warm_start_checkpoint(config) -> Path:
    """``config.warm_start`` after checking that its first N iterations are this run's (see `TrainConfig.warm_start`)."""
    from amft_vlm.config import WARM_START_FIELDS, load_config
    from amft_vlm.methods import build_controller, method_mu

    path = Path(config.warm_start)
    if not (path / "trainer_state.json").is_file():
        raise ValueError(f"warm_start: {str(path)!r} is not a checkpoint; give a RUN/checkpoints/step-N directory written by the trainer")
    source_path = path.parent.parent / "config.yaml"
    if not source_path.is_file():
        raise ValueError(f"warm_start: {str(path)!r} has no {source_path.name} two levels up; give a checkpoint inside its run directory")
    source = load_config(source_path)
    step = int(load_trainer_state(path)["step"])
    differing = [name for name in WARM_START_FIELDS if getattr(source, name) != getattr(config, name)]
    if differing:
        details = "; ".join(f"{name}: {getattr(source, name)!r} there, {getattr(config, name)!r} here" for name in differing)
        raise ValueError(f"warm_start: {str(path)!r} comes from a run with other settings ({details}); its {step} iterations are not this run's")
    for who, run in (("its run", source), ("this run", config)):
        controller = build_controller(run)
        if any(method_mu(run, s, controller) != 1.0 for s in range(step)):
            raise ValueError(
                f"warm_start: {who} ({run.method}) is not pure SFT for the checkpoint's {step} iterations; warm-start from "
                f"an earlier step (an amft run needs controller.warmup_steps >= {step})"
            )
    return path
