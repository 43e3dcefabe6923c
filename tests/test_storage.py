"""The store that joins the notebooks' sessions: STORE checked before any work (owner/name, URLs, folders,
the platform's default), write access tested once, earlier notebooks' outputs found on Kaggle, one commit
per push, progress stored only by the time rule, and "stored" said only for what the store confirmed."""

from __future__ import annotations

import io
import json
import time
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest

import handoff
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

    fake_handoff = SimpleNamespace(
        check=lambda store, *args: (store.ok, "handoff"), flush_drive=lambda *a: None
    )
    for ok, said in ((False, "NOT in the store me/warp-imdb"), (True, "is stored in me/warp-imdb")):
        scope = dict(train_now=False, stopped_early=False, out=tmp_path / "reward_model", store=FakeStore(ok))
        scope.update(progress_dir=tmp_path / "reward_model_progress")
        scope.update(handoff=fake_handoff, config=config, checkpoints=checkpoints, CHECKPOINTS=str(tmp_path))
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


def test_01_stores_the_model_with_its_progress_deleted_in_one_commit_and_a_rerun_only_pushes(tmp_path):
    """01's save cell after training, with a store whose push fails: one push, the model with the deletion
    of its stored progress (the store holds one or the other, never neither); rerun as it says, with the
    push now going through, the cell pushes again without saving again (the model in memory is then the
    reloaded plain one, which has no LoRA to merge)."""
    import shutil

    import torch

    import checkpoints
    import config
    from tests.notebook import ROOT

    cells = json.loads((ROOT / "01_reward_model.ipynb").read_text())["cells"]
    code = next("".join(c["source"]) for c in cells if "stored = not stopped_early" in "".join(c["source"]))

    class FakeStore:
        location, ok, calls = "me/warp-imdb", False, []

        def __bool__(self):
            return True

        def push(self, *paths, delete=()):
            self.calls.append(("push", paths, list(delete)))
            return self.ok

        def delete(self, *paths):
            self.calls.append(("delete", paths))

        def squash(self):
            pass

        def summary(self):
            return "summary"

    def save_pretrained(model, tokenizer, path, extra=None):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "config.json").write_text("{}")

    class Trained:  # a LoRA model: merged once, when saved
        def merge_and_unload(self):
            return SimpleNamespace(eval=lambda: "merged")

    out, progress = tmp_path / "ck" / "reward_model", tmp_path / "ck" / "reward_model_progress"
    progress.mkdir(parents=True)
    (progress / "progress.pt").write_bytes(b"p")
    metrics = dict(pairwise_accuracy=0.9, reward_gap=1.0, mean_reward_positive=0.5, mean_reward_negative=-0.5)
    fake_utils = SimpleNamespace(
        load_reward_model=lambda path: (SimpleNamespace(to=lambda device: None), "tokenizer"),
        model_device=lambda model: "cpu",
        score_texts=lambda *args: torch.zeros(2),
    )
    fake_checkpoints = SimpleNamespace(
        save_pretrained_atomic=save_pretrained, atomic_write_text=checkpoints.atomic_write_text,
        write_model_card=lambda *args: None, disk_report=lambda root: "disk",
    )  # fmt: skip
    cfg = SimpleNamespace(mode="lora", eval_batch_size=2, batch_size=2, val_pairs=1, reward_base="b",
                          data="d", save=lambda path: Path(path).write_text("{}"), to_dict=dict)  # fmt: skip
    store = FakeStore()
    fake_handoff = SimpleNamespace(
        check=lambda store, *args: (store.ok, "handoff"), flush_drive=lambda *a: None
    )
    scope = dict(
        train_now=True, stopped_early=False, out=out, progress_dir=progress, store=store, model=Trained(),
        cfg=cfg, preset="imdb", tokenizer="tokenizer", utils=fake_utils, checkpoints=fake_checkpoints,
        val_pos=["a"], val_neg=["b"], max_length=8, validate=lambda model: (metrics, [], []), epochs_done=1,
        train_seconds=1.0, val_seconds=0.1, history=[{"pairs": 4}], torch=torch, resumed_from=None,
        accelerator=SimpleNamespace(device="cpu", mixed_precision="no"), model_info={}, json=json,
        shutil=shutil, config=config, CHECKPOINTS=str(tmp_path / "ck"),
        handoff=fake_handoff,
    )  # fmt: skip
    with redirect_stdout(io.StringIO()) as printed:
        exec(compile(code, "01-save-cell", "exec"), scope)
    assert "NOT in the store me/warp-imdb" in printed.getvalue() and "rerun this cell" in printed.getvalue()
    assert store.calls == [("push", (out,), [progress])], "one commit: the model, and its progress deleted"
    assert (out / "metrics.json").exists()

    store.ok = True  # the Hub answers again: the user reruns the cell
    with redirect_stdout(io.StringIO()) as printed:
        exec(compile(code, "01-save-cell-again", "exec"), scope)
    assert "is stored in me/warp-imdb" in printed.getvalue()
    assert store.calls[1:] == [("push", (out,), [progress])]


