"""An expert dataset's files on disk, read without the rollout stage: names, limits, the manifest and the records.

`amft_vlm.rollout.expert_data` writes and loads datasets (its docstring describes the format); the run's preflight checks
(`amft_vlm.run.preflight.check_expert_dataset`) read a dataset's manifest and counts through this module alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from amft_vlm.run.safe_io import (
    OutsideDirectoryError,
    load_json_text,
    read_regular_lines,
    read_regular_text,
    resolve_inside,
)

MANIFEST = "manifest.json"
DIALOGUES = "dialogues.jsonl"
IMAGES = "images"
FORMAT_VERSION = 1

MAX_MANIFEST_BYTES = 2**20
"""Most bytes of a ``manifest.json`` read; a manifest is well under a kilobyte."""
MAX_RECORD_LINE_BYTES = 16 * 2**20
"""Most bytes of one ``dialogues.jsonl`` line read; a dialogue's record is a few kilobytes."""
MAX_IMAGE_PIXELS = 4096 * 4096
"""Most pixels of a dataset image decoded (its header is checked first): four times the largest observation an
environment renders (GeneralPoints at ``resolution=2048``)."""


MANIFEST_FIELDS = {"env_id": str, "env_kwargs": dict, "agent": str}
"""Manifest entries a dataset needs, with their JSON types."""


def read_manifest(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    """The dataset's manifest; raises with a clear message if the directory is not a dataset.

    An exported dataset (`amft_vlm.run.hub_format`, ``amft-vlm export``) has no manifest file: its manifest is
    derived from its rows.
    """
    from amft_vlm.run import hub_format

    path = Path(dataset_dir) / MANIFEST
    if not path.exists() and hub_format.is_exported_dataset(dataset_dir):
        return {"format_version": FORMAT_VERSION, **hub_format.rows_manifest(dataset_dir, hub_format.read_rows(dataset_dir))}
    try:  # a FIFO, a device or a file too long is refused (InputFileError), naming it
        text = read_regular_text(path, MAX_MANIFEST_BYTES, what="a dataset's manifest")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} not found: {dataset_dir} is not an expert dataset (neither one made by `amft-vlm collect` nor one made "
            "by `amft-vlm export`, which has data/*.parquet)"
        ) from None
    try:
        manifest = load_json_text(text)
    except ValueError as error:
        raise ValueError(f"{path} is not readable JSON ({error}); recollect the dataset with `amft-vlm collect`") from error
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: a manifest is a JSON object; got {type(manifest).__name__}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest.get('format_version')!r} is not the supported {FORMAT_VERSION}")
    for name, kind in MANIFEST_FIELDS.items():
        if not isinstance(manifest.get(name), kind):
            raise ValueError(f"{path}: {name} must be a JSON {'object' if kind is dict else 'string'}; got {manifest.get(name)!r}")
    return manifest


def dataset_file(root: Path, relative: Any, where: str) -> Path:
    """The file a dataset record names by a path relative to the dataset directory `root`, resolved.

    Raises:
        ValueError: `relative` is not a non-empty string, is absolute, or leads outside `root` once ``..`` and
            symlinks (`root`'s own included) are resolved; `where` (the file and line) starts the message.
    """
    if not isinstance(relative, str) or not relative:
        raise ValueError(f"{where}: a file of the dataset is named by a path relative to it, like 'images/e000000_d000.png'; got {relative!r}")
    if Path(relative).is_absolute():
        raise ValueError(f"{where}: {relative!r} is an absolute path; a dataset names its files relative to its directory {root}")
    try:
        return resolve_inside(root, root / relative)
    except OutsideDirectoryError as error:
        raise ValueError(
            f"{where}: {relative!r} leads outside the dataset directory {root} (to {error.target}); a dataset names only files "
            "inside it: fix or remove that line, or collect the dataset again"
        ) from None


def dataset_records(root: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each line of the dialogues file; a line that is not a JSON object, or whose ``image``
    is not null or a file inside the dataset (`dataset_file`), is an error naming it."""
    path = root / DIALOGUES
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the dataset {root} is incomplete; collect it again")
    for line_number, line in read_regular_lines(path, MAX_RECORD_LINE_BYTES, what="a dataset's dialogues"):
        where = f"{path}, line {line_number}"
        try:
            record = load_json_text(line)
        except ValueError as error:
            raise ValueError(f"{where}: not a dialogue record ({error})") from error
        if not isinstance(record, dict):
            raise ValueError(f"{where}: not a dialogue record (a JSON {type(record).__name__})")
        if record.get("image") is not None:
            dataset_file(root, record["image"], f"{where}: image")
        yield line_number, record


def solved_dialogue_count(dataset_dir: str | os.PathLike) -> int:
    """How many dialogues of solved episodes the dataset has (what SFT trains on), read without loading images."""
    from amft_vlm.run import hub_format

    root = Path(dataset_dir)
    if not (root / MANIFEST).exists() and hub_format.is_exported_dataset(root):
        return sum(row["success"] is True for row in hub_format.read_rows(root))
    read_manifest(root)
    return sum(record.get("success") is True for _, record in dataset_records(root))
