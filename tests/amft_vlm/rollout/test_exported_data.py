"""``amft-vlm export``: an expert dataset as a Hugging Face ``datasets`` directory, and back into training."""

import json
import os

import datasets
import numpy as np
import pytest
from PIL import Image

from agents.baselines import ExpertAgent
from amft_vlm.cli import main
from amft_vlm.rollout.expert_data import collect, load_dialogues
from amft_vlm.rollout.sft_data import load_sft_trajectories
from amft_vlm.run.expert_format import read_manifest, solved_dialogue_count
from amft_vlm.run.hub_format import COLUMNS, PARQUET_FILE
from amft_vlm.run.preflight import check_expert_dataset
from amft_vlm.run.safe_io import InputFileError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENVIRONMENTS = [
    ("GeneralPoints-v0", {"modality": "vision", "resolution": 64}),
    ("VIRL-v0", {"modality": "vision", "resolution": 64}),
]


def collected(tmp_path, env_id, env_kwargs, episodes=2):
    """An expert dataset of `episodes` episodes and its export, both under `tmp_path`."""
    collect(env_id, env_kwargs, ExpertAgent(), episodes=episodes, seed=5, out_dir=tmp_path / "expert", progress=False)
    assert main(["export", str(tmp_path / "expert"), "--out", str(tmp_path / "exported")]) == 0
    return tmp_path / "expert", tmp_path / "exported"


@pytest.mark.parametrize(("env_id", "env_kwargs"), ENVIRONMENTS)
def test_load_dataset_reads_the_export_with_its_columns_and_pixels(tmp_path, env_id, env_kwargs):
    expert, exported = collected(tmp_path, env_id, env_kwargs)
    dataset = datasets.load_dataset(str(exported), split="train", cache_dir=str(tmp_path / "cache"))
    assert set(COLUMNS) <= set(dataset.column_names)
    assert isinstance(dataset.features["images"].feature, datasets.Image)
    originals = load_dialogues(expert, successful_only=False)
    assert len(dataset) == len(originals) == read_manifest(expert)["dialogues"]
    for row, original in zip(dataset, originals, strict=True):
        assert (row["env_id"], json.loads(row["env_kwargs"]), row["agent"]) == (env_id, env_kwargs, "expert")
        assert (row["episode"], row["dialogue"], row["seed"]) == (original.episode, original.index, original.seed)
        assert row["rewards"] == list(original.rewards) and row["success"] == original.success
        (image,) = row["images"]
        assert isinstance(image, Image.Image)
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), original.dialogue.image)
        first_user = next(message for message in row["messages"] if message["role"] == "user")
        assert [part["type"] for part in first_user["content"]] == ["image", "text"]
        texts = ["".join(part["text"] for part in message["content"] if part["type"] == "text") for message in row["messages"]]
        assert texts == [turn.text for turn in original.dialogue.turns]
        assert [message["role"] for message in row["messages"]] == [turn.role for turn in original.dialogue.turns]


@pytest.mark.parametrize(("env_id", "env_kwargs"), ENVIRONMENTS)
def test_the_export_trains_on_the_same_tokens_as_the_original(tiny_policies, tmp_path, env_id, env_kwargs):
    expert, exported = collected(tmp_path, env_id, env_kwargs)
    policy = tiny_policies["qwen2-vl"]
    original, round_tripped = load_sft_trajectories(expert, policy), load_sft_trajectories(exported, policy)
    assert original and round_tripped == original
    for before, after in zip(original, round_tripped, strict=True):
        assert [segment.token_ids for segment in after.segments] == [segment.token_ids for segment in before.segments]
    assert check_expert_dataset(exported, env_id, env_kwargs) == solved_dialogue_count(expert)
    manifest = read_manifest(exported)
    assert {key: manifest[key] for key in ("env_id", "env_kwargs", "agent", "episodes", "dialogues")} == {
        key: read_manifest(expert)[key] for key in ("env_id", "env_kwargs", "agent", "episodes", "dialogues")
    }


def test_a_symlinked_parquet_file_is_refused(tmp_path):
    _, exported = collected(tmp_path, "GeneralPoints-v0", {"modality": "vision", "resolution": 64}, episodes=1)
    parquet = exported / PARQUET_FILE
    elsewhere = tmp_path / "elsewhere.parquet"
    os.replace(parquet, elsewhere)
    parquet.symlink_to(elsewhere)
    with pytest.raises(InputFileError, match="symbolic link"):
        load_dialogues(exported)


def test_a_directory_that_is_neither_format_is_refused_clearly(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match="neither one made by `amft-vlm collect` nor one made by `amft-vlm export`"):
        load_dialogues(tmp_path / "notes")
    (tmp_path / "notes" / "data").mkdir()
    (tmp_path / "notes" / "data" / "train.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        load_dialogues(tmp_path / "notes")


def test_an_image_row_naming_a_path_is_never_opened(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, exported = collected(tmp_path, "GeneralPoints-v0", {"modality": "vision", "resolution": 64}, episodes=1)
    table = pq.read_table(exported / PARQUET_FILE)
    secret = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(secret)
    images = pa.array([[{"bytes": None, "path": str(secret)}]] * len(table), type=table.schema.field("images").type)
    pq.write_table(table.set_column(table.column_names.index("images"), "images", images), exported / PARQUET_FILE)
    with pytest.raises(ValueError, match="a path in a row is never opened"):
        load_dialogues(exported)


def test_export_refuses_a_non_empty_output_and_an_export_as_source(tmp_path, capsys):
    expert, exported = collected(tmp_path, "GeneralPoints-v0", {"modality": "language"}, episodes=1)
    with pytest.raises(SystemExit, match="2"):
        main(["export", str(expert), "--out", str(exported)])
    assert "already exists and is not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        main(["export", str(exported), "--out", str(tmp_path / "again")])
    assert "already an exported dataset" in capsys.readouterr().err
    row = datasets.load_dataset(str(exported), split="train", cache_dir=str(tmp_path / "cache"))[0]
    assert row["images"] == [] and all(part["type"] == "text" for message in row["messages"] for part in message["content"])


def test_train_runs_on_an_exported_dataset(tmp_path):
    from amft_vlm.learning.trainer import Trainer
    from amft_vlm.run.config import load_config

    overrides = ["method=sft", "steps=1", "sft_batch_size=2", "device=cpu", f"output_dir={tmp_path / 'run'}"]
    defaults = load_config(overrides=overrides)
    collected(tmp_path, defaults.env_id, defaults.env_kwargs, episodes=2)
    config = load_config(overrides=[*overrides, f"expert_data={tmp_path / 'exported'}"])
    history = Trainer(config, progress=False).train()
    assert len(history) == 1
