"""``amft-vlm export``: an expert dataset of the project's format (`amft_vlm.run.expert_format`) rewritten in the
Hugging Face ``datasets`` format (`amft_vlm.run.hub_format`)."""

from __future__ import annotations

import os
from pathlib import Path

from amft_vlm.run.expert_format import MAX_IMAGE_PIXELS, dataset_file, dataset_records, read_manifest
from amft_vlm.run.hub_format import is_exported_dataset, row_from_record, write_exported_dataset
from amft_vlm.run.safe_io import decode_image_rgb, output_directory, read_regular_bytes

MAX_PNG_BYTES = 64 * 2**20
"""Most bytes of one dataset image read for export: a 4096 x 4096 RGB PNG stored without compression is 48 MiB."""


def export_dataset(source_dir: str | os.PathLike, out_dir: str | os.PathLike) -> int:
    """Write the expert dataset `source_dir` (the project's format) as an exported dataset in `out_dir`, which must
    not exist or be empty (a symlink is written through); returns the number of rows (dialogues).

    The images are copied as the PNG bytes the dataset holds (each checked to decode within the pixel bound).
    """
    source = Path(source_dir)
    if is_exported_dataset(source):
        raise ValueError(f"{source} is already an exported dataset; export reads a dataset made by `amft-vlm collect`")
    out = output_directory(out_dir)
    if any(out.iterdir()):
        raise FileExistsError(f"{out} already exists and is not empty; choose a new --out directory")
    manifest = read_manifest(source)
    rows = []
    for line_number, record in dataset_records(source):
        image = None
        if record.get("image") is not None:
            path = dataset_file(source, record["image"], f"{source}, line {line_number}: image")
            image = read_regular_bytes(path, MAX_PNG_BYTES, what="a dataset image")
            decode_image_rgb(image, max_pixels=MAX_IMAGE_PIXELS, what="a dataset image", name=str(path))
        rows.append(row_from_record(record, manifest, image))
    write_exported_dataset(out, rows, source=str(source))
    return len(rows)
