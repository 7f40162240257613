"""Pickled checkpoint files read as data, never as code.

A pickle names the functions and classes that rebuild its objects, and unpickling calls them: a file
that names ``os.system`` runs a command when it is loaded. A checkpoint can come from elsewhere (``train
--resume`` on a copied run, ``warm_start`` of another run's checkpoint), so every pickle amft-vlm reads
goes through an unpickler that allows data only, and a file naming anything else is refused
(`UnsafePickleError`) before anything in it runs:

- ``NAME.pt`` files (``torch.save``: the scheduler, a LoRA run's optimiser, the critic): torch's
  weights-only unpickler, which rebuilds tensors, numbers, strings and containers of them
  (`load_torch_data`).
- ``optimizer/`` (``torch.distributed.checkpoint``): DCP pickles its ``.metadata`` file with plain
  `pickle` and loads the values that are not tensors (the optimiser's hyperparameters) with
  ``torch.load(weights_only=False)``. `DataOnlyReader` reads ``.metadata`` allowing only DCP's own
  metadata classes (`DCP_METADATA_GLOBALS`), and `DataOnlyLoadPlanner` reads the values through
  `load_torch_data`.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import IO, Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from amft_vlm.run.safe_io import open_regular_for_read

DCP_METADATA_FILE = ".metadata"

DCP_METADATA_GLOBALS = frozenset(
    {
        *(
            ("torch.distributed.checkpoint.metadata", name)
            for name in (
                "Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
                "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING",
            )
        ),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
        *((module, name) for module in ("pathlib", "pathlib._local") for name in ("PosixPath", "WindowsPath")),
    }
)  # fmt: skip
"""What a DCP ``.metadata`` pickle may name besides torch's dtypes: DCP's metadata dataclasses (plain
records of names, shapes, offsets and lengths), ``torch.Size``, the layout lookup, ordered dicts and the
checkpoint's path. None of them runs anything but its own constructor."""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle that names code other than the data classes allowed: refused before anything in it runs."""


def load_torch_data(source: str | os.PathLike | IO[bytes], what: str | None = None) -> Any:
    """A ``torch.save`` file (or buffer) read by torch's weights-only unpickler: tensors, numbers, strings and
    lists, tuples and dicts of them.

    Raises:
        UnsafePickleError: the pickle names anything else (``os.system``, a NumPy array, a class of its own);
            the message lists what it names. `what` names the source in it (default: the path).
    """
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(source)
    if unsafe:
        raise UnsafePickleError(f"{what or source} names {', '.join(unsafe)}: code that unpickling would call, not data")
    if not isinstance(source, str | os.PathLike):
        source.seek(0)
    return torch.load(source, weights_only=True)


class _DcpMetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file allowing only `DCP_METADATA_GLOBALS` and torch's dtypes."""

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - pickle's hook
        if (module, name) in DCP_METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafePickleError(f"it names {module}.{name}: code that unpickling would call, not DCP's metadata")


def read_dcp_metadata(directory: str | os.PathLike) -> Metadata:
    """The ``.metadata`` of a ``torch.distributed.checkpoint`` directory, read as data only.

    Raises:
        UnsafePickleError: it names anything but DCP's metadata classes.
        amft_vlm.run.safe_io.InputFileError: it is a FIFO, device or directory.
    """
    path = Path(directory) / DCP_METADATA_FILE
    with open_regular_for_read(path, what="a sharded checkpoint's metadata") as file:  # a FIFO is refused, not waited on
        metadata = _DcpMetadataUnpickler(file).load()
    if not isinstance(metadata, Metadata):
        raise UnsafePickleError(f"it holds a {type(metadata).__name__}, not DCP's Metadata")
    return metadata


class DataOnlyReader(FileSystemReader):
    """DCP's file system reader with the ``.metadata`` file read as data only (`read_dcp_metadata`).

    It reads the one ``.metadata`` that ``torch.distributed.checkpoint.save`` writes; it takes no ``rank``, so
    DCP does not look for per-rank metadata files either.
    """

    def read_metadata(self) -> Metadata:  # noqa: D102 - FileSystemReader's
        metadata = read_dcp_metadata(self.path)
        if metadata.storage_meta is None:  # as FileSystemReader does: older writers left it out
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class DataOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner with the saved values that are not tensors read by `load_torch_data`.

    DCP hands them to ``load_bytes`` as ``torch.save`` bytes and the default planner unpickles them with
    ``weights_only=False``; here they are read as data first, and the default planner gets a fresh
    ``torch.save`` of that data instead of the file's bytes.
    """

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:  # noqa: D102 - DefaultLoadPlanner's
        data = load_torch_data(value, what=read_item.dest_index.fqn)
        rewritten = io.BytesIO()
        torch.save(data, rewritten)
        rewritten.seek(0)
        super().load_bytes(read_item, rewritten)
