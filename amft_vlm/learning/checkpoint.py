"""Checkpoints that are either complete or absent.

A checkpoint is a directory ``checkpoints/step-NNNNNN`` holding the policy (``save_pretrained``, the
full weights even when training shards them), the optimiser state, the scheduler, controller and RNG
states and the trainer's position. The optimiser state is written through ``torch.distributed.checkpoint``
(``optimizer/``: each process writes its shards, and any process count loads it, so a run sharded over 8
GPUs resumes on 4 and a one-process SFT run warm-starts a sharded one); a LoRA run's adapters and their
optimiser state are plain files (``lora/``, ``optimizer.pt``). A checkpoint is written under a
temporary name and renamed into place (atomic on POSIX), and only then does the
``checkpoints/latest`` pointer (itself replaced atomically) name it. A run killed at any moment
leaves the previous checkpoint intact and at most an ignorable ``.tmp-*`` directory; a write that fails
(a full disk) removes its temporary directory and raises `CheckpointWriteError`, on every process.

Resuming (`resumable_checkpoint`) starts from the checkpoint ``latest`` names and checks it first, without
loading any weights (`check_checkpoint`): every file present and whole, the JSON files parse, the trainer
state's step agrees with the directory's name. A damaged one is skipped with a warning naming the file, for
the one before it; when none is usable, `CheckpointError` names each. (`amft_vlm.learning.resume` refuses the
settings that a resumed run may not change.)

Every file of a checkpoint is read as data, never as code: JSON (the trainer's position, the RNG states),
safetensors (the weights, LoRA adapters), and pickles only through unpicklers that rebuild data alone
(`amft_vlm.run.safe_pickle`: ``NAME.pt`` files and the optimiser's ``optimizer/``). A file that would run code
when loaded is refused (`CheckpointError` naming it), so a checkpoint copied from elsewhere can at worst
fail to load.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import math
import os
import pickle
import random
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from amft_vlm.run.run_directory import LATEST, METRICS, STEP_DIRECTORY
from amft_vlm.run.safe_io import (
    InputFileError,
    OutputPathError,
    atomic_output,
    describe_kind,
    load_json_text,
    open_for_append,
    output_file_target,
    read_regular_lines,
    read_regular_text,
    write_text_atomic,
)

RNG_FILE = "rng.json"
"""Name of a checkpoint directory: ``step-`` and the number of iterations done (six digits, `checkpoint_name`)."""
MAX_JSON_BYTES = 256 * 2**20
"""Most bytes of a checkpoint's JSON file read: the largest, a policy's ``tokenizer.json``, is ~10 MB."""
MAX_METRICS_LINE_BYTES = 2**20
"""Most bytes of one ``metrics.jsonl`` line read: a step logs a few hundred numbers, a few kilobytes."""

RELIFT_OPTIMIZER = "relift_optimizer"
"""Name of ReLIFT's SFT optimiser state in a checkpoint (``relift_optimizer/``, or ``relift_optimizer.pt`` with LoRA),
written once it has stepped (``relift_sft_updates`` in the trainer state)."""

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the file, what is wrong with it and what to do."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (a full disk, ...): its temporary directory is removed and the
    previous checkpoint is as it was."""


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint after `step` iterations: ``step-000040``."""
    return f"step-{step:06d}"


def _step_of(name: str) -> int | None:
    """The step a checkpoint directory name stands for (None for any other name)."""
    match = STEP_DIRECTORY.fullmatch(name)
    return int(match.group(1)) if match else None


def rng_states() -> dict[str, Any]:
    """Python, NumPy and torch RNG states (CUDA too when present) as JSON data: numbers and lists of numbers.

    ``python``: ``[version, [625 ints], gauss_next]``; ``numpy``: ``[kind, [624 keys], position, has_gauss,
    cached_gaussian]`` (the legacy global generator's tuple); ``torch`` and each of ``cuda``: the state's bytes.
    """
    version, internal, gauss_next = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states = {
        "python": [version, list(internal), gauss_next],
        "numpy": [kind, keys.tolist(), position, has_gauss, cached_gaussian],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        states["cuda"] = [state.tolist() for state in torch.cuda.get_rng_state_all()]
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Undo :func:`rng_states`."""
    python, numpy, torch_state, cuda = _decoded_rng_states(states)
    random.setstate(python)
    np.random.set_state(numpy)
    torch.set_rng_state(torch_state)
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _decoded_rng_states(states: dict[str, Any]) -> tuple[tuple, tuple, torch.Tensor, list[torch.Tensor]]:
    """The Python, NumPy, torch and CUDA states of `rng_states`'s JSON form, as their setters take them.

    Raises:
        ValueError: `states` is not of that form.
    """
    try:
        version, internal, gauss_next = states["python"]
        kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
        python = (int(version), tuple(int(value) for value in internal), None if gauss_next is None else float(gauss_next))
        numpy = (str(kind), np.array(keys, dtype=np.uint32), int(position), int(has_gauss), float(cached_gaussian))
        torch_state = torch.tensor(states["torch"], dtype=torch.uint8)
        cuda = [torch.tensor(state, dtype=torch.uint8) for state in states.get("cuda", [])]
    except (KeyError, TypeError, ValueError, OverflowError, RuntimeError) as error:
        raise ValueError(f"not the RNG states rng_states() writes ({type(error).__name__}: {error})") from None
    return python, numpy, torch_state, cuda


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
    extra_optimizers: dict[str, torch.optim.Optimizer] | None = None,
    lora_base_model: str | None = None,
    is_main: bool = True,
) -> Path | None:
    """Write checkpoint ``step`` under ``root`` atomically and point ``latest`` at it; every process calls it.

    It is built under a temporary name: every process writes its shards of the optimiser state, the main
    process the policy (the full weights, gathered when sharded: a collective), the rest of the state,
    and then renames it into place. With ``lora_base_model`` only the LoRA adapters go to ``lora/``, with
    that base model's path or id (`amft_vlm.learning.lora.load_policy` loads it), and the optimiser state to
    ``optimizer.pt`` (LoRA runs on one process). ``extra`` maps names to states of tensors, numbers, strings
    and containers of them (e.g. a critic's weights and optimiser: what `load_state_file` reads back), saved as
    ``NAME.pt``. ``extra_optimizers`` maps names to further optimisers over the policy's parameters (ReLIFT's
    SFT optimiser), each written as the policy's own is, to ``NAME/`` (or ``NAME.pt`` with LoRA): load one with
    `load_optimizer_state` and its `name`. Returns the path on the main process, None elsewhere.

    Raises:
        CheckpointWriteError: on every process when any of them could not write its part (a full disk: the
            message says so, with the space left). The temporary directory is removed; ``latest`` and the
            checkpoint it names are as they were.
    """
    name = checkpoint_name(step)
    final, staging = root / name, root / f".tmp-{name}"
    failure = _attempt_write(functools.partial(_fresh_directory, staging), root) if is_main else None
    failure = _first_failure(failure)  # every process waits for the directory before writing into it
    if failure is None:
        write = functools.partial(
            _write_parts, staging, policy=policy, optimizers={"optimizer": optimizer, **(extra_optimizers or {})},
            scheduler=scheduler, extra=extra or {}, trainer_state=trainer_state, lora_base_model=lora_base_model, is_main=is_main,
        )  # fmt: skip
        failure = _first_failure(_attempt_write(write, staging))
    if failure is None and is_main:
        failure = _attempt_write(functools.partial(_publish, staging, final), root)
    failure = _first_failure(failure)
    if failure is not None:
        if is_main:
            shutil.rmtree(staging, ignore_errors=True)
        previous = latest_checkpoint_name(root)
        kept = f"the previous checkpoint, {previous}, is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointWriteError(
            f"could not write checkpoint {name} under {root}: {failure}; nothing of it is left and {kept}. "
            "Free some space (or fix the directory) and continue with --resume"
        )
    return final if is_main else None


