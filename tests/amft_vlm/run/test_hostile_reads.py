"""Reading hostile input (issue 22): every file amft-vlm reads may be hostile; bad input gets a clear error or a
clear penalty, never a crash and never a hang.

Four classes of input, one shared mechanism each (`amft_vlm.run.safe_io`):

- A FIFO, device or socket where a file is read would block forever (or never end): every reader checks the kind
  of file before opening it, opens without blocking and reads a bounded number of bytes (`read_regular_text`).
- JSON nested 100,000 levels deep makes ``json`` raise RecursionError, a crash with a traceback; NaN and
  Infinity are no count, reward or state: one loader (`load_json_text`) refuses both, and the reader names the
  file and line.
- An image whose header claims a huge size (a decompression bomb), a truncated file or no image at all: refused
  before decoding by an explicit pixel bound, or reported as not an image, naming the file (`read_image_rgb`).
- A symlink in a run directory (``RUN/eval/*.json``, ``metrics.jsonl``) that leads outside it would let
  ``amft-vlm report`` (and ``compare``) read any file on the machine: run-directory files are read only when they
  resolve inside the run directory (`resolve_inside`), as a dataset's files are.

A test that would hang is stopped by `never_hangs` (SIGALRM), so it fails instead of blocking the suite.
"""

import io
import json
import logging
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agents.baselines import ExpertAgent
from amft_vlm.compare.runner import EvalTask, record_is_current
from amft_vlm.evaluation import evaluate as evaluate_module
from amft_vlm.evaluation.evaluate import EvalRecord, load_record, write_record
from amft_vlm.evaluation.report import load_run, write_report
from amft_vlm.learning import checkpoint as checkpoint_module
from amft_vlm.learning.checkpoint import (
    CheckpointError,
    MetricsLog,
    check_checkpoint,
    load_trainer_state,
    read_metrics,
    resumable_checkpoint,
)
from amft_vlm.learning.lora import read_lora_settings
from amft_vlm.rollout.episode_metrics import Metric
from amft_vlm.rollout.expert_data import collect, load_dialogues, read_manifest
from amft_vlm.run.config import load_config
from amft_vlm.run.safe_io import MAX_JSON_DEPTH, load_json_text
from tests.amft_vlm.run.blocking import never_blocks

FIFO_SECONDS = 3.0
"""How long a FIFO may hold up the code under test before it fails (`never_blocks`)."""

DEEP = "[" * 100_000 + "]" * 100_000
"""JSON nested 100,000 levels deep: ``json.loads`` raises RecursionError on it."""


def write_run(run_dir: Path, steps: int = 3) -> Path:
    """A run directory as the trainer leaves it: ``config.yaml`` and ``metrics.jsonl`` of `steps` steps."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"method: sft\nsteps: {steps}\n")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": step, "mu": 1.0, "loss": 1.0 / step}) + "\n" for step in range(1, steps + 1)))
    return run_dir


def eval_record(model: str = "expert") -> EvalRecord:
    """A small evaluation record, as `amft_vlm.evaluation.evaluate.write_record` saves them."""
    return EvalRecord(
        model=model, model_kind="agent", env_id="GeneralPoints-v0", env_kwargs={}, setting="GP-L id", split="all",
        episodes=4, seeds=(0, 1, 2, 3), decoding=None, versions={}, date="2026-01-01T00:00:00+00:00", wall_seconds=1.0,
        metrics={"success_rate": Metric(1.0, 0.0, 4)},
    )  # fmt: skip


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """A GeneralPoints vision dataset of one solved episode (one image); tests change copies of it only."""
    out = tmp_path_factory.mktemp("data") / "experts"
    collect("GeneralPoints-v0", {"modality": "vision", "resolution": 64}, ExpertAgent(), episodes=1, seed=0, out_dir=out, progress=False)
    return out


@pytest.fixture
def dataset(collected, tmp_path):
    """A copy of `collected` this test may change."""
    return Path(shutil.copytree(collected, tmp_path / "experts", symlinks=True))


def first_image(dataset: Path) -> Path:
    """The image file the dataset's first record names."""
    return dataset / json.loads((dataset / "dialogues.jsonl").read_text().splitlines()[0])["image"]


def set_first_record(dataset: Path, text: str) -> None:
    """Replace the first line of the dataset's ``dialogues.jsonl`` by `text`."""
    lines = (dataset / "dialogues.jsonl").read_text().splitlines()
    (dataset / "dialogues.jsonl").write_text("\n".join([text, *lines[1:]]) + "\n")


