"""Files written without destroying what is at their path, and files read as possibly hostile input.

Every file the project writes (evaluation records, reports and their plots, expert datasets, checkpoints,
``metrics.jsonl``, the response cache, log files, models) goes through these helpers, which only ever
replace a regular file or create a new one:

- **A regular file** is replaced whole or not at all: the data goes to a uniquely named temporary file
  beside it, which is renamed into place (``os.replace``, atomic on POSIX) and removed if the write
  fails. The file keeps its permission bits; a new one gets ``0o666`` less the umask.
- **A symbolic link is written through**, by choice: the link (every link of a chain) is resolved and the
  same rules apply to its target, which is replaced or, for a dangling link, created; the link stays a
  link. An output path that is a link says where its owner wants the data, and replacing the link by a
  file would cut it silently.
- **A directory, FIFO, socket, character or block device, or a symlink loop** is refused with
  `OutputPathError` before anything is opened: a write never blocks on a FIFO, and
  ``--out /dev/null`` run as root stays the device it was.

Appending (`open_for_append`) follows the same rules. An output directory (`output_directory`) must be a
directory or absent; a link to one is followed.

The kind of a path is read with ``os.lstat`` before any open, and again just before the rename: these
helpers protect against a mistaken or hostile path, not against another process that swaps the path
between that check and the rename.

Every file the project reads (configs, ``metrics.jsonl``, evaluation records, checkpoints' JSON, datasets and their
images, cached responses) may come from elsewhere, so it is read under these rules:

- **Only a regular file is read** (`open_regular_for_read`, `read_regular_text`, `read_regular_lines`): a FIFO
  would block the reader forever and ``/dev/zero`` never ends, so anything else is refused with `InputFileError`
  before it is opened; the open itself does not block, and the kind is checked again on the open file. A
  symlink is followed.
- **Bytes are bounded**: each kind of file has a generous limit (a line limit for JSON Lines), past which it is
  refused, naming the limit, before it is read whole.
- **JSON is parsed by `load_json_text`**: nesting deeper than `MAX_JSON_DEPTH` (``json`` would raise
  RecursionError, a crash) and, where a number must be one, NaN, Infinity and numbers beyond a float's range are
  refused with a ``ValueError``.
- **Images are decoded by `read_image_rgb`** within an explicit pixel bound checked on the header, before any
  pixel is decoded; a truncated file or one that is no image is an `InputFileError`.
- **A file a directory names stays inside it** (`resolve_inside`): once ``..`` and symlinks are resolved it must
  lie in the directory (a dataset's images, a run directory's files read by ``report``).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import math
import os
import secrets
import shutil
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO

if TYPE_CHECKING:
    import numpy as np

_KINDS = (
    (stat.S_ISREG, "a file"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISLNK, "a symbolic link"),
)
"""What a path can be, as a refusal names it."""


class OutputPathError(OSError):
    """An output path that is not written: it is (or its link leads to) a directory, FIFO, socket, device or
    symlink loop, or its directory does not exist. The message names the path, what is there and what to do.

    An ``OSError``, so the command line reports it as an error (exit code 2) like any other failed write.
    """


def describe_kind(mode: int) -> str:
    """What an ``os.lstat`` mode is, in words: ``"a file"``, ``"a FIFO (named pipe)"``, ``"a character device"``..."""
    return next((name for test, name in _KINDS if test(mode)), f"an unknown kind of file (mode {mode:o})")


def _lstat(path: Path) -> os.stat_result | None:
    """``os.lstat(path)``, or None when nothing is there (or a component of its directory is not a directory)."""
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _resolve(path: Path) -> tuple[Path, os.stat_result | None]:
    """`path`, or the final target of the link at `path`, with what is there (``os.lstat``; None for nothing)."""
    info = _lstat(path)
    if info is None or not stat.S_ISLNK(info.st_mode):
        return path, info
    target = Path(os.path.realpath(path))
    return target, _lstat(target)


def _what_is_at(given: Path, target: Path, mode: int) -> str:
    """``PATH is a FIFO (named pipe)``, or ``PATH is a symlink to TARGET, which is a FIFO (named pipe)``."""
    if stat.S_ISLNK(mode):  # still a link once resolved: the chain loops
        return f"{given} is a symlink loop (or a chain of links too long to follow)"
    if target == given:
        return f"{given} is {describe_kind(mode)}"
    return f"{given} is a symlink to {target}, which is {describe_kind(mode)}"


def output_file_target(path: str | os.PathLike) -> Path:
    """Where a write to the output file `path` lands, after checking that it may be written; nothing is opened.

    That is `path` itself, or for a symbolic link its final target (written through; see the module docstring).

    Raises:
        OutputPathError: `path` (or its target) exists and is not a regular file, or its directory is missing.
    """
    given = Path(path)
    target, info = _resolve(given)
    if info is not None and not stat.S_ISREG(info.st_mode):
        raise OutputPathError(
            f"{_what_is_at(given, target, info.st_mode)}; an output is only written as a regular file, new or "
            "replacing one: choose another path"
        )
    if not target.parent.is_dir():
        through = f" (where the symlink {given} leads)" if target != given else ""
        raise OutputPathError(f"{target.parent} does not exist or is not a directory{through}; create it or choose another path")
    return target


def _check_still_replaceable(given: Path, target: Path) -> None:
    """Refuse the rename when something other than a regular file has appeared at `target` meanwhile."""
    info = _lstat(target)
    if info is not None and not stat.S_ISREG(info.st_mode):
        raise OutputPathError(f"{_what_is_at(given, target, info.st_mode)} (since the write began); it is not replaced")


def _staging_file(target: Path) -> Path:
    """A new empty file beside `target`, uniquely named ``.NAME.XXXXXXXX.tmp``, with `target`'s permission bits when it
    exists (``0o666`` less the umask otherwise: ``tempfile.mkstemp`` would make every output ``0o600``)."""
    info = _lstat(target)
    for _ in range(100):
        staging = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            handle = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        except FileExistsError:
            continue
        try:
            if info is not None:
                os.fchmod(handle, stat.S_IMODE(info.st_mode))
        finally:
            os.close(handle)
        return staging
    raise FileExistsError(errno.EEXIST, "no free temporary name beside the output", str(target))


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Write the output file `path` whole or not at all through a temporary file that the caller fills.

    Yields the temporary file's path (an empty file beside the target, in its directory) for a writer that
    wants a path: ``fig.savefig``, ``PIL.Image.save``, ``torch.save``, ``safetensors.torch.save_file``. Such a
    writer that guesses the format from the name sees ``.tmp``, so give it the format. When the block ends
    without an error the file is renamed into place; in any case the temporary file is removed.

        with atomic_output(out / "mu.png") as staging:
            fig.savefig(staging, format="png")

    Raises:
        OutputPathError: as `output_file_target`, checked before the block runs and again before the rename.
    """
    given = Path(path)
    target = output_file_target(given)
    staging = _staging_file(target)
    try:
        yield staging
        _check_still_replaceable(given, target)
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to the output file `path`, whole or not at all (`atomic_output`; a symlink is written through).

    Raises:
        OutputPathError: `path` is (or leads to) a directory, FIFO, socket, device or symlink loop, or its directory is missing.
    """
    with atomic_output(path) as staging:
        staging.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to the output file `path`, whole or not at all (`atomic_output`; a symlink is written through).

    The temporary file's name is unique, so writers of the same path in other threads or processes never share
    it, and it is removed when the write fails (the error is raised).

    Raises:
        OutputPathError: `path` is (or leads to) a directory, FIFO, socket, device or symlink loop, or its directory is missing.
    """
    with atomic_output(path) as staging:
        staging.write_text(text, encoding="utf-8")