def _fresh_directory(path: Path) -> None:
    """`path` as a new empty directory (its parents created; a leftover of an interrupted write removed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()


def _write_parts(staging: Path, *, policy, optimizers, scheduler, extra, trainer_state, lora_base_model, is_main) -> None:
    """Every file of a checkpoint into `staging` (see `save_checkpoint`; the optimisers' shards from every process)."""
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    if lora_base_model is not None:
        if is_main:
            from amft_vlm.learning.lora import save_lora

            save_lora(policy, staging / "lora", base_model=lora_base_model)
            for name, optimizer in optimizers.items():
                _save_state(optimizer.state_dict(), staging / f"{name}.pt")
    else:
        for name, optimizer in optimizers.items():
            optimizer_state = get_optimizer_state_dict(policy.model, optimizer)
            dcp_save({"optimizer": optimizer_state}, checkpoint_id=str(staging / name), no_dist=_single_process())
        full_weights = None
        if _sharded(policy.model):
            full_weights = get_model_state_dict(policy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if is_main:
            save_policy(policy, staging / "policy", state_dict=full_weights)
    if is_main:
        _save_state(scheduler.state_dict(), staging / "scheduler.pt")
        write_text_atomic(staging / RNG_FILE, json.dumps(rng_states()) + "\n")
        for part, state in extra.items():
            _save_state(state, staging / f"{part}.pt")
        write_text_atomic(staging / "trainer_state.json", json.dumps(trainer_state, indent=2) + "\n")


def _save_state(state: Any, file: Path) -> None:
    """``torch.save`` to `file` through `amft_vlm.run.safe_io.atomic_output` (whole or not at all; never over a FIFO or device)."""
    with atomic_output(file) as staging:
        torch.save(state, staging)


def _publish(staging: Path, final: Path) -> None:
    """Rename the finished `staging` to `final` and point ``latest`` at it; on failure neither has moved.

    ``latest`` is written as any output file (`amft_vlm.run.safe_io`: a symlink is written through); `final`, when
    it exists, must be a directory (a checkpoint of an earlier run of the same step), not a link or anything else.
    """
    root = final.parent
    replaced = root / f".old-{final.name}"
    output_file_target(root / LATEST)  # refused before anything moves
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise OutputPathError(f"{final} is {describe_kind(os.lstat(final).st_mode)}, not a checkpoint directory; move it away")
    if final.exists():  # a re-run of the same step replaces it whole; set aside first, so it is gone only for a rename
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(staging, final)
    try:
        write_text_atomic(root / LATEST, final.name + "\n")
    except BaseException:
        os.replace(final, staging)  # unpublished: removed with the rest of the failed write
        if replaced.exists():
            os.replace(replaced, final)
        raise
    shutil.rmtree(replaced, ignore_errors=True)


def _write_errors() -> tuple[type[BaseException], ...]:
    """What a write that ran out of space (or permission) raises: OSError from Python, RuntimeError from torch.save's
    zip writer, SafetensorError from safetensors, CheckpointException from torch.distributed.checkpoint."""
    from safetensors import SafetensorError
    from torch.distributed.checkpoint.api import CheckpointException

    return (OSError, RuntimeError, SafetensorError, CheckpointException)


def _attempt_write(write: Callable[[], None], where: Path) -> str | None:
    """Run `write`; None when it succeeded, else one line saying why not (a full disk named as such)."""
    try:
        write()
    except _write_errors() as error:
        return _describe_write_failure(error, where)
    return None


DISK_FULL_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded"}
NEARLY_FULL_BYTES = 2**20
"""Free space below which a failed write is put down to a full disk (torch.save's zip writer reports no errno)."""


def _describe_write_failure(error: BaseException, where: Path) -> str:
    """One line for a failed checkpoint write: what failed, and "the disk is full" with the space left when it is."""
    causes = [cause for cause, _ in error.failures.values()] if hasattr(error, "failures") else [error]
    text = "; ".join(first_line(cause) for cause in causes)
    full = None
    for cause in causes:
        number = getattr(cause, "errno", None)
        if number in DISK_FULL_ERRNOS:
            full = DISK_FULL_ERRNOS[number]
        elif "os error 28" in str(cause) or "No space left" in str(cause):
            full = DISK_FULL_ERRNOS[errno.ENOSPC]
    free = _free_bytes(where)
    if full is None and free is not None and free < NEARLY_FULL_BYTES:
        full = DISK_FULL_ERRNOS[errno.ENOSPC]
    space = f", {free / 2**20:.1f} MiB free" if free is not None else ""
    return f"{full}{space} ({text})" if full else f"{text}{space}"


def first_line(error: BaseException) -> str:
    """``Type: first line of the message`` (torch and DCP messages run over several lines)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _free_bytes(where: Path) -> int | None:
    """Bytes free for this user on the disk holding `where` (or its nearest existing parent); None if unknown."""
    for path in (where, *where.parents):
        if path.exists():
            try:
                return shutil.disk_usage(path).free
            except OSError:
                return None
    return None


def _first_failure(failure: str | None) -> str | None:
    """The first process's failure if any process had one (every process calls it: a collective when distributed)."""
    if _single_process():
        return failure
    failures: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(failures, failure)
    return next((f for f in failures if f is not None), None)


def load_optimizer_state(checkpoint: Path, policy, optimizer, *, name: str = "optimizer") -> None:
    """Load the optimiser state `name` of `checkpoint` into `optimizer` (over `policy`'s model, sharded or not).

    ``NAME/`` (torch.distributed.checkpoint) loads on any process count; a LoRA checkpoint's ``NAME.pt`` on
    one process. `name` is ``optimizer`` for the policy's own, or a key of `save_checkpoint`'s ``extra_optimizers``.
    Parameters that never had a gradient (a text-only run's vision tower) have no saved state: torch
    initialises theirs (step 1, zero moments), and they never step.
    """
    directory = checkpoint / name
    if directory.is_dir():
        from torch.distributed.checkpoint import load as dcp_load
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        from amft_vlm.run.safe_pickle import DataOnlyLoadPlanner, DataOnlyReader

        state = {"optimizer": get_optimizer_state_dict(policy.model, optimizer)}
        reader, planner = DataOnlyReader(directory), DataOnlyLoadPlanner(allow_partial_load=True)
        try:
            dcp_load(state, storage_reader=reader, planner=planner, no_dist=_single_process())
        except (Exception, CheckpointException) as error:  # every process gets the same CheckpointException
            causes = [cause for cause, _ in error.failures.values()] if isinstance(error, CheckpointException) else [error]
            raise CheckpointError(
                f"{directory} does not load ({'; '.join(map(first_line, causes))}); delete {checkpoint} "
                "to resume from the checkpoint before it"
            ) from None
        set_optimizer_state_dict(policy.model, optimizer, optim_state_dict=state["optimizer"])
    elif _sharded(policy.model):
        raise ValueError(f"{checkpoint} holds a LoRA run's {name}.pt, which loads on one process only")
    else:
        optimizer.load_state_dict(load_state_file(checkpoint / f"{name}.pt"))


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``root/latest`` names (None without the pointer); see `resumable_checkpoint` to resume."""
    name = latest_checkpoint_name(root)
    if name is None:
        return None
    path = root / name
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{root / LATEST} names {name}, which is incomplete or missing; --resume falls back to the one before it")
    return path


def latest_checkpoint_name(root: Path) -> str | None:
    """The checkpoint directory name ``root/latest`` holds, or None when it is missing or holds no such name."""
    try:  # a FIFO there is refused, not waited on (`read_regular_text`)
        name = read_regular_text(root / LATEST, 4096, what="the latest pointer").strip()
    except (OSError, ValueError):
        return None
    return name if _step_of(name) is not None else None


def resumable_checkpoint(root: Path) -> Path | None:
    """The checkpoint under `root` to resume from: the newest usable one, or None when there is none at all.

    It starts from the one ``latest`` names (every ``step-N`` directory, newest first, when the pointer is
    missing or unreadable) and goes back past any that `check_checkpoint` rejects, with a warning naming
    the file and what is wrong with it. A checkpoint newer than the one ``latest`` names is never taken:
    it was not finished, or it belongs to an earlier run in the same directory.

    Raises:
        CheckpointError: there are checkpoints but none is usable; the message names each one's problem.
    """
    problems = []
    for path in _resume_candidates(root):
        try:
            check_checkpoint(path)
        except CheckpointError as error:
            log.warning("checkpoint %s cannot be used: %s; trying the one before it", path.name, error)
            problems.append(f"{path.name}: {error}")
            continue
        if problems:
            log.warning("resuming from %s, the newest usable checkpoint under %s", path.name, root)
        return path
    if problems:
        raise CheckpointError(
            f"no usable checkpoint under {root} ({'; '.join(problems)}); restore those files, or start over "
            "without --resume (or in a new output_dir)"
        )
    return None


def _resume_candidates(root: Path) -> list[Path]:
    """Checkpoint directories to try, newest first: from the one ``latest`` names down (all without it)."""
    steps = sorted(
        ((step, path) for path in root.glob("step-*") if path.is_dir() and (step := _step_of(path.name)) is not None),
        reverse=True,
    )
    named = latest_checkpoint_name(root)
    if named is None:
        if (root / LATEST).exists():
            log.warning("%s does not name a checkpoint; trying every step-N directory under %s, newest first", root / LATEST, root)
        return [path for _, path in steps]
    newest = _step_of(named)
    older = [path for step, path in steps if step < newest]
    return [root / named, *older]  # the named one even when missing, so that its absence is reported


def check_checkpoint(path: Path) -> dict[str, Any]:
    """Check that checkpoint `path` can be loaded, without loading its weights; returns its trainer state.

    Every file the trainer reads must be there and whole: the JSON files parse; ``rng.json`` holds RNG
    states; the safetensors headers read and cover their files; torch.save files (``scheduler.pt``, any other
    ``NAME.pt``) have their zip directory (written last, so a file cut short has none) and name nothing but
    data; ``optimizer/``'s metadata is data and every optimiser shard is as long as it says. A LoRA
    checkpoint (``lora/``) has ``optimizer.pt`` instead. The trainer state's ``step`` must be the step in
    the directory's name and its counters non-negative integers.

    Raises:
        CheckpointError: naming the first file that is missing, damaged or refused (a pickle that would run
            code), and how.
    """
    if not path.is_dir():
        raise CheckpointError(f"{path} is missing")
    state = _check_trainer_state(path)
    lora = (path / "lora").is_dir()
    if not (path / RNG_FILE).is_file() and (path / "rng.pt").is_file():
        raise CheckpointError(
            f"{path / 'rng.pt'} holds RNG states pickled by an earlier amft-vlm, which this version does not unpickle "
            f"(a pickle can run code); it keeps them as data in {RNG_FILE}. Finish the run with the version that "
            "wrote it, or start it again"
        )
    for name in ("scheduler.pt", RNG_FILE, *(("optimizer.pt",) if lora else ())):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name} is missing")
    try:
        _decoded_rng_states(_read_json(path / RNG_FILE))
    except ValueError as error:
        raise CheckpointError(f"{path / RNG_FILE}: {error}") from None
    for file in sorted(path.glob("*.pt")):  # the critic's too
        _check_torch_file(file)
    if lora:
        _read_json(path / "lora" / "lora_config.json")
        _check_safetensors(path / "lora" / "adapter.safetensors")
    else:
        _check_model_directory(path / "policy")
        _check_sharded_state(path / "optimizer")
    if state.get("relift_sft_updates", 0):  # ReLIFT's SFT optimiser has stepped: its state must be there
        name = RELIFT_OPTIMIZER + (".pt" if lora else "")
        if not (path / name).exists():
            raise CheckpointError(f"{path / name} is missing (the run made {state['relift_sft_updates']} ReLIFT SFT updates)")
        if not lora:
            _check_sharded_state(path / name)
    return state


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_trainer_state(path: Path) -> dict[str, Any]:
    """The checkpoint's ``trainer_state.json``, checked: its step is the directory's, its counters are counts."""
    from amft_vlm.run.budget import Budget

    file = path / "trainer_state.json"
    state = _read_json(file)
    step, expected = state.get("step"), _step_of(path.name)
    if not _is_count(step):
        raise CheckpointError(f"{file}: step must be a non-negative integer; got {step!r}")
    if expected is not None and step != expected:
        raise CheckpointError(f"{file} says step {step}, but its directory is {path.name}")
    if not _is_count(state.get("relift_sft_updates", 0)):
        raise CheckpointError(f"{file}: relift_sft_updates must be a non-negative integer; got {state.get('relift_sft_updates')!r}")
    if not _is_count(state.get("sft_position")):
        raise CheckpointError(f"{file}: sft_position must be a non-negative integer; got {state.get('sft_position')!r}")
    if "controller" not in state or not isinstance(state["controller"], dict | None):
        raise CheckpointError(f"{file}: controller must be the controller's state or null; got {state.get('controller')!r}")
    budget, known = state.get("budget", {}), {item.name for item in dataclasses.fields(Budget)}
    if not isinstance(budget, dict) or not set(budget) <= known or not all(_is_count(v) for v in budget.values()):
        raise CheckpointError(f"{file}: budget must map {', '.join(sorted(known))} to non-negative integers; got {budget!r}")
    return state


def _read_json(file: Path, *, allow_nonfinite: bool = False) -> dict[str, Any]:
    """The JSON object in `file` (`amft_vlm.run.safe_io.load_json_text`: NaN and Infinity refused unless `allow_nonfinite`);
    CheckpointError when it is missing, not a regular file, over `MAX_JSON_BYTES`, empty or not a JSON object."""
    try:
        text = read_regular_text(file, MAX_JSON_BYTES, what="a checkpoint's JSON file")
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing") from None
    except InputFileError as error:
        raise CheckpointError(str(error)) from None
    except OSError as error:
        raise CheckpointError(f"{file} cannot be read ({error})") from None
    if not text:
        raise CheckpointError(f"{file} is empty (a write cut short?)")
    try:
        value = load_json_text(text, allow_nonfinite=allow_nonfinite)
    except ValueError as error:
        raise CheckpointError(f"{file} is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file} is not a JSON object; got {type(value).__name__}")
    return value


def _check_safetensors(file: Path) -> None:
    """The header of a safetensors file reads and its tensors cover the file exactly (no data is loaded)."""
    from safetensors import SafetensorError, safe_open

    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    try:
        with safe_open(str(file), framework="pt"):
            pass
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"{file} is cut short or damaged ({error})") from None


def _check_torch_file(file: Path) -> None:
    """A torch.save file's zip directory reads (it is written last, so a file cut short or garbled has none), and
    its pickle names nothing but data (`amft_vlm.run.safe_pickle.load_torch_data` would load it); no tensor is read."""
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    try:
        with zipfile.ZipFile(file) as archive:
            archive.infolist()
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(file)
    except (OSError, zipfile.BadZipFile, RuntimeError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"{file} is cut short or damaged ({first_line(error)})") from None
    if unsafe:
        raise CheckpointError(_refusal(file, f"it names {', '.join(unsafe)}: code that unpickling would call, not data", file.parent))


def _refusal(file: Path, why: str, checkpoint: Path) -> str:
    """The message of a file of `checkpoint` refused because loading it would run code."""
    return (
        f"{file} is refused: {why}. A checkpoint amft-vlm writes holds only tensors, numbers and strings; resume only "
        f"from checkpoints you trust, or delete {checkpoint} to resume from the one before it"
    )


def _check_model_directory(directory: Path) -> None:
    """A saved policy: its config, tokenizer and image processor files parse and its weight files are whole."""
    for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json"):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory / name} is missing")
    for file in sorted(directory.glob("*.json")):
        _read_json(file, allow_nonfinite=True)  # Hugging Face's files, which may hold Infinity
    index = directory / "model.safetensors.index.json"
    shards = sorted(set(_read_json(index).get("weight_map", {}).values())) if index.is_file() else ["model.safetensors"]
    for shard in shards:
        _check_safetensors(directory / shard)


def _check_sharded_state(directory: Path) -> None:
    """A torch.distributed.checkpoint directory: its metadata reads as data and every shard file is as long as it says."""
    from amft_vlm.run.safe_pickle import DCP_METADATA_FILE, UnsafePickleError, read_dcp_metadata

    metadata_file = directory / DCP_METADATA_FILE
    if not metadata_file.is_file():
        raise CheckpointError(f"{metadata_file} is missing")
    try:
        metadata = read_dcp_metadata(directory)
    except UnsafePickleError as error:
        raise CheckpointError(_refusal(metadata_file, str(error), directory.parent)) from None
    except Exception as error:  # unpickling a damaged file can raise almost anything
        raise CheckpointError(f"{metadata_file} is cut short or damaged ({first_line(error)})") from None
    lengths: dict[str, int] = {}
    for item in (metadata.storage_data or {}).values():
        lengths[item.relative_path] = max(lengths.get(item.relative_path, 0), item.offset + item.length)
    for name, length in sorted(lengths.items()):
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        if file.stat().st_size < length:
            raise CheckpointError(f"{file} is cut short ({file.stat().st_size} of {length} bytes)")


def load_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer's position saved in checkpoint ``path``.

    Raises:
        CheckpointError: ``trainer_state.json`` is missing, not a regular file, or not a JSON object of finite values.
    """
    return _read_json(path / "trainer_state.json")


def load_state_file(file: Path) -> Any:
    """A state file of a checkpoint that passed `check_checkpoint`, read as data only: a ``.json`` file's object,
    a ``.pt`` file through torch's weights-only unpickler (`amft_vlm.run.safe_pickle.load_torch_data`: tensors,
    numbers, strings and containers of them).

    Raises:
        CheckpointError: the file does not load, or it is refused: its pickle names code, which loading would run.
    """
    from amft_vlm.run.safe_pickle import UnsafePickleError, load_torch_data

    if file.suffix == ".json":
        return _read_json(file)
    try:
        return load_torch_data(file, what="it")
    except UnsafePickleError as error:
        raise CheckpointError(_refusal(file, str(error), file.parent)) from None
    except Exception as error:  # unpickling damaged data can raise almost anything
        raise CheckpointError(
            f"{file} does not load ({first_line(error)}); delete {file.parent} to resume from the checkpoint before it"
        ) from None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a ``metrics.jsonl``, in file order.

    A truncated last line (a run killed while writing) is skipped with a warning; any other line that
    is not a JSON object with a numeric ``step`` is an error naming the file and line, as is one nested too
    deeply (`amft_vlm.run.safe_io.load_json_text`; NaN and Infinity are read, and skipped by a report).

    Raises:
        FileNotFoundError: there is no file at `path`.
        amft_vlm.run.safe_io.InputFileError: `path` is a FIFO, device or directory (it is not waited on), or a line is
            longer than `MAX_METRICS_LINE_BYTES`.
        ValueError: a line is not a step's record.
    """
    lines = [(number, line) for number, line in read_regular_lines(path, MAX_METRICS_LINE_BYTES, what=METRICS) if line.strip()]
    records = []
    for index, (number, line) in enumerate(lines):
        try:
            record = load_json_text(line, allow_nonfinite=True)
        except json.JSONDecodeError as error:
            if index == len(lines) - 1:
                log.warning("%s:%d is cut short (run stopped while writing?); skipped", path, number)
                continue
            raise ValueError(f"{path}:{number} is not a JSON object ({error}); fix or remove that line") from error
        except ValueError as error:
            raise ValueError(f"{path}:{number} is refused ({error}); fix or remove that line") from None
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int | float) or isinstance(step, bool) or not math.isfinite(step):
            raise ValueError(f"{path}:{number} has no numeric 'step'; is this a metrics.jsonl from `amft-vlm train`?")
        records.append(record)
    return records


class MetricsLog:
    """A run's ``metrics.jsonl``: one JSON line per iteration, written by the main process only.

    Non-finite numbers are written as null: JSON has no NaN, and a missing signal is not a number. The file is
    written as any output (`amft_vlm.run.safe_io`): a symlink is written through, and a FIFO, device, socket or
    directory at its path raises `amft_vlm.run.safe_io.OutputPathError` before it is opened.
    """

    def __init__(self, output_dir: Path, *, is_main: bool) -> None:
        self.path = output_dir / METRICS
        self.is_main = is_main

    def append(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Write one iteration's metrics; returns them with non-finite numbers as None."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        if self.is_main:
            with open_for_append(self.path) as handle:
                handle.write(json.dumps(clean) + "\n")
        return clean

    def keep_until(self, step: int, *, source: Path) -> None:
        """Keep only the lines of steps up to `step`, from `source`'s file (this run's, or a warm start's run), atomically."""
        if not self.is_main:
            return
        output_file_target(self.path)  # before reading: `source` may be this run, and reading a FIFO would block
        path = source / METRICS
        if not path.exists():
            return
        kept = [json.dumps(record) + "\n" for record in read_metrics(path) if record["step"] <= step]
        write_text_atomic(self.path, "".join(kept))
