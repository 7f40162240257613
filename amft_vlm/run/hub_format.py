"""Expert datasets in the Hugging Face ``datasets`` format: written by ``amft-vlm export``, read by ``train``.

An exported dataset is a directory that ``datasets.load_dataset(DIR)`` reads as one ``train`` split:

- ``data/train-00000-of-00001.parquet``: one row per dialogue of the project's own format
  (`amft_vlm.run.expert_format`), in the conversational vision layout TRL's SFT trainer reads;
- ``README.md``: a short dataset card naming the source and the columns.

Columns: ``messages`` (role, and content as a list of ``{"type": "image" | "text", "text": ...}`` parts: the
first user turn is ``[image, text]``, as `agents.chat.Dialogue.to_messages` gives the chat template), ``images``
(a list of ``datasets.Image``, PNG bytes: none or the dialogue's observation), ``env_id``, ``env_kwargs`` (JSON
text: the settings differ in keys between environments, which one Arrow struct type could not hold), ``agent``,
``episode``, ``dialogue``, ``seed``, ``rewards`` (one per answer) and ``success`` (the verifier's verdict on the
episode). The manifest `train` needs is derived from the columns, so a dataset filtered or re-saved with
``datasets`` (which drops custom Parquet metadata) still loads.

Reading is data-only (Parquet through ``pyarrow``, never pickle) and treats the directory as untrusted input: only
regular files that are not symbolic links are read, each within `MAX_PARQUET_BYTES`, images within
`amft_vlm.run.expert_format.MAX_IMAGE_PIXELS`, and an image's ``path`` in a row is never opened.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from amft_vlm.run.safe_io import (
    InputFileError,
    atomic_output,
    load_json_text,
    open_regular_for_read,
    write_text_atomic,
)

DATA = "data"
PARQUET_FILE = f"{DATA}/train-00000-of-00001.parquet"
CARD = "README.md"
MAX_PARQUET_BYTES = 4 * 2**30
"""Most bytes of one Parquet file read: a thousand-episode vision dataset is a few hundred megabytes."""

COLUMNS = ("messages", "images", "env_id", "env_kwargs", "agent", "episode", "dialogue", "seed", "rewards", "success")
"""The columns an exported dataset has, all of which `read_rows` needs."""


def features() -> Any:
    """The ``datasets.Features`` of an exported dataset (``datasets`` is imported only to write one)."""
    from datasets import Features, Image, Value

    part = {"type": Value("string"), "text": Value("string")}
    return Features(  # a Python list is a list feature in datasets 3 and 4 alike (datasets 4 calls it List)
        {
            "messages": [{"role": Value("string"), "content": [part]}],
            "images": [Image()],
            "env_id": Value("string"),
            "env_kwargs": Value("string"),
            "agent": Value("string"),
            "episode": Value("int64"),
            "dialogue": Value("int64"),
            "seed": Value("int64"),
            "rewards": [Value("float64")],
            "success": Value("bool"),
        }
    )


def is_exported_dataset(directory: str | os.PathLike) -> bool:
    """Whether `directory` looks like an exported dataset: it has a ``data/`` folder with a Parquet file in it."""
    data = Path(directory) / DATA
    return data.is_dir() and any(entry.name.endswith(".parquet") for entry in data.iterdir())


def turns_to_messages(turns: list[dict[str, str]], has_image: bool) -> list[dict[str, Any]]:
    """The project's record turns (role, text) as chat messages, the image part first in the first user turn."""
    messages = []
    image_pending = has_image
    for turn in turns:
        content = [{"type": "text", "text": turn["text"]}]
        if turn["role"] == "user" and image_pending:
            content.insert(0, {"type": "image", "text": None})
            image_pending = False
        messages.append({"role": turn["role"], "content": content})
    return messages


def messages_to_turns(messages: Any, where: str) -> list[dict[str, str]]:
    """The turns (role, text) of chat `messages`; image parts are dropped (the image travels in ``images``)."""
    if not isinstance(messages, list):
        raise ValueError(f"{where}: messages must be a list of chat messages; got {type(messages).__name__}")
    turns = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), list):
            raise ValueError(f"{where}: a message has a role and a list of content parts; got {message!r:.200}")
        texts = [part.get("text") for part in message["content"] if isinstance(part, dict) and part.get("type") == "text"]
        if not all(isinstance(text, str) for text in texts):
            raise ValueError(f"{where}: a text part's text must be a string; got {message!r:.200}")
        turns.append({"role": message["role"], "text": "".join(texts)})
    return turns


def write_exported_dataset(out: Path, rows: list[dict[str, Any]], *, source: str) -> None:
    """Write `rows` (dicts with `COLUMNS`, ``images`` as lists of PNG bytes) as an exported dataset into the existing
    empty directory `out`; each file is written whole or not at all (`amft_vlm.run.safe_io.atomic_output`)."""
    try:
        import pyarrow.parquet as parquet
        from datasets import Dataset
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(f"export needs the datasets package ({error}): pip install 'amft-vlm[hub]'") from None

    encoded = [{**row, "images": [{"bytes": image, "path": None} for image in row["images"]]} for row in rows]
    dataset = Dataset.from_list(encoded, features=features())
    (out / DATA).mkdir()
    with atomic_output(out / PARQUET_FILE) as staging:  # the schema carries the features (the Image column)
        parquet.write_table(dataset.data.table, staging)
    write_text_atomic(out / CARD, _card(source, len(rows)))


