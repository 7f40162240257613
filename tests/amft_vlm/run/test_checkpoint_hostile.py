"""A checkpoint from elsewhere is read as data: a pickle that would run code is refused before it runs.

Each test plants a payload, an object whose unpickling writes a marker file (as ``os.system`` would run a
command), in one kind of file the trainer loads, and checks that resuming (or warm-starting) refuses the file,
naming it, and that the marker never appears.
"""

import json
import logging
import pickle
import random
import shutil

import numpy as np
import pytest
import torch

from amft_vlm.learning.checkpoint import CheckpointError, load_state_file, restore_rng_states, rng_states
from tests.amft_vlm.learning.test_checkpoint_faults import trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class WritesMarker:
    """A pickle payload: unpickling it runs code (here: creating the file `marker`)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 4-step SFT run with checkpoints after steps 2 and 4; tests change copies of it only."""
    path = tmp_path_factory.mktemp("finished") / "run"
    trainer(path).train()
    return path


@pytest.fixture
def run_copy(finished_run, tmp_path):
    return shutil.copytree(finished_run, tmp_path / "run")


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "the-payload-ran"


def test_the_payload_runs_code_when_unpickled(marker):
    pickle.loads(pickle.dumps(WritesMarker(marker)))
    assert marker.exists()  # so a marker that never appears below means the payload was never unpickled


def _torch_file(state_around):
    """Plant ``torch.save(state_around(payload))``: the payload inside a state of the file's usual shape."""
    return lambda file, marker: torch.save(state_around(WritesMarker(marker)), file)


def _metadata(file, marker):
    metadata = pickle.loads(file.read_bytes())  # the test's own checkpoint: trusted here
    metadata.planner_data = {"payload": WritesMarker(marker)}
    file.write_bytes(pickle.dumps(metadata))


def _earlier_rng(file, marker):
    """An earlier version's checkpoint: RNG states pickled in rng.pt, no rng.json."""
    (file.parent / "rng.json").unlink()
    torch.save({"python": WritesMarker(marker)}, file)


PLANTED = {
    "scheduler.pt": ("scheduler.pt", _torch_file(lambda payload: {"last_epoch": payload})),
    "critic.pt": ("critic.pt", _torch_file(lambda payload: {"head": {}, "optimizer": payload})),
    "optimizer.pt (LoRA)": ("optimizer.pt", _torch_file(lambda payload: {"state": {}, "param_groups": [payload]})),
    "rng.pt (an earlier version's)": ("rng.pt", _earlier_rng),
    "optimizer/.metadata (DCP)": ("optimizer/.metadata", _metadata),
}
"""Kind of file -> its path in a checkpoint and how a payload is planted there."""


@pytest.mark.parametrize("kind", list(PLANTED))
def test_a_payload_in_a_checkpoint_is_refused_on_resume(run_copy, marker, caplog, kind):
    name, plant = PLANTED[kind]
    step = run_copy / "checkpoints" / "step-000004"
    plant(step / name, marker)
    caplog.set_level(logging.WARNING, logger="amft_vlm.learning.checkpoint")
    resumed = trainer(run_copy, resume=True)
    assert resumed.start_step == 2  # the checkpoint before it
    (warning, *_) = [r.getMessage() for r in caplog.records if "cannot be used" in r.getMessage()]
    assert str(step / name) in warning, warning
    assert "is refused" in warning or "does not unpickle" in warning, warning
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["scheduler.pt", "critic.pt", "optimizer.pt (LoRA)"])
def test_loading_a_state_file_with_a_payload_is_refused(run_copy, marker, kind):
    name, plant = PLANTED[kind]
    file = run_copy / "checkpoints" / "step-000004" / name
    plant(file, marker)
    with pytest.raises(CheckpointError, match=r"is refused: it names builtins\.exec"):
        load_state_file(file)
    assert not marker.exists()


def test_a_payload_among_the_optimizer_values_is_refused_when_they_load(run_copy, marker):
    """DCP unpickles the optimiser's values that are not tensors (its hyperparameters) with weights_only=False."""
    from torch.distributed.checkpoint import save as dcp_save

    optimizer = run_copy / "checkpoints" / "step-000004" / "optimizer"
    shutil.rmtree(optimizer)
    dcp_save({"optimizer": {"param_groups": [{"lr": WritesMarker(marker)}]}}, checkpoint_id=str(optimizer), no_dist=True)
    with pytest.raises(CheckpointError, match=r"optimizer does not load \(.*optimizer\.param_groups\.0\.lr names builtins\.exec"):
        trainer(run_copy, resume=True)
    assert not marker.exists()


def test_a_warm_start_from_a_checkpoint_with_a_payload_is_refused(run_copy, marker, tmp_path):
    step = run_copy / "checkpoints" / "step-000002"
    name, plant = PLANTED["scheduler.pt"]
    plant(step / name, marker)
    with pytest.raises(CheckpointError, match=r"warm_start: .*step-000002/scheduler.pt is refused"):
        trainer(tmp_path / "warm", "method=amft", "controller.warmup_steps=2", f"warm_start={step}")
    assert not marker.exists()


def _draws():
    return random.random(), random.gauss(0, 1), np.random.rand(), np.random.normal(), torch.rand(3).tolist()


def test_rng_states_are_json_and_restore_every_generator_exactly():
    random.gauss(0, 1), np.random.normal()  # each now holds the second of a pair of normals: saved too
    saved = json.loads(json.dumps(rng_states()))
    first = _draws()
    restore_rng_states(saved)
    assert _draws() == first
