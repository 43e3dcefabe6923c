"""Where Kaggle mounts what is added to a notebook, and that the series finds it there: the setup cell finds
the code, `storage.earlier_outputs` an earlier notebook's checkpoints, in every layout Kaggle uses, never
by walking a large data set, and a search that finds nothing says where it looked and what it found."""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest

import storage
from tests.test_layout import ROOT, run_setup_cell

# Kaggle's inputs: datasets/<owner>/<slug> and notebooks/<owner>/<slug> now, <slug> before; an uploaded zip
# adds one folder (GitHub's "Download ZIP" holds warp-imdb-main/)
MOUNTS = {
    "a dataset, older layout": "warp-imdb",
    "a dataset": "datasets/me/warp-imdb",
    "a notebook's output": "notebooks/me/warp-01-reward-model",
}
IN_MOUNT = {"at its top": "", "in an uploaded zip's folder": "warp-imdb-main"}


def write_code(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "warp.py").write_text("")
    (folder / "requirements.txt").write_text("torch>=2.1\n")
    return folder


@pytest.mark.parametrize("inside", IN_MOUNT.values(), ids=IN_MOUNT.keys())
@pytest.mark.parametrize("mount", MOUNTS.values(), ids=MOUNTS.keys())
def test_the_setup_cell_finds_the_code_in_each_kaggle_layout(tmp_path, mount, inside):
    find_code = run_setup_cell()["find_code"]
    kaggle = tmp_path / "input"
    (kaggle / "datasets" / "someone" / "imdb-reviews").mkdir(parents=True)  # another input, without the code
    code = write_code(kaggle / mount / inside)
    assert find_code([kaggle, tmp_path / "drive"]) == code


def test_the_setup_cell_prefers_an_added_dataset_to_a_clone_in_an_earlier_output(tmp_path):
    """02 with 01's output added (it holds 01's clone, warp-imdb/) and the code added as a dataset."""
    find_code = run_setup_cell()["find_code"]
    kaggle = tmp_path / "input"
    write_code(kaggle / "notebooks" / "me" / "warp-01" / "warp-imdb")
    dataset = write_code(kaggle / "datasets" / "me" / "warp-code" / "warp-imdb-main")
    assert find_code([kaggle]) == dataset


def test_the_setup_cell_search_is_bounded(tmp_path):
    """Two folders below an input is not searched, nor is an input of many entries (a data set's files)
    looked into, so a large data set is never walked."""
    find_code = run_setup_cell()["find_code"]
    kaggle = tmp_path / "input"
    write_code(kaggle / "datasets" / "me" / "warp-imdb" / "src" / "warp-imdb-main")
    assert find_code([kaggle]) is None
    big = kaggle / "imdb-reviews"  # an older-layout data set
    write_code(big / "code")
    for i in range(1000):
        (big / f"{i}.txt").touch()
    assert find_code([kaggle]) is None  # 1,001 entries: not looked into
    (big / "0.txt").unlink()
    assert find_code([kaggle]) == big / "code"


def test_the_setup_cell_stops_looking_once_it_finds_the_code(tmp_path):
    """No folder inside an input is listed when an input's top holds the code."""
    import os
    import types

    cell = run_setup_cell()
    kaggle = tmp_path / "input"
    code = write_code(kaggle / "datasets" / "me" / "warp-imdb")
    (kaggle / "notebooks" / "me" / "warp-01" / "checkpoints").mkdir(parents=True)
    listed = []
    cell["os"] = types.SimpleNamespace(
        scandir=lambda folder: listed.append(Path(folder)) or os.scandir(folder)
    )
    assert cell["find_code"]([kaggle]) == code
    assert code not in listed and kaggle / "notebooks" / "me" / "warp-01" not in listed