def _card(source: str, rows: int) -> str:
    """The dataset card: where the data came from and how to read it."""
    return (
        "# amft-vlm expert dataset\n\n"
        f"Exported by `amft-vlm export` from `{Path(source).name}`: {rows} dialogues, one per row.\n\n"
        "Load it with `datasets.load_dataset(\"parquet\", data_dir=...)` or `datasets.load_dataset(DIR)`; train on it with\n"
        "`amft-vlm train expert_data=DIR`. Columns: " + ", ".join(f"`{name}`" for name in COLUMNS) + ".\n"
    )


def read_rows(directory: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of an exported dataset, ``images`` as lists of PNG bytes, in file then row order.

    Raises:
        InputFileError: a Parquet file is a symbolic link, not a regular file, or longer than `MAX_PARQUET_BYTES`.
        ValueError: the directory has no Parquet file, or a file lacks a column or is not Parquet.
    """
    try:
        import pyarrow
        import pyarrow.parquet as parquet
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(f"reading an exported dataset needs pyarrow ({error}): pip install 'amft-vlm[hub]'") from None

    root = Path(directory)
    data = root / DATA
    if data.is_symlink() or not data.is_dir():
        raise ValueError(f"{data} is not a directory of the dataset {root}; export it again with `amft-vlm export`")
    files = sorted(entry for entry in data.iterdir() if entry.name.endswith(".parquet"))
    if not files:
        raise ValueError(f"{data} holds no .parquet file: {root} is not an exported dataset (made by `amft-vlm export`)")
    rows = []
    for path in files:
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            raise InputFileError(
                f"{path} is a symbolic link; a dataset's Parquet files are read only as regular files inside it: copy the "
                "file there instead of linking it"
            )
        with open_regular_for_read(path, what="a dataset's Parquet file") as handle:
            if os.fstat(handle.fileno()).st_size > MAX_PARQUET_BYTES:
                raise InputFileError(f"{path} is longer than {MAX_PARQUET_BYTES:,} bytes, so it is not read")
            try:
                table = parquet.read_table(handle)
            except pyarrow.ArrowException as error:
                raise ValueError(f"{path} is not a readable Parquet file ({error}); export the dataset again") from None
        missing = [name for name in COLUMNS if name not in table.column_names]
        if missing:
            raise ValueError(f"{path} lacks the columns {', '.join(missing)} of a dataset made by `amft-vlm export`")
        for index, row in enumerate(table.select(list(COLUMNS)).to_pylist()):
            where = f"{path}, row {index}"
            images = row["images"] or []
            if any(not isinstance(image, dict) or not isinstance(image.get("bytes"), bytes) for image in images):
                raise ValueError(f"{where}: every image must be stored as bytes (a path in a row is never opened)")
            rows.append({**row, "images": [image["bytes"] for image in images], "where": where})
    return rows


def rows_manifest(directory: str | os.PathLike, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest of an exported dataset, derived from its rows: one environment and agent for all of them."""
    where = str(Path(directory) / DATA)
    if not rows:
        raise ValueError(f"{where} has no rows; export a dataset with dialogues")
    for name in ("env_id", "env_kwargs", "agent"):
        values = {row[name] for row in rows}
        if len(values) != 1 or not isinstance(next(iter(values)), str):
            raise ValueError(f"{where}: every row must have the same {name} (a string); got {sorted(map(str, values))[:3]}")
    env_kwargs = load_json_text(rows[0]["env_kwargs"])
    if not isinstance(env_kwargs, dict):
        raise ValueError(f"{where}: env_kwargs must be a JSON object; got {rows[0]['env_kwargs']!r:.200}")
    return {
        "env_id": rows[0]["env_id"],
        "env_kwargs": env_kwargs,
        "agent": rows[0]["agent"],
        "episodes": len({row["episode"] for row in rows}),
        "seed": min(row["seed"] for row in rows),
        "dialogues": len(rows),
    }


def record_from_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row as a record of the project's format (`amft_vlm.run.expert_format`), ``image`` as PNG bytes or None."""
    if len(row["images"]) > 1:
        raise ValueError(f"{row['where']}: a dialogue shows at most one image; got {len(row['images'])}")
    return {
        "episode": row["episode"],
        "seed": row["seed"],
        "dialogue": row["dialogue"],
        "turns": messages_to_turns(row["messages"], row["where"]),
        "image": row["images"][0] if row["images"] else None,
        "rewards": row["rewards"],
        "success": row["success"],
    }


def row_from_record(record: dict[str, Any], manifest: dict[str, Any], image: bytes | None) -> dict[str, Any]:
    """A record of the project's format as a row (`COLUMNS`), with its image's PNG bytes."""
    return {
        "messages": turns_to_messages(record["turns"], image is not None),
        "images": [image] if image is not None else [],
        "env_id": manifest["env_id"],
        "env_kwargs": json.dumps(manifest["env_kwargs"], sort_keys=True),
        "agent": manifest["agent"],
        "episode": record["episode"],
        "dialogue": record["dialogue"],
        "seed": record["seed"],
        "rewards": record["rewards"],
        "success": record["success"],
    }

