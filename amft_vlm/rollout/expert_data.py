"""Expert-trajectory datasets: collect dialogues from an agent, save them, load them back.

On disk a dataset is a directory with:

- ``manifest.json``: environment id and keyword arguments, agent, episodes, seed, counts;
- ``dialogues.jsonl``: one JSON record per dialogue (an episode has one dialogue in GeneralPoints,
  one per route point in VIRL, whose dialogue restarts after each correct action);
- ``images/``: each dialogue's observation image, saved once as PNG;
- ``.amft-vlm.lock``: the lock its collection held (`amft_vlm.run.run_directory`), empty once it is done.

A record has ``episode``, ``seed``, ``dialogue`` (index within the episode), ``turns`` (role and
text, user and assistant alternating, ending with the agent's last answer), ``image`` (path
relative to the dataset, or null), ``rewards`` (one per assistant turn) and ``success`` (whether
the episode was solved). Files are written to temporary names and renamed when complete, so an
interrupted collection never leaves a dataset that looks whole.

A dataset may come from elsewhere, so its files are read as untrusted input (`amft_vlm.run.safe_io`): its records are
not trusted to name files (every reader refuses a record whose ``image`` is absolute or leads outside the dataset
directory once ``..`` and symlinks are resolved, `dataset_file`, naming the line); only regular files are read (a
FIFO is refused, not waited on), within the limits of `amft_vlm.run.expert_format` (the manifest's bytes, a line's
bytes, an image's pixels); JSON nested deeper than a record is, NaN and Infinity are refused, naming the line.

The agent plays through `amft_vlm.rollout.engine.RolloutEngine` without a policy (no model is loaded), in
one environment, episode after episode; each episode is written as soon as it ends.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from agents.base import Agent
from agents.chat import ChatTurn, Dialogue
from amft_vlm.rollout.engine import Episode, RolloutEngine, RolloutStats
from amft_vlm.run import hub_format
from amft_vlm.run.expert_format import (
    DIALOGUES,
    FORMAT_VERSION,
    IMAGES,
    MANIFEST,
    MAX_IMAGE_PIXELS,
    dataset_file,
    dataset_records,
    read_manifest,
)
from amft_vlm.run.preflight import check_environment, writable_directory
from amft_vlm.run.run_directory import LOCK_FILE, DirectoryLock, is_empty
from amft_vlm.run.safe_io import (
    InputFileError,
    OutputPathError,
    atomic_output,
    decode_image_rgb,
    output_directory,
    read_image_rgb,
    write_text_atomic,
)


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

    ``out_dir`` must not exist yet or be empty; it is built under a temporary name beside it (``DIR.partial``,
    locked: a second collection into the same directory is refused, naming the first) and renamed when
    complete. A symlink ``out_dir`` is written through (`amft_vlm.run.safe_io`): the dataset goes to its target (an
    empty directory or nothing yet) and the link stays. Returns the collection's statistics (the dialogue count is
    in the manifest).
    """
    out = output_directory(out_dir, create=False)  # a symlink's target becomes the dataset; the link stays
    if not is_empty(out):
        raise FileExistsError(f"{out} already exists and is not empty; choose a new --out directory")
    check_environment(env_id, env_kwargs, what="--env-arg", id_what="--env")
    writable_directory(out.parent, what="--out")  # the dataset is built beside it
    staging = out.with_name(out.name + ".partial")
    if staging.is_symlink():  # its leftovers are deleted below: never those of the directory a link leads to
        raise OutputPathError(f"{staging} is a symbolic link, not a collection's own staging directory; move it away")
    staging.mkdir(exist_ok=True)
    with DirectoryLock(staging, what="--out"):  # its lock file goes into the dataset with the rename
        if not is_empty(out):  # another collection finished while this one started
            raise FileExistsError(f"{out} already exists and is not empty; choose a new --out directory")
        for entry in staging.iterdir():  # what a collection that was killed left
            if entry.is_dir():
                shutil.rmtree(entry)
            elif entry.name != LOCK_FILE:
                entry.unlink()
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
            write_text_atomic(staging / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # an interrupted or failed collection leaves nothing behind
            raise
        if out.exists():
            (out / LOCK_FILE).unlink(missing_ok=True)  # an earlier dataset's, left by `rm -r DIR/*`
            out.rmdir()
        staging.rename(out)
    return stats


def _record_episodes(
    env_id: str, env_kwargs: dict[str, Any], agent: Agent, seeds: range, staging: Path, *, progress: bool
) -> tuple[RolloutStats, int]:
    """Play one episode per seed, writing its dialogues and images under `staging`; returns the statistics and dialogue count."""
    (staging / IMAGES).mkdir(parents=True)
    dialogues = 0

    with atomic_output(staging / DIALOGUES) as staged, open(staged, "w") as records:

        def write(episode: Episode) -> None:
            nonlocal dialogues
            for index, recorded in enumerate(episode.dialogues):
                image_path = None
                if recorded.dialogue.image is not None:
                    image_path = f"{IMAGES}/e{episode.index:06d}_d{index:03d}.png"
                    with atomic_output(staging / image_path) as staged_image:
                        Image.fromarray(np.asarray(recorded.dialogue.image)).save(staged_image, format="PNG", compress_level=1)
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


def load_dialogues(dataset_dir: str | os.PathLike, *, successful_only: bool = True) -> list[ExpertDialogue]:
    """The recorded dialogues, images loaded as uint8 arrays; by default only those of solved episodes.

    `dataset_dir` is a dataset made by ``amft-vlm collect`` or one made by ``amft-vlm export``
    (`amft_vlm.run.hub_format`), told apart by their files.
    """
    root = Path(dataset_dir)
    read_manifest(root)
    exported = not (root / MANIFEST).exists() and hub_format.is_exported_dataset(root)
    if exported:  # `amft-vlm export`'s Parquet: images inline as PNG bytes
        records = [(row["where"], hub_format.record_from_row(row)) for row in hub_format.read_rows(root)]
    else:
        records = [(f"{root / DIALOGUES}, line {line_number}", record) for line_number, record in dataset_records(root)]
    dialogues = []
    for where, record in records:
        try:
            turns = tuple(ChatTurn(turn["role"], turn["text"]) for turn in record["turns"])
            if exported:
                image = (
                    decode_image_rgb(record["image"], max_pixels=MAX_IMAGE_PIXELS, what="a dataset image", name=where)
                    if record["image"] is not None
                    else None
                )
            else:
                image_file = dataset_file(root, record["image"], f"{where}: image") if record["image"] else None
                image = read_image_rgb(image_file, max_pixels=MAX_IMAGE_PIXELS, what="a dataset image") if image_file else None
            item = ExpertDialogue(
                dialogue=Dialogue(turns=turns, image=image),
                rewards=tuple(float(r) for r in record["rewards"]),
                episode=int(record["episode"]),
                index=int(record["dialogue"]),
                seed=int(record["seed"]),
                success=bool(record["success"]),
            )
        except InputFileError as error:  # the image: not a regular file, over MAX_IMAGE_PIXELS, not an image
            raise ValueError(f"{where}: image {error}") from None
        except (KeyError, TypeError, ValueError, OSError) as error:
            raise ValueError(f"{where}: not a dialogue record ({error})") from error
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
    source, out = Path(source_dir), output_directory(out_dir, create=False)  # a dangling symlink: its target is made
    manifest = read_manifest(source)
    records = [record for _, record in dataset_records(source)]
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
            shutil.copytree(source / IMAGES, staging / IMAGES, symlinks=True)  # a link stays one, which readers refuse
        write_text_atomic(staging / DIALOGUES, "".join(json.dumps(record) + "\n" for record in records))
        corruption = {"kind": kind, "share": share, "seed": seed, "dialogues": len(chosen), "source": str(source)}
        write_text_atomic(staging / MANIFEST, json.dumps({**manifest, "corruption": corruption}, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    staging.rename(out)
    return len(chosen)
