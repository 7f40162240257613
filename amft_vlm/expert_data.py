"""Expert-trajectory datasets: collect dialogues from an agent, save them, load them back.

On disk a dataset is a directory with:

- ``manifest.json``: environment id and keyword arguments, agent, episodes, seed, counts;
- ``dialogues.jsonl``: one JSON record per dialogue (an episode has one dialogue in GeneralPoints,
  one per route point in VIRL, whose dialogue restarts after each correct action);
- ``images/``: each dialogue's observation image, saved once as PNG.

A record has ``episode``, ``seed``, ``dialogue`` (index within the episode), ``turns`` (role and
text, user and assistant alternating, ending with the agent's last answer), ``image`` (path
relative to the dataset, or null), ``rewards`` (one per assistant turn) and ``success`` (whether
the episode was solved). Files are written to temporary names and renamed when complete, so an
interrupted collection never leaves a dataset that looks whole.

The agent plays through `amft_vlm.rollout.RolloutEngine` without a policy (no model is loaded), in
one environment, episode after episode; each episode is written as soon as it ends.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from agents.base import Agent
from agents.chat import ChatTurn, Dialogue
from amft_vlm.preflight import check_environment, writable_directory
from amft_vlm.rollout import Episode, RolloutEngine, RolloutStats

MANIFEST = "manifest.json"
DIALOGUES = "dialogues.jsonl"
IMAGES = "images"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ExpertDialogue:
    """One recorded dialogue: the turns, its image, the reward of each answer, and the episode's outcome."""

    dialogue: Dialogue
    rewards: tuple[float, ...]
    episode: int
    index: int
    seed: int
    success: bool


def collect(
    env_id: str,
    env_kwargs: dict[str, Any],
    agent: Agent,
    *,
    episodes: int,
    seed: int,
    out_dir: str | os.PathLike,
    progress: bool = True,
) -> RolloutStats:
    """Play ``episodes`` episodes (seeds ``seed``, ``seed + 1``, ...) and write the dataset to ``out_dir``.

    ``out_dir`` must not exist yet or be empty; it is built under a temporary name and renamed
    when complete. Returns the collection's statistics (the dialogue count is in the manifest).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; --out is the dataset directory to create")
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out} already exists and is not empty; choose a new --out directory")
    check_environment(env_id, env_kwargs, what="--env-arg", id_what="--env")
    writable_directory(out.parent, what="--out")  # the dataset is built beside it
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        stats, dialogues = _record_episodes(env_id, env_kwargs, agent, range(seed, seed + episodes), staging, progress=progress)
        manifest = {
            "format_version": FORMAT_VERSION,
            "env_id": env_id,
            "env_kwargs": env_kwargs,
            "agent": agent.name,
            "episodes": episodes,
            "seed": seed,
            "dialogues": dialogues,
            "success_rate": stats.success_rate,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # an interrupted or failed collection leaves nothing behind
        raise
    if out.exists():
        out.rmdir()
    staging.rename(out)
    return stats


def _record_episodes(
    env_id: str, env_kwargs: dict[str, Any], agent: Agent, seeds: range, staging: Path, *, progress: bool
) -> tuple[RolloutStats, int]:
    """Play one episode per seed, writing its dialogues and images under `staging`; returns the statistics and dialogue count."""
    (staging / IMAGES).mkdir(parents=True)
    dialogues = 0

    with open(staging / DIALOGUES, "w") as records:

        def write(episode: Episode) -> None:
            nonlocal dialogues
            for index, recorded in enumerate(episode.dialogues):
                image_path = None
                if recorded.dialogue.image is not None:
                    image_path = f"{IMAGES}/e{episode.index:06d}_d{index:03d}.png"
                    Image.fromarray(np.asarray(recorded.dialogue.image)).save(staging / image_path, compress_level=1)
                record = {
                    "episode": episode.index,
                    "seed": episode.outcome.seed,
                    "dialogue": index,
                    "turns": [{"role": turn.role, "text": turn.text} for turn in recorded.dialogue.turns],
                    "image": image_path,
                    "rewards": list(recorded.rewards),
                    "success": episode.outcome.success,
                }
                records.write(json.dumps(record) + "\n")
            dialogues += len(episode.dialogues)

        # One environment, episode after episode: an agent drawing from its own generator answers in that order.
        with RolloutEngine(None, env_id, env_kwargs=env_kwargs) as engine:
            _, stats = engine.play(seeds, responder=agent, progress=progress, on_episode=write)
    return stats, dialogues


MANIFEST_FIELDS = {"env_id": str, "env_kwargs": dict, "agent": str}
"""Manifest entries a dataset needs, with their JSON types."""


def read_manifest(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    """The dataset's manifest; raises with a clear message if the directory is not a dataset."""
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {dataset_dir} is not an expert dataset (made by `amft-vlm collect`)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, OSError) as error:
        raise ValueError(f"{path} is not readable JSON ({error}); recollect the dataset with `amft-vlm collect`") from error
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: a manifest is a JSON object; got {type(manifest).__name__}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest.get('format_version')!r} is not the supported {FORMAT_VERSION}")
    for name, kind in MANIFEST_FIELDS.items():
        if not isinstance(manifest.get(name), kind):
            raise ValueError(f"{path}: {name} must be a JSON {'object' if kind is dict else 'string'}; got {manifest.get(name)!r}")
    return manifest