# 1. A FIFO where a file is read: refused before it is opened, never waited on.


def _fifo_metrics_of_a_warm_start_source(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    os.mkfifo(source / "metrics.jsonl")
    MetricsLog(tmp_path, is_main=True).keep_until(1, source=source)


def _fifo_evaluation_record(tmp_path):
    os.mkfifo(tmp_path / "record.json")
    load_record(tmp_path / "record.json")


def _fifo_evaluation_record_in_a_run(tmp_path):
    run = write_run(tmp_path / "run")
    (run / "eval").mkdir()
    os.mkfifo(run / "eval" / "gp-l-id.json")
    write_report([run], tmp_path / "report")


def _fifo_metrics_in_a_run(tmp_path):
    run = write_run(tmp_path / "run")
    (run / "metrics.jsonl").unlink()
    os.mkfifo(run / "metrics.jsonl")
    load_run(run)


def _fifo_config_file(tmp_path):
    os.mkfifo(tmp_path / "config.yaml")
    load_config(tmp_path / "config.yaml")


def _fifo_trainer_state(tmp_path):
    checkpoint = tmp_path / "step-000002"
    checkpoint.mkdir()
    os.mkfifo(checkpoint / "trainer_state.json")
    load_trainer_state(checkpoint)


def _fifo_dataset_image(tmp_path, dataset):
    image = first_image(dataset)
    image.unlink()
    os.mkfifo(image)
    load_dialogues(dataset)


def _fifo_dataset_manifest(tmp_path, dataset):
    (dataset / "manifest.json").unlink()
    os.mkfifo(dataset / "manifest.json")
    read_manifest(dataset)


def _fifo_dataset_dialogues(tmp_path, dataset):
    (dataset / "dialogues.jsonl").unlink()
    os.mkfifo(dataset / "dialogues.jsonl")
    load_dialogues(dataset)


FIFO_READERS = {
    "metrics.jsonl of a warm-start source run": _fifo_metrics_of_a_warm_start_source,
    "an evaluation record": _fifo_evaluation_record,
    "RUN/eval/*.json read by report": _fifo_evaluation_record_in_a_run,
    "RUN/metrics.jsonl read by report": _fifo_metrics_in_a_run,
    "a --config file": _fifo_config_file,
    "a checkpoint's trainer_state.json": _fifo_trainer_state,
}
DATASET_FIFO_READERS = {
    "a dataset image": _fifo_dataset_image,
    "a dataset manifest.json": _fifo_dataset_manifest,
    "a dataset dialogues.jsonl": _fifo_dataset_dialogues,
}


@pytest.mark.parametrize("read", FIFO_READERS.values(), ids=FIFO_READERS.keys())
def test_a_fifo_is_refused_naming_it_not_waited_on(tmp_path, read):
    with never_blocks(FIFO_SECONDS), pytest.raises((OSError, ValueError), match=r"is a FIFO \(named pipe\), not a regular file"):
        read(tmp_path)


@pytest.mark.parametrize("read", DATASET_FIFO_READERS.values(), ids=DATASET_FIFO_READERS.keys())
def test_a_fifo_in_a_dataset_is_refused_naming_it_not_waited_on(tmp_path, dataset, read):
    with never_blocks(FIFO_SECONDS), pytest.raises((OSError, ValueError), match=r"is a FIFO \(named pipe\), not a regular file"):
        read(tmp_path, dataset)


def test_a_fifo_checkpoint_pointer_is_passed_over_not_waited_on(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    root.mkdir()
    os.mkfifo(root / "latest")
    with never_blocks(FIFO_SECONDS), caplog.at_level(logging.WARNING):
        assert resumable_checkpoint(root) is None
    assert any("does not name a checkpoint" in record.getMessage() for record in caplog.records)


def test_a_link_to_an_endless_device_is_refused_not_read(tmp_path):
    (tmp_path / "record.json").symlink_to("/dev/zero")
    with never_blocks(FIFO_SECONDS), pytest.raises(OSError, match=r"record.json is a symlink to /dev/zero, which is a character device"):
        load_record(tmp_path / "record.json")


def test_a_file_over_its_kind_s_limit_is_refused_naming_the_limit(tmp_path, monkeypatch):
    path = tmp_path / "record.json"
    write_record(eval_record(), path)
    monkeypatch.setattr(evaluate_module, "MAX_RECORD_BYTES", 100)
    with pytest.raises(ValueError, match=r"record.json is longer than 100 bytes, so it is not read"):
        load_record(path)


def test_a_json_lines_line_over_its_limit_is_refused_naming_it(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"step": 4, "note": "x" * 200}) + "\n")
    monkeypatch.setattr(checkpoint_module, "MAX_METRICS_LINE_BYTES", 100)
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 4 is longer than 100 bytes, so it is not read"):
        read_metrics(run / "metrics.jsonl")