def test_a_secrets_token_is_put_in_the_environment_for_the_models_downloads(monkeypatch):
    """On Kaggle the token is a secret, not an environment variable: `hf_token` exports it as HF_TOKEN so
    that from_pretrained's downloads use it (else they go anonymous)."""
    import os
    import sys
    import types

    secrets = types.ModuleType("kaggle_secrets")
    secrets.UserSecretsClient = lambda: types.SimpleNamespace(
        get_secret={"HF_TOKEN": "hf_secret"}.__getitem__
    )
    monkeypatch.setitem(sys.modules, "kaggle_secrets", secrets)
    monkeypatch.setenv("HF_TOKEN", "")
    assert storage.hf_token() == "hf_secret" and os.environ["HF_TOKEN"] == "hf_secret"


def test_a_repo_name_without_its_owner_gets_the_hint_even_beside_a_clone_of_that_name(
    me, tmp_path, monkeypatch
):
    """STORE = "warp-imdb" typed in a folder that holds a `warp-imdb/` clone is the repo's name without its
    owner, not a relative folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "warp-imdb").mkdir()
    with pytest.raises(ValueError, match=r"not a Hub repo id \(owner/name\): did you mean 'me/warp-imdb'\?"):
        storage.resolve_store("warp-imdb", me, "kaggle")


def series_files(root: Path, iterations: int = 2) -> None:
    """What 01 and 02 leave in the checkpoints folder, small: the reward model, 02's settings, its final
    policies, REINFORCE's snapshots and metrics, its merges."""
    made = ["reward_model/model.safetensors", "reward_model/metrics.json", "warp/reinforce/metrics.json"]
    made += [
        f"warp/{name}/model.safetensors" for name in ("final_slerp", "final_liti", "reinforce/step00002")
    ]
    for rel in made + [f"warp/iter{i}/merge.json" for i in range(iterations)]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    settings = {"iterations": iterations, "train_reinforce_baseline": True}
    (root / "warp" / "config.json").write_text(json.dumps(settings))