def open_for_append(path: str | os.PathLike) -> TextIO:
    """The output file `path` opened to append text (UTF-8), created if missing; a symlink is written through.

    The kind of file is checked before the open, which is also non-blocking and checked again on the open
    file: a FIFO put there in between is refused too, never waited on.

    Raises:
        OutputPathError: `path` is (or leads to) a directory, FIFO, socket, device or symlink loop, or its directory is missing.
    """
    given = Path(path)
    target = output_file_target(given)
    try:  # O_NONBLOCK changes nothing for a regular file
        handle = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as error:
        if error.errno in (errno.ENXIO, errno.ELOOP, errno.EISDIR):  # a FIFO without reader, a link, a directory
            raise OutputPathError(f"{given} changed into something else than a regular file; it is not appended to") from error
        raise
    mode = os.fstat(handle).st_mode
    if not stat.S_ISREG(mode):
        os.close(handle)
        raise OutputPathError(f"{_what_is_at(given, target, mode)} (since it was checked); it is not appended to")
    return os.fdopen(handle, "a", encoding="utf-8")


def replace_with_file(source: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move the finished file `source` to the output file `path` under the same rules (a symlink is written through).

    A rename when both are on one file system (`source` should be beside `path`); otherwise copied through
    `atomic_output` and `source` removed.

    Raises:
        OutputPathError: `path` is (or leads to) a directory, FIFO, socket, device or symlink loop, or its directory is missing.
    """
    given = Path(path)
    target = output_file_target(given)
    try:
        os.replace(source, target)
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
        with atomic_output(target) as staging:
            shutil.copyfile(source, staging)
        os.unlink(source)


def output_directory(path: str | os.PathLike, *, create: bool = True) -> Path:
    """The directory an output directory `path` stands for, created (with its parents) unless `create` is False.

    A symlink is followed: the result is its resolved target (created when the link dangles); anything else
    than a directory there is refused. Files are then written inside it with the helpers above.

    Raises:
        OutputPathError: `path` (or its target) exists and is not a directory.
    """
    given = Path(path)
    target, info = _resolve(given)
    if info is not None and not stat.S_ISDIR(info.st_mode):
        raise OutputPathError(f"{_what_is_at(given, target, info.st_mode)}; give a directory (new or existing)")
    if create:
        target.mkdir(parents=True, exist_ok=True)
    return target


MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects `load_json_text` reads. amft-vlm's files nest a few levels (a
``tokenizer.json`` about five); ``json`` itself recurses, and raises RecursionError near a thousand."""

MAX_FLOAT_DIGITS = 309
"""Most digits of an integer `load_json_text` reads where a number must be finite: a float holds up to ~1.8e308."""


class InputFileError(OSError, ValueError):
    """An input file that is not read: it is (or its link leads to) a FIFO, socket, device or directory, or a symlink
    loop; it is longer than the limit for its kind; it is not UTF-8 text; or it is not a readable image within its
    pixel bound. The message names the file, what is wrong and what to do.

    Both an ``OSError`` (a file that cannot be read) and a ``ValueError`` (input that is refused), as
    ``io.UnsupportedOperation`` is, so that every reader's handling of either reports it; the command line exits 2.
    """


class OutsideDirectoryError(ValueError):
    """A path that leads outside the directory it must stay in once ``..`` and symlinks are resolved (`resolve_inside`).

    Attributes:
        target: where the path leads.
    """

    def __init__(self, message: str, target: Path) -> None:
        super().__init__(message)
        self.target = target


def open_regular_for_read(path: str | os.PathLike, *, what: str = "the file") -> BinaryIO:
    """The regular file `path` opened to read bytes; a symlink is followed. `what` (``"an evaluation record"``) names
    the kind of file in a refusal.

    The kind of file (of a link's final target) is checked with ``os.lstat`` before the open, which is non-blocking
    (a FIFO put there in between is not waited on) and checked again on the open file.

    Raises:
        FileNotFoundError: nothing is at `path` (or its link dangles).
        InputFileError: `path` is (or leads to) a directory, FIFO, socket, device or symlink loop.
    """
    given = Path(path)
    target, info = _resolve(given)
    if info is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(given))
    if not stat.S_ISREG(info.st_mode):
        raise InputFileError(_not_regular(given, target, info.st_mode, what))
    try:
        descriptor = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        if error.errno == errno.ELOOP:  # a link put there since it was checked
            raise InputFileError(f"{given} changed into a symbolic link since it was checked, so it is not read") from None
        raise
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise InputFileError(_not_regular(given, target, mode, what) + " (it changed since it was checked)")
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def _not_regular(given: Path, target: Path, mode: int, what: str) -> str:
    """The refusal of an input that is not a regular file: what is there, and what to do."""
    return (
        f"{_what_is_at(given, target, mode)}, not a regular file, so it is not read (a FIFO or device can block or never "
        f"end); {what} is read from a regular file only: replace it by one, or give another path"
    )


