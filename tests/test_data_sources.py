"""Data from `datasets`: a `save_to_disk` folder with splits and a hub id from the offline cache (HF_HUB_OFFLINE),
for `align data convert` and `align train`, with --split and --limit."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from align.data.convert import convert_file
from align.data.io import is_hub_id, iter_rows
from align.errors import DataError
from align.train.data import load_training_data

# HH-RLHF's release format: two transcripts per row
ROWS = [{"chosen": f"\n\nHuman: question {i}?\n\nAssistant: a kind answer {i}",
         "rejected": f"\n\nHuman: question {i}?\n\nAssistant: a rude answer {i}"} for i in range(6)]


@pytest.fixture(scope="module")
def dataset_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import datasets

    folder = tmp_path_factory.mktemp("ds") / "hh"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS[:2])}).save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A datasets cache holding the hub dataset ``someone/hh-mini`` as `load_dataset` leaves it after a download:
    made here with datasets' own json builder in a child process, then filed under the hub id's cache name."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    for split, rows in (("train", ROWS), ("test", ROWS[:2])):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = ("import datasets, sys; datasets.load_dataset('json', data_files={'train': sys.argv[1], "
            "'test': sys.argv[2]})")
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache)}
    subprocess.run([sys.executable, "-c", code, str(root / "train.jsonl"), str(root / "test.jsonl")], env=env,
                   check=True, capture_output=True)
    built = Path(glob.glob(str(cache / "json" / "*" / "*" / "*"))[0])
    target = cache / "someone___hh-mini" / "default" / built.parent.name / built.name
    target.parent.mkdir(parents=True)
    built.rename(target)
    for arrow in target.glob("json-*.arrow"):
        arrow.rename(target / arrow.name.replace("json-", "hh-mini-", 1))
    return cache


@pytest.fixture()
def offline_hub(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hub_cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return "someone/hh-mini"


def test_hub_ids_are_told_from_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("Anthropic/hh-rlhf") and is_hub_id("trl-lib/ultrafeedback_binarized")
    assert not is_hub_id("data/pairs.jsonl") and not is_hub_id("pairs.jsonl") and not is_hub_id("/abs/x")
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "set").mkdir()
    assert not is_hub_id("local/set")  # a folder of that name here wins


def test_a_dataset_folders_split_and_a_limit(dataset_folder: Path, tmp_path: Path) -> None:
    result = convert_file(dataset_folder, tmp_path / "test.jsonl", split="test")
    assert result.count == 2
    first = json.loads((tmp_path / "test.jsonl").read_text().splitlines()[0])
    assert first["prompt"] == [{"role": "user", "content": "question 0?"}]
    assert convert_file(dataset_folder, tmp_path / "some.jsonl", limit=4).count == 4
    with pytest.raises(DataError, match=r"splits \['train', 'test'\], not 'validation': choose one with --split"):
        list(iter_rows(dataset_folder, split="validation"))


def test_a_hub_dataset_from_the_offline_cache(offline_hub: str, tmp_path: Path) -> None:
    result = convert_file(offline_hub, tmp_path / "pairs.jsonl", split="test")
    assert result.count == 2 and result.format == "hh-rlhf"
    data = load_training_data(offline_hub, "dpo", limit=5)
    assert len(data.rows) == 5 and len(data.file_sha256) == 64
    assert load_training_data(offline_hub, "dpo", limit=5).file_sha256 == data.file_sha256
    assert load_training_data(offline_hub, "dpo").file_sha256 != data.file_sha256
    with pytest.raises(DataError, match=r"someone/not-cached: no such file or folder here, and as a hub dataset "
                                        r"id datasets.load_dataset\('someone/not-cached', split='train'\) failed "
                                        r"\(offline: only a dataset already in the"):
        load_training_data("someone/not-cached", "dpo")


def test_align_train_takes_a_hub_id_with_its_split(offline_hub: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    import align.train

    result = align.train.dpo(model=str(tiny_model_dir), data=offline_hub, split="train", limit=4,
                             output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2,
                             max_length=64, save_strategy="no", eval_data=offline_hub, eval_data_split="test",
                             ref_cache_dir=str(tmp_path / "cache"))
    assert result.steps == 1
    data = json.loads((Path(result.run_dir) / "data.json").read_text())
    assert data["train"]["path"] == offline_hub and data["train"]["rows_in_file"] == 4