def test_handoff_asks_the_store_pushes_what_is_here_and_names_what_is_missing(tmp_path):
    """At 02's end, with a folder store: a card written after the policies were stored is pushed by the
    check itself; a merge that is neither here nor in the store is named, with what makes it; the items the
    store holds are not; 01's end asks only for 01's model. Without a store: the no-store path."""
    root, folder = tmp_path / "ck", tmp_path / "drive"
    series_files(root)
    store = storage.Store(str(folder), root)
    assert store.push(root / "reward_model", root / "warp")
    (root / "warp" / "final_slerp" / "README.md").write_text("card")  # written after the push
    (root / "warp" / "iter1" / "merge.json").unlink()
    (folder / "warp" / "iter1" / "merge.json").unlink()  # in neither: 04's angles

    complete, said = handoff.check(store, "02_warp_training", "colab")
    assert not complete and (folder / "warp" / "final_slerp" / "README.md").read_text() == "card"
    assert said.startswith(f"NOT all that 03 and 04 need is in the store {folder}; missing:")
    missing = said.splitlines()[1:]
    assert missing == [
        "  warp/iter1/merge.json (02's last merge (its angles, in 04's table)): it is not on this disk "
        "either: rerun this notebook with this STORE, which makes it again"
    ]
    assert handoff.check(store, "01_reward_model", "colab") == (
        True, f"all that 02, 03 and 04 need is in the store {folder}: reward_model"
    )  # fmt: skip
    (root / "warp" / "iter1" / "merge.json").write_text("{}")  # back here: the check pushes it
    (root / "eval").mkdir()
    (root / "eval" / "results.csv").write_text("score")  # 03's own results, not pushed yet
    complete, said = handoff.check(store, "03_generation_eval", "colab", own=[root / "eval"])
    assert complete and said.startswith(f"all that 04 needs is in the store {folder}: reward_model, ")
    assert "warp/iter1/merge.json" in said and "warp/reinforce" not in said  # 04 takes no REINFORCE
    assert (folder / "eval" / "results.csv").exists()
    (folder / "reward_model" / "metrics.json").unlink()  # the store lost part of the model
    assert handoff.check(store, "02_warp_training", "local")[0]
    assert (folder / "reward_model" / "metrics.json").exists()  # pushed again from here
    nothing = storage.Store("", root)
    assert handoff.check(nothing, "01_reward_model", "kaggle") == (
        False, "no store: what 02, 03 and 04 need is on this disk only. " + storage.no_store_hint("kaggle")
    )  # fmt: skip


def test_handoff_after_a_push_the_hub_refused_says_to_rerun_the_cell(tmp_path, monkeypatch):
    """01's push of its model fails through every retry (503): the check retries it, fails, names the
    model and says to rerun the cell; once the Hub answers, the rerun's check pushes it and says so."""
    import store_backends

    hub = StandInHub(tmp_path / "hub").install(monkeypatch)
    root = tmp_path / "ck"
    series_files(root)
    store = storage.Store("me/warp-imdb", root, token="hf_x")
    hub.fail("create_commit", status=503, times=2 * store_backends.BACKOFF.tries)
    with pytest.warns(UserWarning, match="could not push"):
        assert not store.push(root / "reward_model")
    with pytest.warns(UserWarning, match="could not push"):
        complete, said = handoff.check(store, "01_reward_model", "kaggle")
    assert not complete and said.splitlines()[1:] == [
        "  reward_model (01's reward model): its push failed (the warning above says why): rerun this cell, "
        "it pushes them from here"
    ]
    hub.clear_faults()
    complete, said = handoff.check(store, "01_reward_model", "kaggle")
    assert complete and said == "all that 02, 03 and 04 need is in the store me/warp-imdb: reward_model"
    assert {"reward_model/model.safetensors", "reward_model/metrics.json"} <= set(hub.files("me/warp-imdb"))


def last_cell(notebook: str) -> str:
    """The code of `notebook`'s last cell that pushes to the store (its save cell)."""
    from tests.notebook import ROOT

    cells = json.loads((ROOT / f"{notebook}.ipynb").read_text())["cells"]
    return [src for c in cells if "store.push(" in (src := "".join(c["source"]))][-1]