def _too_long(path: str | os.PathLike, max_bytes: int, what: str) -> InputFileError:
    return InputFileError(
        f"{path} is longer than {max_bytes:,} bytes, so it is not read; {what} is far smaller: check that it is the "
        "right file"
    )


def read_regular_bytes(path: str | os.PathLike, max_bytes: int, *, what: str = "the file") -> bytes:
    """The bytes of the regular file `path` (`open_regular_for_read`), at most `max_bytes` of them.

    Raises:
        FileNotFoundError: nothing is at `path`.
        InputFileError: `path` is not a regular file, or it is longer than `max_bytes` (refused before it is read,
            from its size).
    """
    with open_regular_for_read(path, what=what) as handle:
        if os.fstat(handle.fileno()).st_size > max_bytes:
            raise _too_long(path, max_bytes, what)
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:  # it grew since its size was read
        raise _too_long(path, max_bytes, what)
    return data


def read_regular_text(path: str | os.PathLike, max_bytes: int, *, what: str = "the file") -> str:
    """The UTF-8 text of the regular file `path`, at most `max_bytes` bytes of it (`read_regular_bytes`).

    Raises:
        FileNotFoundError: nothing is at `path`.
        InputFileError: `path` is not a regular file, is longer than `max_bytes`, or is not UTF-8 text.
    """
    data = read_regular_bytes(path, max_bytes, what=what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputFileError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); {what} is UTF-8 text") from None


