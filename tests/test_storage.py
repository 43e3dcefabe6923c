"""The store that joins the notebooks' sessions: STORE checked before any work (owner/name, URLs, folders,
the platform's default), write access tested once, earlier notebooks' outputs found on Kaggle, one commit
per push, progress stored only by the time rule, and "stored" said only for what the store confirmed."""

from __future__ import annotations

import io
import json
import time
from contextlib import redirect_stdout

import pytest

import storage
from tests.hub_standin import StandInHub


@pytest.fixture
def me(monkeypatch):
    """A token whose user is `me` (huggingface_hub.whoami, faked: the Hub is unreachable in tests)."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "whoami", lambda token=None: {"name": "me"})
    return "hf_test"


@pytest.mark.parametrize(
    "value, expected",
    [
        ("me/warp-imdb", "me/warp-imdb"),
        ("me/warp-imdb/", "me/warp-imdb"),
        (" me/warp-imdb ", "me/warp-imdb"),
        ("https://huggingface.co/me/warp-imdb", "me/warp-imdb"),
        ("https://huggingface.co/me/warp-imdb/tree/main", "me/warp-imdb"),
        ("hf.co/me/warp-imdb", "me/warp-imdb"),
    ],
)
def test_a_hub_store_is_normalised_to_owner_name(value, expected, me):
    assert storage.resolve_store(value, me, "kaggle")[0] == expected


@pytest.mark.parametrize(
    "value, where, message",
    [
        ("warp-imdb", "kaggle", r"not a Hub repo id \(owner/name\): did you mean 'me/warp-imdb'\?"),
        ("https://huggingface.co/datasets/me/x", "colab", r"is a dataset; the store is a model repo"),
        ("checkpoints/store/x", "kaggle", r"relative folder.*give an absolute folder"),
        ("./store", "local", r"relative folder"),
        ("me/warp imdb", "kaggle", r"'owner/name' in letters, digits"),
    ],
)
def test_a_bad_store_is_refused_with_the_fix(value, where, message, me):
    with pytest.raises(ValueError, match=message):
        storage.resolve_store(value, me, where)


def test_the_default_store_is_the_tokens_users_repo_on_kaggle_and_colab(me, tmp_path, monkeypatch):
    assert storage.resolve_store("", me, "kaggle")[0] == "me/warp-imdb"
    assert storage.resolve_store("", me, "colab")[0] == "me/warp-imdb"
    assert storage.resolve_store("", me, "local")[0] == ""  # a local machine keeps its own disk
    with pytest.raises(ValueError, match=r"Colab each notebook runs in its own session.*MyDrive"):
        storage.resolve_store("", None, "colab")
    location, line = storage.resolve_store("", None, "kaggle")  # Kaggle: the next notebook adds this output
    assert location == "" and "Add Input -> Your Work" in line and "Save & Run All" in line
    with pytest.raises(ValueError, match=r"is a Hub repo, and there is no HF_TOKEN"):
        storage.resolve_store("me/warp-imdb", None, "kaggle")


def test_a_folder_store_says_whether_it_outlives_the_session(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "DRIVE", tmp_path / "drive")
    with pytest.raises(ValueError, match=r"Google Drive, which is not mounted.*drive\.mount"):
        storage.resolve_store(str(tmp_path / "drive" / "MyDrive" / "x"), None, "colab")
    (tmp_path / "drive" / "MyDrive").mkdir(parents=True)
    assert "LOST" not in storage.resolve_store(str(tmp_path / "drive" / "MyDrive" / "x"), None, "colab")[1]
    assert "LOST when the session ends" in storage.resolve_store("/content/x", None, "colab")[1]
    assert "LOST when the session ends" in storage.resolve_store("/tmp/x", None, "kaggle")[1]
    assert "Save Version" in storage.resolve_store("/kaggle/working/store", None, "kaggle")[1]


def test_a_store_without_write_access_is_refused_before_any_work(tmp_path, monkeypatch):
    """A read-only token (the Hub answers 403 to the write check's commit) and a folder that cannot be
    created both stop `open_store`, which each notebook calls in its config cell before any model loads."""
    StandInHub(tmp_path / "hub").install(monkeypatch)
    with pytest.raises(PermissionError, match=r"cannot create or write the Hub repo.*write token"):
        storage.open_store("me/warp-imdb", tmp_path, "hf_read_only", "kaggle")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(PermissionError, match=r"cannot write there"):
        storage.open_store(str(tmp_path / "a_file" / "store"), tmp_path, None, "local")
    writable = StandInHub(tmp_path / "writable").install(monkeypatch)
    with redirect_stdout(io.StringIO()) as out:
        store = storage.open_store("me/warp-imdb", tmp_path, "hf_x", "kaggle")
    assert store.location == "me/warp-imdb" and "is writable" in out.getvalue()
    created = [(c["repo"], c["exist_ok"], c["private"]) for c in writable.calls("create_repo")]
    assert ("me/warp-imdb", True, True) in created
    assert [c["added"] for c in writable.commits("me/warp-imdb")[1:]] == [[".warp-store"]]  # one, small


def test_on_kaggle_an_earlier_notebooks_output_added_as_input_is_found_without_a_store(tmp_path, monkeypatch):
    """01's output added to 02 as input lands under /kaggle/input/<its name>/...: 02 pulls the reward model
    from there with no store and no token."""
    inputs = tmp_path / "kaggle_input"
    model = inputs / "warp-01-reward-model" / "warp-imdb" / "checkpoints" / "reward_model"
    model.mkdir(parents=True)
    (model / "metrics.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    monkeypatch.setattr(storage, "KAGGLE_INPUT", inputs)
    root = tmp_path / "working" / "checkpoints"
    with redirect_stdout(io.StringIO()) as out:
        store = storage.open_store("", root, None, "kaggle")
    assert not store and "earlier output found" in out.getvalue()
    store.pull(root / "reward_model")
    assert (root / "reward_model" / "model.safetensors").read_bytes() == b"weights"
    assert not store.push(root / "reward_model")  # nothing is stored: no store


def test_one_push_is_one_commit_and_the_log_counts_what_was_sent(tmp_path, monkeypatch):
    hub = StandInHub(tmp_path / "hub").install(monkeypatch)
    root = tmp_path / "ck"
    (root / "warp" / "final_slerp").mkdir(parents=True)
    (root / "warp" / "final_slerp" / "model.safetensors").write_bytes(b"w" * 100)
    (root / "warp" / "final_slerp" / "config.json").write_text("{}")
    (root / "warp" / "merge.json").write_text("{}")
    store = storage.Store("me/warp-imdb", root, token="hf_x")
    assert store.push(root / "warp" / "final_slerp", root / "warp" / "merge.json")
    commits = [c["added"] for c in hub.commits("me/warp-imdb")[1:]]  # after the repo's initial commit
    assert commits == [
        ["warp/final_slerp/config.json", "warp/final_slerp/model.safetensors", "warp/merge.json"]
    ]
    assert store.log[-1]["bytes"] == 100 + 2 + 2 and len(store.log) == 1
    folder = storage.Store(str(tmp_path / "drive"), root)
    folder.push(root / "warp" / "merge.json")
    ledger = [json.loads(line) for line in (tmp_path / "drive" / storage.LEDGER).read_text().splitlines()]
    assert [e["added"] for e in ledger] == [["warp/merge.json"]]  # a folder store keeps a ledger


def test_progress_is_stored_only_after_the_time_without_a_stored_state(tmp_path):
    root = tmp_path / "ck"
    (root / "run").mkdir(parents=True)
    (root / "run" / "progress.pt").write_bytes(b"p")
    store = storage.Store(str(tmp_path / "drive"), root, progress_minutes=30)
    assert not store.push_progress(root / "run" / "progress.pt", since=time.time() - 29 * 60)
    assert not (tmp_path / "drive" / "run" / "progress.pt").exists()
    assert store.push_progress(root / "run" / "progress.pt", since=time.time() - 31 * 60)
    assert (tmp_path / "drive" / "run" / "progress.pt").read_bytes() == b"p"
    assert not storage.Store("", root, progress_minutes=0).push_progress(root / "run" / "progress.pt", 0.0)


def test_01_says_stored_only_for_what_the_store_confirmed(tmp_path):
    """01's last cell, run with a store whose push fails (it returns False, as `Store.push` does after a
    warning), says the model is NOT in the store; with a push that succeeds, that it is stored."""
    import checkpoints
    import config
    from tests.notebook import ROOT

    cells = json.loads((ROOT / "01_reward_model.ipynb").read_text())["cells"]
    code = next("".join(c["source"]) for c in cells if "stored = not stopped_early" in "".join(c["source"]))

    class FakeStore:
        location, log = "me/warp-imdb", []

        def __init__(self, ok):
            self.ok = ok

        def __bool__(self):
            return True

        def push(self, *paths, delete=()):
            return self.ok

        def squash(self):
            pass

        def summary(self):
            return "summary"

    for ok, said in ((False, "NOT in the store me/warp-imdb"), (True, "is stored in me/warp-imdb")):
        scope = dict(train_now=False, stopped_early=False, out=tmp_path / "reward_model", store=FakeStore(ok))
        scope.update(storage=storage, config=config, checkpoints=checkpoints, CHECKPOINTS=str(tmp_path))
        with redirect_stdout(io.StringIO()) as printed:
            exec(compile(code, "01-last-cell", "exec"), scope)
        assert said in printed.getvalue()
        assert ("is stored in" in printed.getvalue()) == ok


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["warp-imdb", "./store"])
def test_a_notebook_refuses_a_bad_store_before_any_training(tmp_path, bad):
    """01 with a STORE that is neither owner/name nor an absolute folder stops in its config cell, with the
    fix, before any model loads: no progress, no reward model, nothing in the folder it names."""
    import papermill

    from tests import tiny
    from tests.notebook import run_notebook

    overrides = {
        "reward_base": tiny.save_tiny_reward(tmp_path / "rm", arch="distilbert"),
        "data": tiny.save_tiny_reviews(tmp_path / "data"),
        **dict(epochs=1, batch_size=4, batches_per_epoch=2, val_pairs=8, eval_batch_size=8, max_length=64),
    }
    with pytest.raises(papermill.PapermillExecutionError, match=r"STORE='.*'.*(owner/name|absolute folder)"):
        run_notebook(
            "01_reward_model", tmp_path, PRESET="imdb", CHECKPOINTS="ck", OVERRIDES=overrides, STORE=bad
        )
    assert not (tmp_path / "ck").exists() and not (tmp_path / bad).exists()
