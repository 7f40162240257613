"""Checks of what a command's settings point at, run before any model loads or any work starts.

`amft_vlm.run.config.TrainConfig.validate` checks values on their own (ranges, choices). The checks here
look outside the config: whether an environment id is registered and takes the given arguments,
whether a model path or Hub id can be found, whether an expert dataset suits the run, whether a
device exists and an output directory can be written. Each raises ``ValueError`` with one line that
names the setting, the problem and what to do, so a bad run stops in a second instead of after the
model has loaded (or, for an output directory, after the work is done).
"""

from __future__ import annotations

import importlib
import inspect
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
from gymnasium.envs.registration import load_env_creator

import environments
from amft_vlm.run.config import (
    check_device as check_device,  # the device check lives with the setting it checks
)
from amft_vlm.run.expert_format import read_manifest, solved_dialogue_count
from amft_vlm.run.safe_io import OutputPathError, output_directory, output_file_target

if TYPE_CHECKING:
    from amft_vlm.run.config import TrainConfig

TINY_PREFIX = "tiny:"
"""Model specs that build a tiny random model (`agents.tiny.resolve_model_spec`)."""


def check_run_inputs(config: TrainConfig, *, uses_expert_data: bool) -> None:
    """Everything a training run reads or writes, checked before its model loads (see the module docstring);
    the expert datasets only when the run's method trains on them (`amft_vlm.learning.methods.Method.uses_expert_data`)."""
    check_environment(config.env_id, config.env_kwargs, what="env_kwargs", id_what="env_id")
    check_environment(
        config.env_id, config.validation_env_kwargs, what="validation_env_kwargs", id_what="env_id"
    )
    check_model_source(config.model)
    if uses_expert_data:
        for what in ("expert_data", "expert_data_after_warmup"):
            if getattr(config, what) is not None:
                check_expert_dataset(getattr(config, what), config.env_id, config.env_kwargs, what=what)
    writable_directory(config.output_dir, what="output_dir")
    from amft_vlm.run.run_directory import METRICS

    for name in ("config.yaml", METRICS):  # the run writes them: refused now, not once the model has loaded
        try:
            output_file_target(Path(config.output_dir) / name)
        except OutputPathError as error:
            raise ValueError(f"output_dir: {error}") from None


def registered_id(env_id: str) -> str | None:
    """`env_id` as the registry knows it (gym's ``module:Id`` form imports the module first), or None."""
    module, _, name = env_id.rpartition(":")
    if module:
        try:
            importlib.import_module(module)
        except ImportError:
            return None
    return name if name in gym.registry else None


def environment_arguments(env_id: str) -> dict[str, inspect.Parameter]:
    """The keyword arguments the registered environment's constructor takes, by name."""
    entry_point = gym.spec(registered_id(env_id) or env_id).entry_point
    creator = entry_point if callable(entry_point) else load_env_creator(entry_point)
    return {
        name: parameter
        for name, parameter in inspect.signature(creator).parameters.items()
        if name != "self" and parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD)
    }


def check_environment(
    env_id: str, env_kwargs: dict[str, Any], *, what: str = "env_kwargs", id_what: str = "env_id"
) -> None:
    """Raise ``ValueError`` unless `env_id` is registered and constructs with `env_kwargs` (built once and closed)."""
    if registered_id(env_id) is None:
        ours = ", ".join(environments.ENVIRONMENT_IDS)
        raise ValueError(f"{id_what}: no environment {env_id!r} is registered; amft-vlm's are {ours}")
    known = environment_arguments(env_id)
    unknown = sorted(set(env_kwargs) - set(known))
    if unknown:
        raise ValueError(
            f"{what}: {env_id} takes no argument {', '.join(map(repr, unknown))}; it takes {', '.join(known)}"
        )
    try:
        env = gym.make(env_id, **env_kwargs)
    except (TypeError, ValueError, OSError) as error:
        raise ValueError(f"{what}: {env_id} refuses {env_kwargs}: {_first_line(error)}") from error
    env.close()


def effective_environment_arguments(env_id: str, env_kwargs: dict[str, Any]) -> dict[str, Any]:
    """`env_kwargs` with every argument it leaves out at the constructor's default: what the environment is built with."""
    arguments = {
        name: parameter.default
        for name, parameter in environment_arguments(env_id).items()
        if parameter.default is not parameter.empty
    }
    return {**arguments, **env_kwargs}


