"""Checkpoints that are either complete or absent.

A checkpoint is a directory ``checkpoints/step-NNNNNN`` holding the policy (``save_pretrained``),
the optimiser, scheduler, controller and RNG states and the trainer's position. A run sharded over
processes (`save_sharded_checkpoint`) also writes its weights and optimiser state as
``torch.distributed.checkpoint`` shards (``dcp/``), which load on any process count. It is written
under a temporary name and renamed into place (atomic on POSIX), and only then does the
``checkpoints/latest`` pointer (itself replaced atomically) name it. A run killed at any moment
leaves the previous checkpoint intact and at most an ignorable ``.tmp-*`` directory.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest"


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


def save_policy(policy, directory: Path) -> None:
    """Save a `VLMPolicy` so that ``VLMPolicy.from_pretrained(directory)`` loads it back (model, tokenizer, image processor)."""
    policy.model.save_pretrained(directory)
    policy.tokenizer.save_pretrained(directory)
    policy.image_processor.save_pretrained(directory)


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
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically and point ``latest`` at it.

    The policy goes to ``policy/`` (a loadable checkpoint), or, with ``lora_base_model``, only its LoRA
    adapters go to ``lora/`` with that base model's path or id (`amft_vlm.lora.load_policy` loads it).
    ``extra`` maps names to picklable states (e.g. a critic's weights and optimiser), saved as ``NAME.pt``.
    """
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    final = root / name
    staging = root / f".tmp-{name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    if lora_base_model is None:
        save_policy(policy, staging / "policy")
    else:
        from amft_vlm.lora import save_lora

        save_lora(policy, staging / "lora", base_model=lora_base_model)
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    torch.save(scheduler.state_dict(), staging / "scheduler.pt")
    torch.save(rng_states(), staging / "rng.pt")
    for part, state in (extra or {}).items():
        torch.save(state, staging / f"{part}.pt")
    (staging / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
    if final.exists():  # a re-run of the same step replaces it whole
        shutil.rmtree(final)
    os.replace(staging, final)
    _write_text_atomic(root / LATEST, name + "\n")
    return final


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


def save_sharded_checkpoint(
    root: Path,
    step: int,
    *,
    policy,
    optimizer,
    scheduler,
    trainer_state: dict[str, Any],
    is_main: bool,
    barrier,
    extra: dict[str, Any] | None = None,
) -> Path | None:
    """`save_checkpoint` for a model sharded over processes (every process calls it).

    Each process writes its shards of the weights and AdamW state through ``torch.distributed.checkpoint``
    into ``dcp/`` (loadable on another process count); the main process also gathers the full weights into a
    loadable ``policy/`` (for evaluation), writes the rest of the state and moves the checkpoint into place.
    Returns the checkpoint's path on the main process, None elsewhere.
    """
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    name = f"step-{step:06d}"
    final, staging = root / name, root / f".tmp-{name}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    barrier()
    model_state, optimizer_state = get_state_dict(policy.model, optimizer)
    dcp_save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(staging / "dcp"))
    full_weights = get_model_state_dict(policy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main:
        policy.model.save_pretrained(staging / "policy", state_dict=full_weights)
        policy.tokenizer.save_pretrained(staging / "policy")
        policy.image_processor.save_pretrained(staging / "policy")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        torch.save(rng_states(), staging / "rng.pt")
        for part, state in (extra or {}).items():
            torch.save(state, staging / f"{part}.pt")
        (staging / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        _write_text_atomic(root / LATEST, name + "\n")
    barrier()
    return final if is_main else None


def load_sharded_state(checkpoint: Path, policy, optimizer) -> None:
    """Load ``checkpoint/dcp`` (weights and AdamW state) into `policy`'s model and `optimizer`, sharded or not.

    The weights must all be there. The AdamW state may lack parameters that never had a gradient (a
    text-only run's vision tower): they keep the empty state torch gives them, and never step.
    """
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(policy.model, optimizer)
    weights, moments = {"model": model_state}, {"optimizer": optimizer_state}
    dcp_load(weights, checkpoint_id=str(checkpoint / "dcp"))
    dcp_load(moments, checkpoint_id=str(checkpoint / "dcp"), planner=DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(policy.model, optimizer, model_state_dict=weights["model"], optim_state_dict=moments["optimizer"])