@pytest.mark.parametrize("notebook", ["03_generation_eval", "04_mu_sweep"])
def test_03_and_04_say_stored_only_once_the_hub_took_their_records(tmp_path, monkeypatch, notebook):
    """03's and 04's save cells, run as they are on a Hub store whose commits fail through every retry
    (503): neither says its records are stored, and the end-of-notebook check names them with "rerun this
    cell"; rerun once the Hub answers, the cell says so and the store holds every record, byte for byte."""
    import pandas as pd

    import checkpoints
    import config
    import store_backends

    hub = StandInHub(tmp_path / "hub").install(monkeypatch)
    root = tmp_path / "ck"
    series_files(root)
    (root / "warp" / "timing.json").write_text("{}")
    store = storage.Store("me/warp-imdb", root, token="hf_x")
    assert store.push(root / "reward_model", root / "warp")  # 01's and 02's results, stored before
    scope = dict(store=store, checkpoints=checkpoints, config=config, handoff=handoff, preset="offline")
    scope.update(CHECKPOINTS=str(root), Path=Path, results={"SFT": {"score": 0.1}})
    if notebook == "03_generation_eval":
        out = root / "eval"
        records = ["results.csv", "pareto.csv", "paired.csv", "samples.csv", "headline.json"]
        scope.update(out=out, front=[], paired=pd.DataFrame({"a": [1]}), reference_source="", limit=None)
    else:
        out = root / "mu_sweep"
        records = ["mu_sweep.csv", "mu_sweep.png", "headline.json"]
        warp_run = SimpleNamespace(out_dir=str(root / "warp"), iterations=2)
        scope.update(root=out, MUS=[0.01], configs={0.01: warp_run})
    out.mkdir()
    for name in records[:-1]:
        (out / name).write_text(name)
    code = compile(last_cell(notebook), f"{notebook}-save-cell", "exec")
    hub.fail("create_commit", status=503, times=2 * store_backends.BACKOFF.tries)
    with pytest.warns(UserWarning, match="could not push"), redirect_stdout(io.StringIO()) as printed:
        exec(code, dict(scope))
    assert "stored in me/warp-imdb" not in printed.getvalue()
    assert "NOT all that" in printed.getvalue() and "rerun this cell" in printed.getvalue()
    assert not any(f.startswith(out.name + "/") for f in hub.files("me/warp-imdb"))
    hub.clear_faults()
    with redirect_stdout(io.StringIO()) as printed:
        exec(code, dict(scope))
    assert "stored in me/warp-imdb" in printed.getvalue() and "NOT all" not in printed.getvalue()
    held = hub.files("me/warp-imdb")
    assert all(held[f"{out.name}/{name}"] == (out / name).read_bytes() for name in records)


def test_a_carried_push_deletes_here_what_the_failed_push_was_to_discard(tmp_path, monkeypatch):
    """A run's end: the push of its final state that deletes its progress fails, so its progress and the
    one before stay here (the store may hold only an older state). The next push carries it; once that is
    confirmed the progress files go from this disk too, except one written since the failure."""
    import os

    import store_backends

    hub = StandInHub(tmp_path / "hub").install(monkeypatch)
    root = tmp_path / "ck"
    for name in ("final", "metrics", "progress.pt", "progress.prev.pt", "other/progress.pt"):
        (root / "run" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "run" / name).write_bytes(b"x")
    store = storage.Store("me/warp", root, token="hf_x")
    hub.fail("create_commit", status=503, times=2 * store_backends.BACKOFF.tries)
    with pytest.warns(UserWarning, match="could not push"):
        assert not store.push(root / "run" / "final", delete=[root / "run" / "progress.pt"])
    with pytest.warns(UserWarning, match="could not push"):
        assert not store.push(root / "run" / "metrics", delete=[root / "run" / "other" / "progress.pt"])
    assert (root / "run" / "progress.pt").exists() and (root / "run" / "progress.prev.pt").exists()
    later = time.time() + 60  # the other progress was written again after its push failed
    os.utime(root / "run" / "other" / "progress.pt", (later, later))
    hub.clear_faults()
    assert store.push() and set(hub.files("me/warp")) >= {"run/final", "run/metrics"}
    assert not (root / "run" / "progress.pt").exists() and not (root / "run" / "progress.prev.pt").exists()
    assert (root / "run" / "other" / "progress.pt").exists() and (root / "run" / "final").exists()