def check_model_source(spec: str, *, what: str = "model") -> None:
    """Raise ``ValueError`` unless `spec` is a tiny-model spec, a model directory, or a Hub id found locally or online.

    A Hub id is looked up by fetching its ``config.json`` only (from the cache when there), so a mistyped id
    fails here rather than after the rest of the set-up.
    """
    if spec.startswith(TINY_PREFIX):
        from agents.tiny import ARCHITECTURES

        if spec[len(TINY_PREFIX) :] not in ARCHITECTURES:
            raise ValueError(
                f"{what}: a tiny model spec is {' or '.join(TINY_PREFIX + arch for arch in ARCHITECTURES)}; got {spec!r}"
            )
        return
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(
                f"{what}: {spec} is a file; give a model directory (with config.json), a Hub id, or a tiny: spec"
            )
        if not any((path / name).is_file() for name in ("config.json", "lora_config.json")):
            hint = (
                " (a training checkpoint's model is in its policy/ directory)"
                if (path / "policy").is_dir()
                else ""
            )
            raise ValueError(
                f"{what}: {spec} has no config.json, so it is not a Hugging Face model directory{hint}"
            )
        return
    if _looks_like_path(spec):
        raise ValueError(
            f"{what}: {spec} does not exist; give a model directory, a Hub id (org/name), or tiny:qwen2-vl"
        )
    from transformers.utils import cached_file

    try:
        cached_file(spec, "config.json")
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{what}: {spec!r} is not a local directory, and its config.json could not be fetched from the Hugging Face Hub "
            f"or found in the cache ({_first_line(error)})"
        ) from error


def _looks_like_path(spec: str) -> bool:
    """Whether `spec` can only be a file system path (a Hub id is ``name`` or ``org/name``)."""
    return (
        spec.startswith(("/", ".", "~"))
        or spec.count("/") > 1
        or os.sep != "/"
        and os.sep in spec
        or not spec
    )


def check_expert_dataset(dataset_dir: str | os.PathLike, env_id: str, env_kwargs: dict[str, Any], *, what: str = "expert_data") -> int:
    """Raise ``ValueError`` unless the dataset was recorded in the run's environment and has a solved dialogue.

    The manifest's ``env_id`` must be the run's, and its ``env_kwargs`` must build the same environment
    (every argument equal, defaults filled in): a V-IRL dataset cannot train a GeneralPoints run, nor a
    vision dataset a language one. Returns the number of dialogues of solved episodes (those SFT uses).
    """
    manifest = read_manifest(dataset_dir)
    where = f"{what}: {dataset_dir}"
    if (registered_id(manifest["env_id"]) or manifest["env_id"]) != (registered_id(env_id) or env_id):
        raise ValueError(
            f"{where} was recorded in {manifest['env_id']}, but the run trains on {env_id}; collect a dataset in {env_id}"
        )
    if registered_id(env_id) is not None:
        recorded = effective_environment_arguments(env_id, manifest["env_kwargs"])
        wanted = effective_environment_arguments(env_id, env_kwargs)
        differing = [
            name for name in sorted(set(recorded) | set(wanted)) if recorded.get(name) != wanted.get(name)
        ]
        if differing:
            listed = ", ".join(
                f"{name}: {recorded.get(name)!r} there, {wanted.get(name)!r} here" for name in differing
            )
            raise ValueError(
                f"{where} was recorded with other environment arguments than the run's env_kwargs ({listed}); "
                "collect with the run's arguments (amft-vlm collect --env-arg KEY=VALUE) or change env_kwargs"
            )
    solved = solved_dialogue_count(dataset_dir)
    if solved == 0:
        raise ValueError(
            f"{where} has no dialogue of a solved episode, so SFT has nothing to imitate; collect with --agent expert"
        )
    return solved


def writable_directory(path: str | os.PathLike, *, what: str, create: bool = True) -> Path:
    """Check that files can be written in directory `path`; returns it.

    With `create` the directory (and its parents) is made if needed; without, nothing is made and the
    check is on the nearest directory that exists above it (where the command will create it). A symlink to a
    directory is followed (`amft_vlm.run.safe_io.output_directory`); a file, FIFO, socket or device is refused.
    """
    directory = Path(path)
    try:
        resolved = output_directory(directory, create=False)
    except OutputPathError as error:
        raise ValueError(f"{what}: {error}") from None
    probe_in = resolved
    try:
        if create:
            resolved.mkdir(parents=True, exist_ok=True)
        else:
            while not probe_in.exists() and probe_in != probe_in.parent:
                probe_in = probe_in.parent
            if not probe_in.is_dir():
                raise NotADirectoryError(20, "Not a directory", str(probe_in))
        handle, probe = tempfile.mkstemp(dir=probe_in, prefix=".write-check-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise ValueError(f"{what}: cannot write in {directory} ({error.strerror or error}); choose a writable directory") from error
    return directory


def check_output_file(path: str | os.PathLike, *, what: str) -> Path:
    """Check that a file can be written at `path`: its directory exists and is writable, and `path` is new or a
    regular file (replaced), or a symlink to one (written through; `amft_vlm.run.safe_io`), never a directory,
    FIFO, socket or device."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{what}: {target} is a directory; give a file name, e.g. {target / 'record.json'}")
    if not target.parent.is_dir():
        raise ValueError(f"{what}: {target.parent} does not exist; create it or choose another path")
    try:
        written = output_file_target(target)
    except OutputPathError as error:
        raise ValueError(f"{what}: {error}") from None
    writable_directory(written.parent, what=what)
    return target


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