def test_without_the_code_the_setup_cell_says_where_it_looked_and_what_each_input_holds(tmp_path):
    cell = run_setup_cell()
    kaggle, drive = tmp_path / "input", tmp_path / "drive"
    data = kaggle / "datasets" / "me" / "warp-imdb"
    (data / "docs").mkdir(parents=True)
    (data / "README.md").write_text("")  # the repository's docs only, not its code
    partial = kaggle / "notebooks" / "me" / "warp-01" / "warp-imdb-main"
    partial.mkdir(parents=True)
    (partial / "warp.py").write_text("")  # a copy without requirements.txt
    with pytest.raises(RuntimeError) as stopped:
        cell["get_code"]([kaggle, drive], "https://github.com/YOUR-USER/warp-imdb")
    message = str(stopped.value)
    assert f"looked in {kaggle}, {drive}" in message
    assert "datasets/<owner>/<slug>" in message and "notebooks/<owner>/<slug>" in message
    assert f"{data}: no warp.py in it or one folder down (it holds: README.md, docs/)" in message
    assert f"{partial / 'warp.py'} has no requirements.txt beside it" in message
    assert f"{drive}: not there" in message
    assert "Kaggle add the repository as a dataset" in message  # and what to do (tests/test_layout.py)
    row = (ROOT / "docs" / "troubleshooting.md").read_text().split("| the setup cell finds no copy")[1]
    for quoted in (
        "the code of this series is not here (looked in ",
        ": no warp.py in it or one folder down (it holds: ",
        "has no requirements.txt beside it",
    ):
        assert quoted in message and quoted in row.split("\n")[0], quoted
    (data / "README.md").unlink()
    (data / "docs").rmdir()
    emptied = cell["where_looked"]([kaggle])
    assert f"{data}: no warp.py in it or one folder down (it holds: nothing)" in emptied
    assert cell["where_looked"]([tmp_path / "empty"]).endswith(f"{tmp_path / 'empty'}: not there")


@pytest.mark.parametrize(
    "checkpoints",
    [
        "warp-01/checkpoints",  # a notebook's output, older layout: its working folder
        "notebooks/me/warp-01/checkpoints",
        "notebooks/me/warp-01/warp-imdb/checkpoints",  # the output of a notebook that worked in its clone
        "datasets/me/warp-checkpoints",  # the checkpoints folder's contents uploaded as a dataset
        "datasets/me/warp-checkpoints/checkpoints",  # the folder itself, as a zip
        "datasets/me/warp-checkpoints/upload/checkpoints",  # a zip of a folder that holds it
    ],
)
def test_an_earlier_output_is_found_in_each_kaggle_layout(tmp_path, monkeypatch, checkpoints):
    """Added as input, an earlier notebook's checkpoints are found without a store, and the reward model is
    pulled from them."""
    kaggle = tmp_path / "input"
    found = kaggle / checkpoints
    (found / "reward_model").mkdir(parents=True)
    (found / "reward_model" / "model.safetensors").write_bytes(b"weights")
    (kaggle / "datasets" / "someone" / "imdb-reviews" / "train").mkdir(parents=True)  # another input
    monkeypatch.setattr(storage, "KAGGLE_INPUT", kaggle)
    root = tmp_path / "working" / "checkpoints"
    with redirect_stdout(io.StringIO()) as out:
        store = storage.open_store("", root, None, "kaggle")
    assert store.inputs == [found] and f"earlier output found: {found}" in out.getvalue()
    store.pull(root / "reward_model")
    assert (root / "reward_model" / "model.safetensors").read_bytes() == b"weights"


def test_the_search_for_earlier_outputs_is_bounded(tmp_path):
    """At most two folders below an input, and not into a folder of more than 1,000 entries."""
    kaggle = tmp_path / "input"
    (kaggle / "notebooks" / "me" / "warp-01" / "a" / "b" / "c").mkdir(parents=True)
    data = kaggle / "imdb" / "aclImdb"  # an older-layout data set: two folders and many files
    (data / "train" / "pos").mkdir(parents=True)
    (data / "test").mkdir()
    for i in range(999):
        (data / f"{i}.txt").touch()
    found = storage.earlier_outputs(kaggle)
    assert data in found and not [p for p in found if data in p.parents]  # 1,001 entries: not looked into
    assert kaggle / "notebooks" / "me" / "warp-01" / "a" / "b" in found
    assert kaggle / "notebooks" / "me" / "warp-01" / "a" / "b" / "c" not in found
    assert kaggle / "notebooks" not in found and kaggle / "notebooks" / "me" not in found  # not inputs
    (data / "0.txt").unlink()
    assert data / "train" in storage.earlier_outputs(kaggle)