def read_regular_lines(path: str | os.PathLike, max_line_bytes: int, *, what: str = "the file") -> Iterator[tuple[int, str]]:
    """(line number from 1, UTF-8 text without its newline) for each line of the regular file `path`, as it is read.

    A JSON Lines file is read a line at a time, each line within `max_line_bytes`; the file is open until the
    iteration ends.

    Raises:
        FileNotFoundError: nothing is at `path`.
        InputFileError: `path` is not a regular file (before the first line), or a line is longer than
            `max_line_bytes` or is not UTF-8 text (naming it; the lines before it have been yielded).
    """
    with open_regular_for_read(path, what=what) as handle:
        for number in itertools.count(1):
            line = handle.readline(max_line_bytes + 1)
            if not line:
                return
            if len(line) > max_line_bytes and not line.endswith(b"\n"):
                raise InputFileError(
                    f"{path}, line {number} is longer than {max_line_bytes:,} bytes, so it is not read; a line of {what} is "
                    "far shorter: check that it is the right file"
                )
            try:
                yield number, line.rstrip(b"\n").decode("utf-8")
            except UnicodeDecodeError as error:
                raise InputFileError(f"{path}, line {number} is not UTF-8 text ({error.reason}); {what} is UTF-8 text") from None


def load_json_text(text: str, *, allow_nonfinite: bool = False, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`text` parsed as JSON, as every file of the project is: ``json.loads`` within limits no file of amft-vlm comes near.

    Arrays and objects nested deeper than `max_depth` are refused (``json`` raises RecursionError on 100,000
    nested ``[``: a crash with a traceback). Unless `allow_nonfinite` (``metrics.jsonl``, where a report skips
    them), NaN, Infinity and -Infinity (which Python's ``json`` reads, JSON does not have) and numbers beyond a
    float's range (``1e999``) are refused too: a reward, a count or a controller's state that is not a number.

    Raises:
        ValueError: ``json.JSONDecodeError`` when `text` is not JSON; a plain ``ValueError`` saying which limit it
            passes (the caller names the file and line).
    """
    hooks = {} if allow_nonfinite else {"parse_constant": _refuse_constant, "parse_float": _finite_float, "parse_int": _float_sized_int}
    try:
        value = json.loads(text, **hooks)
    except RecursionError:
        raise ValueError(_too_deep(max_depth)) from None
    if text.count("[") + text.count("{") > max_depth and _nesting_exceeds(value, max_depth):  # the count is cheap
        raise ValueError(_too_deep(max_depth))
    return value


def _too_deep(max_depth: int) -> str:
    return f"it nests arrays and objects more than {max_depth} levels deep, which no file of amft-vlm does: it is damaged or not one"


def _nesting_exceeds(value: Any, max_depth: int) -> bool:
    """Whether `value` (parsed JSON) nests lists and dicts more than `max_depth` levels; walked without recursion."""
    pending = [(value, 1)] if isinstance(value, dict | list) else []
    while pending:
        container, depth = pending.pop()
        if depth > max_depth:
            return True
        items = container.values() if isinstance(container, dict) else container
        pending.extend((item, depth + 1) for item in items if isinstance(item, dict | list))
    return False


def _refuse_constant(name: str) -> float:
    raise ValueError(f"it holds {name}, which is not a number; a file of amft-vlm writes no NaN or Infinity there")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"it holds {text}, a number beyond a float's range")
    return value


def _float_sized_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_FLOAT_DIGITS:
        raise ValueError(f"it holds an integer of {len(text.lstrip('-')):,} digits, beyond a float's range")
    return int(text)


def resolve_inside(directory: str | os.PathLike, path: str | os.PathLike, *, what: str = "the directory", advice: str = "") -> Path:
    """`path` with ``..`` and every symlink resolved, checked to lie inside `directory` (resolved too).

    A directory from elsewhere (a dataset, a run directory) must not make a reader open a file outside it through
    a symlink or ``..``. `what` names the directory in the refusal (``"the run directory"``); `advice` ends it.

    Raises:
        OutsideDirectoryError: `path` leads outside `directory`; its ``target`` is where.
    """
    root = Path(os.path.realpath(directory))
    target = Path(os.path.realpath(path))  # not Path.resolve: it raises RuntimeError on a symlink loop
    if not target.is_relative_to(root):
        message = f"{path} leads outside {what} {directory} (to {target})"
        raise OutsideDirectoryError(f"{message}; {advice}" if advice else message, target)
    return target


def read_image_rgb(path: str | os.PathLike, *, max_pixels: int, what: str = "an image") -> np.ndarray:
    """The pixels of the image file `path` as RGB (uint8, height x width x 3), decoded only when its header claims at
    most `max_pixels` pixels (PIL's own limit, ~179 million, lets a few bytes claim gigabytes of pixels).

    Raises:
        FileNotFoundError: nothing is at `path`.
        InputFileError: `path` is not a regular file, claims more than `max_pixels` pixels, or is not a whole image
            file PIL can decode (truncated, damaged, or no image at all).
    """
    with open_regular_for_read(path, what=what) as handle:
        return _decode_image_rgb(handle, path, max_pixels=max_pixels, what=what)


def decode_image_rgb(data: bytes, *, max_pixels: int, what: str = "an image", name: str = "the image") -> np.ndarray:
    """The pixels of the image file bytes `data` (an image stored inside another file, such as a Parquet ``Image``
    column) as RGB, under the same bound and refusals as `read_image_rgb`; `name` names it in a refusal.

    Raises:
        InputFileError: `data` claims more than `max_pixels` pixels, or is not a whole image PIL can decode.
    """
    import io

    return _decode_image_rgb(io.BytesIO(data), name, max_pixels=max_pixels, what=what)


def _decode_image_rgb(handle: BinaryIO, path: str | os.PathLike, *, max_pixels: int, what: str) -> np.ndarray:
    """`read_image_rgb`'s decoding of an open binary file, `path` naming it in a refusal."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    too_large = f"more than the {max_pixels:,} {what} may have, so it is not decoded (a damaged file or a decompression bomb)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels is the bound that applies
            image = Image.open(handle)
    except Image.DecompressionBombError:
        raise InputFileError(f"{path} claims more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels, {too_large}") from None
    except UnidentifiedImageError:
        raise InputFileError(f"{path} is not a readable image (no image format recognised); {what} is an image file") from None
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, struct.error ... on damaged headers
        raise _unreadable_image(path, error, what) from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise InputFileError(f"{path} claims {width} x {height} = {width * height:,} pixels, {too_large}")
        try:
            return np.asarray(image.convert("RGB"))
        except Exception as error:  # a truncated file fails here, where the pixels are decoded
            raise _unreadable_image(path, error, what) from None


def _unreadable_image(path: str | os.PathLike, error: Exception, what: str) -> InputFileError:
    return InputFileError(f"{path} is not a readable image ({error or type(error).__name__}); {what} must be a whole image file: replace it")