# 2. JSON nested too deeply, or with NaN or Infinity where a number must be one: an error naming the file and line.


def _deep_metrics_line(tmp_path):
    run = write_run(tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write(f'{{"step": 4, "mu": {DEEP}}}\n{{"step": 5}}\n')
    read_metrics(run / "metrics.jsonl")
    return r"metrics.jsonl:4"


def _deep_evaluation_record(tmp_path):
    (tmp_path / "record.json").write_text(f'{{"format_version": 1, "model": {DEEP}}}')
    load_record(tmp_path / "record.json")
    return r"record.json"


def _deep_trainer_state(tmp_path):
    checkpoint = tmp_path / "step-000002"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(f'{{"step": 2, "controller": {DEEP}}}')
    check_checkpoint(checkpoint)
    return r"trainer_state.json"


def _deep_lora_config(tmp_path):
    (tmp_path / "lora_config.json").write_text(DEEP)
    read_lora_settings(tmp_path)
    return r"lora_config.json"


DEEP_READERS = {
    "a metrics.jsonl line": _deep_metrics_line,
    "an evaluation record": _deep_evaluation_record,
    "a checkpoint's trainer_state.json": _deep_trainer_state,
    "a LoRA checkpoint's lora_config.json": _deep_lora_config,
}


@pytest.mark.parametrize("read", DEEP_READERS.values(), ids=DEEP_READERS.keys())
def test_deeply_nested_json_is_an_error_naming_the_file_not_a_crash(tmp_path, read):
    with pytest.raises(ValueError, match=r"nests arrays and objects more than \d+ levels deep") as error:
        read(tmp_path)
    assert "step-000002" in str(error.value) or str(tmp_path) in str(error.value)


def test_deeply_nested_json_in_a_dataset_names_the_line(dataset):
    set_first_record(dataset, '{"episode": 0, "turns": ' + DEEP + "}")
    with pytest.raises(ValueError, match=r"dialogues.jsonl, line 1: .*nests arrays and objects more than \d+ levels deep"):
        load_dialogues(dataset)
    (dataset / "manifest.json").write_text(DEEP)
    with pytest.raises(ValueError, match=r"manifest.json .*nests arrays and objects more than \d+ levels deep"):
        read_manifest(dataset)


def test_nan_or_infinity_is_refused_where_it_is_no_number(dataset, tmp_path):
    record = json.loads((dataset / "dialogues.jsonl").read_text().splitlines()[0])
    set_first_record(dataset, json.dumps(record).replace('"rewards": [', '"rewards": [NaN, '))
    with pytest.raises(ValueError, match=r"dialogues.jsonl, line 1: .*NaN"):
        load_dialogues(dataset)
    set_first_record(dataset, json.dumps(record).replace('"rewards": [', '"rewards": [1e999, '))
    with pytest.raises(ValueError, match=r"dialogues.jsonl, line 1: .*1e999"):
        load_dialogues(dataset)
    checkpoint = tmp_path / "step-000002"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text('{"step": 2, "sft_position": 0, "controller": {"mu": Infinity}, "budget": {}}')
    with pytest.raises(CheckpointError, match=r"trainer_state.json .*Infinity"):
        check_checkpoint(checkpoint)


def test_the_nesting_bound_is_explicit_not_the_interpreter_s_recursion_limit():
    nested = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert load_json_text(nested) == json.loads(nested)
    with pytest.raises(ValueError, match=rf"more than {MAX_JSON_DEPTH} levels deep"):
        load_json_text('{"a": ' + "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH + "}")  # well under json's own limit
    shallow = json.dumps({"vocabulary": {f"token{i}": [i, [i]] for i in range(1000)}})  # many brackets, 4 levels
    assert load_json_text(shallow)["vocabulary"]["token999"] == [999, [999]]
    assert load_json_text('{"loss": NaN}', allow_nonfinite=True)["loss"] != 0.0  # metrics.jsonl: skipped by a report
    with pytest.raises(ValueError, match=r"an integer of 400 digits, beyond a float's range"):
        load_json_text("[" + "9" * 400 + "]")


# 3. Images: an explicit pixel bound, and a clear error for a truncated file or one that is no image.


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` pixels, with the pixel data of a 1 x 1 image (a bomb's header)."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((1, 1, 3), dtype=np.uint8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR's width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # its CRC, over the chunk type and data
    return bytes(data)


IMAGE_PROBLEMS = {
    "a decompression bomb's header": (lambda image: png_claiming(20_000, 20_000), r"claims more than [\d,]+ pixels, more than the 16,777,216 a dataset image may have"),
    "more pixels than a dataset image has": (lambda image: png_claiming(5_000, 5_000), r"claims 5000 x 5000 = 25,000,000 pixels, more than"),
    "a truncated PNG": (lambda image: image.read_bytes()[: len(image.read_bytes()) // 2], r"is not a readable image"),
    "no image at all": (lambda image: b"<html>not an image</html>", r"is not a readable image"),
}


@pytest.mark.parametrize("problem", IMAGE_PROBLEMS.values(), ids=IMAGE_PROBLEMS.keys())
def test_a_bad_dataset_image_is_an_error_naming_it(dataset, problem):
    make, message = problem
    image = first_image(dataset)
    image.write_bytes(make(image))
    with never_blocks(FIFO_SECONDS), pytest.raises(ValueError, match=message) as error:
        load_dialogues(dataset)
    assert str(image.name) in str(error.value) and "dialogues.jsonl, line 1" in str(error.value)


def test_a_symlink_loop_for_a_dataset_image_is_an_error_not_a_crash(dataset):
    image = first_image(dataset)
    image.unlink()
    image.symlink_to(image)  # Path.resolve raises RuntimeError on it
    with never_blocks(FIFO_SECONDS), pytest.raises(ValueError, match=r"line 1: image .* is a symlink loop"):
        load_dialogues(dataset)


# 4. Run-directory files read by report and compare resolve inside the run directory.


def test_report_refuses_an_evaluation_record_that_links_outside_the_run(tmp_path):
    run = write_run(tmp_path / "run")
    outside = tmp_path / "elsewhere" / "secret.json"
    outside.parent.mkdir()
    write_record(eval_record(model="secret-model"), outside)
    (run / "eval").mkdir()
    (run / "eval" / "gp-l-id.json").symlink_to(outside)
    with pytest.raises(ValueError, match=r"gp-l-id.json leads outside the run directory .* \(to .*secret.json\)"):
        write_report([run], tmp_path / "report")
    assert not (tmp_path / "report" / "report.md").exists()
    (run / "eval" / "gp-l-id.json").unlink()
    report = write_report([run], tmp_path / "report", eval_files=[outside])  # named on the command line: trusted
    assert "secret-model" in report.read_text()


def test_report_refuses_run_files_that_link_outside_the_run(tmp_path):
    outside = write_run(tmp_path / "elsewhere")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to(outside / "metrics.jsonl")
    with pytest.raises(ValueError, match=r"metrics.jsonl leads outside the run directory"):
        load_run(run)
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "config.yaml").symlink_to(outside / "config.yaml")
    with pytest.raises(ValueError, match=r"config.yaml leads outside the run directory"):
        load_run(run)


def test_compare_does_not_trust_a_record_that_links_outside_its_output(tmp_path, caplog):
    out = tmp_path / "out"
    (out / "eval").mkdir(parents=True)
    outside = tmp_path / "elsewhere.json"
    write_record(eval_record(), outside)
    path = out / "eval" / "sft-seed-0-id.json"
    path.symlink_to(outside)
    task = EvalTask(
        model=str(out / "sft-seed-0" / "checkpoints" / "step-000004" / "policy"), env_id="GeneralPoints-v0", setting="id",
        modality="language", split=None, episodes=4, seed=0, env_kwargs={}, num_envs=1, max_new_tokens=8, dtype="float32",
        device="cpu", path=path,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING):
        assert record_is_current(task, out) is False
    assert any("leads outside" in record.getMessage() for record in caplog.records)


def test_a_deeply_nested_extra_body_is_an_argument_error_not_a_crash(capsys):
    """``--extra-body`` is parsed as the project's files are: 100,000 nested arrays give exit 2 and a short message."""
    from amft_vlm.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["eval", "--extra-body", "[" * 100_000])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "64 levels" in error and "(100000 characters)" in error and len(error) < 2000