def _records(root: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each line of the dialogues file; a line that is not a JSON object is an error naming it."""
    path = root / DIALOGUES
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the dataset {root} is incomplete; collect it again")
    with open(path) as lines:
        for line_number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{path}, line {line_number}: not a dialogue record ({error})") from error
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {line_number}: not a dialogue record (a JSON {type(record).__name__})")
            yield line_number, record


def solved_dialogue_count(dataset_dir: str | os.PathLike) -> int:
    """How many dialogues of solved episodes the dataset has (what SFT trains on), read without loading images."""
    root = Path(dataset_dir)
    read_manifest(root)
    return sum(record.get("success") is True for _, record in _records(root))


def load_dialogues(dataset_dir: str | os.PathLike, *, successful_only: bool = True) -> list[ExpertDialogue]:
    """The recorded dialogues, images loaded as uint8 arrays; by default only those of solved episodes."""
    root = Path(dataset_dir)
    read_manifest(root)
    dialogues = []
    for line_number, record in _records(root):
        try:
            turns = tuple(ChatTurn(turn["role"], turn["text"]) for turn in record["turns"])
            image = np.asarray(Image.open(root / record["image"]).convert("RGB")) if record["image"] else None
            item = ExpertDialogue(
                dialogue=Dialogue(turns=turns, image=image),
                rewards=tuple(float(r) for r in record["rewards"]),
                episode=int(record["episode"]),
                index=int(record["dialogue"]),
                seed=int(record["seed"]),
                success=bool(record["success"]),
            )
        except (KeyError, TypeError, ValueError, OSError) as error:
            raise ValueError(f"{root / DIALOGUES}, line {line_number}: not a dialogue record ({error})") from error
        if item.success or not successful_only:
            dialogues.append(item)
    return dialogues


CORRUPTIONS = ("shuffled", "random", "single-quoted")
"""How `corrupt_dataset` replaces a dialogue's answers."""


def corrupt_dataset(
    source_dir: str | os.PathLike, out_dir: str | os.PathLike, *, share: float, kind: str = "shuffled", seed: int = 0
) -> int:
    """Copy an expert dataset with the answers of a `share` of its dialogues replaced: a poisoned expert, to test
    whether a method notices bad demonstrations (the demo's corrupted-expert AMFT run). Returns how many
    dialogues were corrupted.

    ``kind``: ``shuffled`` gives a dialogue the answers of another dialogue with as many answers (confident,
    well-formed, and wrong: the expert's solution of a different hand, route or point), ``random`` the answers
    of `agents.baselines.RandomTextAgent`, ``single-quoted`` the expert's own answers with every double quote
    turned into a single one, as a Python dict's repr writes them (a common serialisation slip: the
    environments read JSON, so GeneralPoints finds no formula, -3). Everything else is kept, the rewards and ``success`` included,
    since a poisoned dataset claims to be right; each corrupted record says ``"corrupted": true`` and the
    manifest says how (``corruption``). The dialogues are chosen by `seed`; images are copied. ``out_dir`` is
    built under a temporary name and renamed when complete, like `collect`'s.
    """
    from agents.baselines import RandomTextAgent

    if kind not in CORRUPTIONS:
        raise ValueError(f"kind must be one of {', '.join(CORRUPTIONS)}; got {kind!r}")
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1]; got {share!r}")
    source, out = Path(source_dir), Path(out_dir)
    manifest = read_manifest(source)
    records = [record for _, record in _records(source)]
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new directory for the corrupted dataset")
    writable_directory(out.parent, what="the corrupted dataset's directory")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(records), size=round(share * len(records)), replace=False).tolist())
    answers = [[turn["text"] for turn in record["turns"] if turn["role"] == "assistant"] for record in records]
    random_agent = RandomTextAgent(seed=seed)
    for index in chosen:
        if kind == "shuffled":
            donors = [other for other in range(len(records)) if other != index and len(answers[other]) == len(answers[index])]
            if not donors:
                raise ValueError(f"{source}: dialogue {index} has no other dialogue with {len(answers[index])} answers to take answers from")
            replacement = iter(answers[int(rng.choice(donors))])
        elif kind == "random":
            replacement = iter([random_agent.act({}, None) for _ in answers[index]])
        else:
            replacement = iter([answer.replace('"', "'") for answer in answers[index]])
        record = records[index]
        record["turns"] = [{**turn, "text": next(replacement)} if turn["role"] == "assistant" else turn for turn in record["turns"]]
        record["corrupted"] = True
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        if (source / IMAGES).is_dir():
            shutil.copytree(source / IMAGES, staging / IMAGES)
        with open(staging / DIALOGUES, "w") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in records)
        corruption = {"kind": kind, "share": share, "seed": seed, "dialogues": len(chosen), "source": str(source)}
        (staging / MANIFEST).write_text(json.dumps({**manifest, "corruption": corruption}, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    staging.rename(out)
    return len(chosen)
