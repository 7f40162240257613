"""An expert dataset names only files inside itself: a record whose ``image`` leads elsewhere is refused.

A dataset can come from elsewhere. Its ``dialogues.jsonl`` names each dialogue's image by a path relative to
the dataset; ``..``, an absolute path or a symlink would make every reader (loading, SFT data, the pre-run
check, corrupting a copy) open a file outside it. Each is refused, naming the line.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agents.baselines import ExpertAgent
from amft_vlm.rollout.expert_data import collect, corrupt_dataset, load_dialogues
from amft_vlm.rollout.sft_data import load_sft_trajectories
from amft_vlm.run.preflight import check_expert_dataset

GP_VISION = {"modality": "vision", "resolution": 64}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A GeneralPoints vision dataset of 2 solved episodes, one image each."""
    out = tmp_path_factory.mktemp("data") / "experts"
    collect("GeneralPoints-v0", GP_VISION, ExpertAgent(), episodes=2, seed=0, out_dir=out, progress=False)
    return out


def _outside_image(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    image = folder / "elsewhere.png"
    Image.fromarray(np.full((8, 8, 3), 7, dtype=np.uint8)).save(image)
    return image


def _set_first_image(root: Path, image: str) -> None:
    records = [json.loads(line) for line in (root / "dialogues.jsonl").read_text().splitlines()]
    records[0]["image"] = image
    (root / "dialogues.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))


def _parent_directories(root: Path, outside: Path) -> None:
    _set_first_image(root, os.path.relpath(outside, root))


def _absolute(root: Path, outside: Path) -> None:
    _set_first_image(root, str(outside))


def _symlinked_file(root: Path, outside: Path) -> None:
    (root / "images" / "link.png").symlink_to(outside)
    _set_first_image(root, "images/link.png")


def _symlinked_directory(root: Path, outside: Path) -> None:
    first = json.loads((root / "dialogues.jsonl").read_text().splitlines()[0])["image"]
    shutil.copy(outside, outside.parent / Path(first).name)
    shutil.rmtree(root / "images")
    (root / "images").symlink_to(outside.parent, target_is_directory=True)


LEADING_OUT = {
    "parent directories": _parent_directories,
    "absolute path": _absolute,
    "symlinked image": _symlinked_file,
    "symlinked images directory": _symlinked_directory,
}


def _load_sft(root, tiny_encoders):
    return load_sft_trajectories(root, tiny_encoders["qwen2-vl"])


READERS = {
    "load_dialogues": lambda root, encoders: load_dialogues(root),
    "load_sft_trajectories": _load_sft,
    "preflight check_expert_dataset": lambda root, encoders: check_expert_dataset(root, "GeneralPoints-v0", GP_VISION),
    "corrupt_dataset": lambda root, encoders: corrupt_dataset(root, root.parent / "corrupted", share=0.5),
}


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("case", list(LEADING_OUT))
def test_an_image_path_leading_out_of_the_dataset_is_refused_naming_the_line(dataset, tmp_path, tiny_encoders, case, reader):
    root = Path(shutil.copytree(dataset, tmp_path / "copy"))
    LEADING_OUT[case](root, _outside_image(tmp_path / "outside"))
    problem = "is an absolute path" if case == "absolute path" else "leads outside the dataset directory"
    with pytest.raises(ValueError, match=rf"dialogues\.jsonl, line 1: image: .*{problem}"):
        READERS[reader](root, tiny_encoders)
    assert not (root.parent / "corrupted").exists()


@pytest.mark.parametrize("image", ["", 7, ["images/a.png"]], ids=repr)
def test_an_image_that_is_not_a_path_is_refused(dataset, tmp_path, image):
    root = Path(shutil.copytree(dataset, tmp_path / "copy"))
    _set_first_image(root, image)
    with pytest.raises(ValueError, match=r"dialogues\.jsonl, line 1: image: a file of the dataset is named by a path relative to it"):
        load_dialogues(root)


def test_a_dataset_reached_through_a_symlink_still_loads(dataset, tmp_path):
    link = tmp_path / "linked"
    link.symlink_to(dataset, target_is_directory=True)
    assert check_expert_dataset(link, "GeneralPoints-v0", GP_VISION) == 2
    assert all(item.dialogue.image is not None for item in load_dialogues(link))