def test_flush_drive_waits_for_drive_only_on_colab_with_a_drive_store_once_all_is_stored(
    tmp_path, monkeypatch
):
    """Colab's Drive uploads after the cell returns: the last cell flushes it (which unmounts it) only on
    Colab, only with the store on Drive, and only once all is stored (a rerun would write to it); else it
    says to."""
    import sys
    import types

    flushed = []
    colab = types.ModuleType("google.colab")
    colab.drive = SimpleNamespace(flush_and_unmount=lambda: flushed.append(1))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setattr(storage, "DRIVE", tmp_path / "drive")
    on_drive = storage.Store(str(tmp_path / "drive" / "MyDrive" / "store"), tmp_path / "ck")
    elsewhere = storage.Store(str(tmp_path / "store"), tmp_path / "ck")
    assert handoff.flush_drive(on_drive, "kaggle", True) is None and flushed == []
    assert handoff.flush_drive(elsewhere, "colab", True) is None and flushed == []
    assert handoff.flush_drive(storage.Store("", tmp_path / "ck"), "colab", True) is None
    said = handoff.flush_drive(on_drive, "colab", False)
    assert "NOT flushed" in said and "drive.flush_and_unmount()" in said and flushed == []
    assert handoff.flush_drive(on_drive, "colab", True).startswith("Drive flushed") and flushed == [1]


class PullsOnly:
    """A store that records what a notebook's config cell pulls, relative to the checkpoints root."""

    location = "me/warp-imdb"

    def __init__(self, root: Path):
        self.root, self.pulled = root, []

    def __bool__(self):
        return True

    def pull(self, *paths):
        self.pulled += [Path(p).relative_to(self.root).as_posix() for p in paths]


@pytest.mark.parametrize("notebook", ["02_warp_training", "03_generation_eval", "04_mu_sweep"])
def test_what_handoff_checks_is_what_the_next_notebooks_config_cell_pulls(notebook, tmp_path, monkeypatch):
    """`handoff.TAKES` lists what each notebook pulls from the store: its config cell, run with a store
    that records the pulls (no model loads), pulls those paths and no others (04 with 02's settings
    recorded, so that it pulls 02's run of the mu to reuse it)."""
    import checkpoints
    import config
    import runs
    from tests.notebook import ROOT

    cells = json.loads((ROOT / f"{notebook}.ipynb").read_text())["cells"]
    code = next("".join(c["source"]) for c in cells if "storage.open_store(" in "".join(c["source"]))
    root = tmp_path / "ck"
    store = PullsOnly(root)
    monkeypatch.setattr(storage, "open_store", lambda *args: store)
    monkeypatch.setattr(checkpoints, "resolve_checkpoint", lambda source, **k: str(tmp_path / "warp"))
    monkeypatch.setattr(config, "check_fits_models", lambda *args: None)
    monkeypatch.setattr(runs, "claim_out_dir", lambda *args, **k: None)
    parameters = dict(PRESET="imdb", CHECKPOINTS=str(root), STORE="", token=None, OVERRIDES={}, MUS=[0.01])
    parameters.update(WARP="", REWARD_MODEL="", REFERENCE_LM="", EVAL_OVERRIDES={})
    imports = "import json, dataclasses, config, storage, checkpoints, evaluation, runs, pandas as pd"
    scope = {}
    exec(compile(imports + "\nfrom pathlib import Path", "imports", "exec"), scope)
    scope.update(parameters)
    for again in (False, True):
        if again:  # 04 again, with 02's settings those of its mu
            (root / "warp").mkdir(parents=True)
            (root / "warp" / "config.json").write_text(checkpoints.to_json(scope["configs"][0.01].to_dict()))
            store.pulled = []
        exec(compile(code, f"{notebook}: config", "exec"), scope)
        if notebook != "04_mu_sweep":
            break
    cfg = scope.get("configs", {0.01: None})[0.01] if notebook == "04_mu_sweep" else None
    last = (cfg.iterations if cfg else 1) - 1
    assert set(store.pulled) == {rel.format(last=last) for rel in handoff.TAKES[notebook]}
