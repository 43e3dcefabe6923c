"""The store against a Hub that behaves like the Hub (`tests/hub_standin.py`): first what the stand-in does
that the store relies on (one commit at a time across processes, 412 on a stale parent, a commit budget,
planned faults, a history that keeps deleted bytes until a squash), then the store on it: retries with a
bounded backoff, deletions from a fresh listing, the repo created once per session, an outage told from a
bad token, a failed push remembered and carried by the next, and the commits of spawned processes counted.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete
from huggingface_hub.errors import (
    HfHubHTTPError,
    HTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
)

import storage
import store_backends
from tests.hub_standin import StandInHub

ROOT = Path(__file__).resolve().parents[1]


def add(path: str, data: bytes = b"x") -> CommitOperationAdd:
    return CommitOperationAdd(path_in_repo=path, path_or_fileobj=data)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A stand-in Hub, installed (huggingface_hub.HfApi is its client), whose store retries do not wait."""
    sleeps = []
    hub = StandInHub(tmp_path / "hub").install(monkeypatch, sleeps)
    hub.sleeps = sleeps
    return hub


# ------------------------------------------------------------------------------------------------------
# The stand-in behaves like the Hub
# ------------------------------------------------------------------------------------------------------

SLOW_COMMIT = """
import sys
sys.path.insert(0, {root!r})
from huggingface_hub import CommitOperationAdd
from tests.hub_standin import StandInHub
hub = StandInHub({folder!r})
hub.fail("create_commit", hold=2.0)
hub.api("hf_x").create_commit("me/r", [CommitOperationAdd(path_in_repo="slow", path_or_fileobj=b"s")],
                              commit_message="slow")
"""


def test_one_commit_at_a_time_per_repo_across_processes(tmp_path):
    """A commit made while another process's commit holds the repo gets 409 (the real HfHubHTTPError);
    once that one ends, commits go through again."""
    hub = StandInHub(tmp_path / "hub")
    hub.api("hf_x").create_repo("me/r", private=True)
    other = subprocess.Popen(
        [sys.executable, "-c", SLOW_COMMIT.format(root=str(ROOT), folder=str(hub.folder))]
    )
    lock = hub.folder / "locks" / "me__r.lock"
    deadline = time.time() + 60
    while not lock.exists() and time.time() < deadline:
        time.sleep(0.01)
    assert lock.exists(), "the other process never started its commit"
    with pytest.raises(HfHubHTTPError, match="another commit operation is in progress") as busy:
        hub.api("hf_x").create_commit("me/r", [add("mine")], commit_message="mine")
    assert busy.value.response.status_code == 409
    assert other.wait(timeout=60) == 0
    hub.api("hf_x").create_commit("me/r", [add("mine")], commit_message="mine")
    assert set(hub.files("me/r")) == {"slow", "mine"}


def test_the_hubs_refusals_are_its_real_exceptions(tmp_path):
    hub = StandInHub(tmp_path / "hub")
    api = hub.api("hf_x")
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info("me/r")
    api.create_repo("me/r", private=True)
    head = api.repo_info("me/r").sha
    api.create_commit("me/r", [add("a")], commit_message="a")
    with pytest.raises(HfHubHTTPError) as stale:  # the repo moved on since `head` was listed
        api.create_commit(
            "me/r", [CommitOperationDelete(path_in_repo="a")], commit_message="d", parent_commit=head
        )
    assert stale.value.response.status_code == 412 and "a" in hub.files("me/r")
    with pytest.raises(RemoteEntryNotFoundError):  # deleting what is not there
        api.create_commit("me/r", [CommitOperationDelete(path_in_repo="gone")], commit_message="d")
    with pytest.raises(HfHubHTTPError) as read_only:
        hub.api("hf_read_only").create_commit("me/r", [add("b")], commit_message="b")
    assert read_only.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as bad:
        hub.api("hf_bad").whoami()
    assert bad.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):  # a private repo is not found by someone else
        hub.api("hf_other").repo_info("me/r")


def test_the_commit_budget_and_planned_faults(tmp_path):
    hub = StandInHub(tmp_path / "hub", commits_per_hour=3)
    api = hub.api("hf_x")
    api.create_repo("me/r", private=True)
    hub.fail("create_commit", nth=2, status=503)
    api.create_commit("me/r", [add("1")], commit_message="1")
    with pytest.raises(HfHubHTTPError) as outage:  # the 2nd from when it was planned
        api.create_commit("me/r", [add("2")], commit_message="2")
    assert outage.value.response.status_code == 503
    api.create_commit("me/r", [add("2")], commit_message="2")
    hub.fail("repo_info", timeout=True)
    with pytest.raises(HTTPError) as timeout:  # the HTTP library's own timeout, with no response
        api.repo_info("me/r")
    assert "Timeout" in type(timeout.value).__name__ and store_backends.status(timeout.value) is None
    api.create_commit("me/r", [add("3")], commit_message="3")
    with pytest.raises(HfHubHTTPError) as limited:  # the 4th commit within the hour
        api.create_commit("me/r", [add("4")], commit_message="4")
    assert limited.value.response.status_code == 429


KILLED_AFTER_ITS_COMMIT = """
import sys
sys.path.insert(0, {root!r})
from huggingface_hub import CommitOperationAdd
from tests.hub_standin import StandInHub
api = StandInHub({folder!r}).api("hf_x")
for name in ("a", "b", "c"):
    api.create_commit("me/r", [CommitOperationAdd(path_in_repo=name, path_or_fileobj=b"x")],
                      commit_message=name)
    print("answered", name, flush=True)
"""


def test_faults_by_message_an_overlap_that_does_not_depend_on_timing_and_a_kill(tmp_path):
    """`match` numbers only the commits that name a file; `overlap` holds the lock until another commit
    met it (409, journaled in `refusals`); `kill` ends the process with its commit in and unanswered."""
    hub = StandInHub(tmp_path / "hub")
    api = hub.api("hf_x")
    api.create_repo("me/r", private=True)
    hub.fail("create_commit", nth=2, status=503, match="init")
    for name in ("run0/final", "iter1/init", "run1/final"):  # the 1st commit naming "init": no fault
        api.create_commit("me/r", [add(name)], commit_message=f"store {name}")
    with pytest.raises(HfHubHTTPError):
        api.create_commit("me/r", [add("iter2/init")], commit_message="store iter2/init")
    assert [r["status"] for r in hub.refusals()] == [503]

    hub.fail("create_commit", hold=60, overlap=True)
    code = SLOW_COMMIT.replace('hub.fail("create_commit", hold=2.0)', "")  # the overlap's hold instead
    other = subprocess.Popen([sys.executable, "-c", code.format(root=str(ROOT), folder=str(hub.folder))])
    lock, start = hub.folder / "locks" / "me__r.lock", time.time()
    while not lock.exists() and time.time() < start + 60:
        time.sleep(0.01)
    with pytest.raises(HfHubHTTPError):  # the other process holds the lock until this one met it
        api.create_commit("me/r", [add("mine")], commit_message="mine")
    assert other.wait(timeout=60) == 0 and time.time() - start < 30, "the hold ended at the overlap"
    assert [r["status"] for r in hub.refusals()] == [503, 409] and "slow" in hub.files("me/r")

    hub.fail("create_commit", nth=2, kill=True)
    code = KILLED_AFTER_ITS_COMMIT.format(root=str(ROOT), folder=str(hub.folder))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == -9 and done.stdout.split("\n")[:-1] == ["answered a"]
    assert {"a", "b"} <= set(hub.files("me/r")) and "c" not in hub.files("me/r"), "b is in, unanswered"


def test_a_listing_is_the_repo_when_listed_and_history_keeps_deleted_bytes_until_a_squash(tmp_path):
    hub = StandInHub(tmp_path / "hub")
    api, other = hub.api("hf_x"), hub.api("hf_x")
    api.create_repo("me/r", private=True)
    api.create_commit("me/r", [add("big", b"b" * 1000), add("small", b"s")], commit_message="1")
    listed = api.list_repo_files("me/r")
    other.create_commit("me/r", [add("new", b"n")], commit_message="2")
    assert listed == ["big", "small"] and api.list_repo_files("me/r") == ["big", "new", "small"]
    assert {s.rfilename: s.size for s in api.repo_info("me/r", files_metadata=True).siblings}["big"] == 1000
    api.create_commit("me/r", [CommitOperationDelete(path_in_repo="big")], commit_message="3")
    assert hub.used_storage("me/r") == 1002 and api.repo_info("me/r").used_storage == 1002
    api.super_squash_history("me/r")
    assert hub.used_storage("me/r") == 2 and len(hub.commits("me/r")) == 1
    assert set(hub.files("me/r")) == {"small", "new"}


# ------------------------------------------------------------------------------------------------------
# The store on it
# ------------------------------------------------------------------------------------------------------


def files_under(tmp_path: Path, **files: bytes) -> Path:
    root = tmp_path / "ck"
    for name, data in files.items():
        (root / name.replace("__", "/")).parent.mkdir(parents=True, exist_ok=True)
        (root / name.replace("__", "/")).write_bytes(data)
    return root


def test_a_push_retries_what_passes_with_a_bounded_backoff(hub, tmp_path):
    """409, 503 and a timeout in a row: the push goes through on the 4th try, after 3 waits that double
    (with jitter); 401 is not retried; an outage that lasts ends the push after `tries` attempts and a
    bounded wait, with a warning that names what is not stored."""
    root = files_under(tmp_path, a=b"a", b=b"b", c=b"c")
    store = storage.Store("me/warp", root, token="hf_x")
    hub.fail("create_commit", status=409)
    hub.fail("create_commit", nth=2, status=503)
    hub.fail("create_commit", nth=3, timeout=True)
    assert store.push(root / "a")
    assert hub.files("me/warp") == {"a": b"a"}
    first = store_backends.BACKOFF.first
    assert [first * 2**k / 2 <= w <= first * 2**k for k, w in enumerate(hub.sleeps)] == [True] * 3
    hub.sleeps.clear()
    hub.fail("create_commit", status=503, times=100)
    before = len(hub.calls("create_commit"))
    with pytest.warns(
        UserWarning, match=r"could not push \S*ck/b to me/warp .*did not answer.*retry later.*Not stored: b"
    ):
        assert not store.push(root / "b")
    tries = len(hub.calls("create_commit")) - before
    assert 1 < tries <= store_backends.BACKOFF.tries and sum(hub.sleeps) <= store_backends.BACKOFF.total
    calls = len(hub.calls())
    with pytest.warns(UserWarning, match=r"refused the HF_TOKEN \(403\): it must be a write token"):
        assert not storage.Store("me/warp", root, token="hf_read_only").push(root / "c")
    assert [c["call"] for c in hub.calls()[calls:]] == ["repo_info", "create_repo"], "403: not retried"


def test_deletions_come_from_a_fresh_listing_not_a_stale_one(hub, tmp_path):
    """The bug of two processes: the notebook's Store listed the repo before its training processes
    committed their runs' finals; its `keep(..., then_discard=finals)` must still delete them."""
    root = files_under(tmp_path, warp__merge__json=b"{}", warp__run0__final=b"f")
    parent = storage.Store("me/warp", root, token="hf_x")
    parent.pull(root / "warp" / "missing.json")  # lists the repo (empty) and keeps the listing
    child = pickle.loads(pickle.dumps(parent))  # a spawned process gets the Store pickled
    assert child.push(root / "warp" / "run0" / "final")
    assert "warp/run0/final" in hub.files("me/warp")
    assert parent.push(root / "warp" / "merge" / "json", delete=[root / "warp" / "run0" / "final"])
    assert set(hub.files("me/warp")) == {"warp/merge/json"}, "the child's final was never deleted"


def test_a_commit_made_between_listing_and_deleting_is_not_overlooked(hub, tmp_path, monkeypatch):
    """Another process commits right after this one listed the repo for its deletions: the commit names the
    listed head as its parent, gets 412, lists again and deletes what is there now."""
    root = files_under(tmp_path, run__a=b"a", run__b=b"b", next=b"n")
    store, other = storage.Store("me/warp", root, token="hf_x"), storage.Store("me/warp", root, token="hf_x")
    assert store.push(root / "run" / "a")
    real = type(store.backend._client()).repo_info
    calls = []

    def list_then_other_commits(self, *args, **kwargs):
        info = real(self, *args, **kwargs)
        if not calls:
            calls.append(None)
            calls[0] = other.push(root / "run" / "b")  # lands after the listing
        return info

    monkeypatch.setattr(type(store.backend._client()), "repo_info", list_then_other_commits)
    assert store.push(root / "next", delete=[root / "run"])
    assert calls == [True] and set(hub.files("me/warp")) == {"next"}, (
        "run/b, committed meanwhile, is deleted too"
    )
    assert len(hub.sleeps) == 1  # the 412 was retried once


def test_a_file_deleted_since_the_listing_is_skipped_by_a_pull(hub, tmp_path):
    """A pull reads the listing this process made; a file another process deleted since (404 on its
    download) makes it list again, and the pull skips it instead of failing."""
    hub.put("me/warp", {"run/a": b"a", "run/b": b"b"})
    root = tmp_path / "ck"
    store = storage.Store("me/warp", root, token="hf_x")
    store.pull(root / "run" / "a")  # lists the repo: run/a and run/b
    other = storage.Store("me/warp", root, token="hf_x")
    other.delete(root / "run" / "b")
    store.pull(root / "run")  # the folder exists: its missing entries, by the old listing run/b
    assert sorted(p.name for p in (root / "run").iterdir()) == ["a"]


def test_the_repo_is_created_once_per_session(hub, tmp_path):
    root = files_under(tmp_path, a=b"a", b=b"b", c=b"c")
    store = storage.open_store("me/warp", root, "hf_x", "kaggle")  # the write check creates it
    for name in "abc":
        assert store.push(root / name)
    assert pickle.loads(pickle.dumps(store)).push(root / "a")  # a spawned process: same session
    assert len(hub.calls("create_repo")) == 1


@pytest.mark.parametrize(
    "fault, error, message",
    [
        (dict(status=503, times=100), ConnectionError, r"did not answer.*retry later"),
        (dict(timeout=True, times=100), ConnectionError, r"did not answer.*retry later"),
        (dict(status=429, times=100), ConnectionError, r"rate limit"),
        (None, PermissionError, r"cannot create or write the Hub repo.*refused the HF_TOKEN.*write token"),
    ],
)
def test_the_write_check_tells_an_outage_from_a_bad_token(hub, tmp_path, fault, error, message):
    if fault:
        hub.fail("create_repo", **fault)
    token = "hf_x" if fault else "hf_bad"
    with pytest.raises(error, match=message):
        storage.open_store("me/warp", tmp_path, token, "kaggle")


def test_a_listing_that_fails_in_a_push_warns_and_keeps_it_for_later(hub, tmp_path):
    """Today's run end: its final files written here, the push that deletes its progress cannot list the
    repo (an outage): a warning, not an exception; the next push stores them and deletes the progress."""
    root = files_under(tmp_path, run__final=b"f", run__metrics=b"m", run__progress=b"p")
    hub.put("me/warp", {"run/progress": b"p"})
    store = storage.Store("me/warp", root, token="hf_x")
    for call in ("repo_info", "list_repo_files", "list_repo_tree"):
        hub.fail(call, status=503, times=100)
    with pytest.warns(UserWarning, match="could not push"):
        assert not store.push(
            root / "run" / "final", root / "run" / "metrics", delete=[root / "run" / "progress"]
        )
    assert store.unstored() == [root / "run" / "final", root / "run" / "metrics"]
    hub.clear_faults()  # the outage ends
    assert store.push()
    assert set(hub.files("me/warp")) == {"run/final", "run/metrics"} and store.unstored() == []
    assert store.holds(root / "run" / "final") and not store.holds(root / "run" / "progress")


def test_a_failed_push_is_carried_by_the_next_push_of_any_process(hub, tmp_path):
    root = files_under(tmp_path, a=b"a", b=b"b", c=b"c")
    store = storage.Store("me/warp", root, token="hf_x")
    hub.fail("create_commit", status=503, times=store_backends.BACKOFF.tries + 1)
    with pytest.warns(UserWarning, match=r"could not push \S*ck/a to me/warp .*Not stored: a"):
        assert not store.push(root / "a")
    assert not store.holds(root / "a") and store.unstored() == [root / "a"]
    assert "NOT stored yet: a" in store.summary()
    other = pickle.loads(pickle.dumps(store))  # another process of the session (the log is on this disk)
    hub.clear_faults()
    assert other.push(root / "b")
    assert set(hub.files("me/warp")) == {"a", "b"} and hub.commits("me/warp")[-1]["added"] == ["a", "b"]
    assert store.unstored() == [] and store.holds(root / "a")


def push_in_a_child(store: storage.Store, path: Path) -> None:
    assert store.push(path)


def test_commits_of_spawned_processes_count_in_the_log(tmp_path, monkeypatch):
    """Two spawned processes push to one repo while a commit holds it (409 for both, retried until it
    ends); the parent's `log` and `summary` count both commits with its own."""
    hub = StandInHub(tmp_path / "hub").install(monkeypatch)
    root = files_under(tmp_path, run0=b"0" * 10, run1=b"1" * 10, merge=b"m")
    backoff = store_backends.Backoff(tries=8, first=0.2, total=60.0)  # time.sleep: it travels to the children
    store = storage.Store("me/warp", root, token="hf_x", backoff=backoff)
    store.check_writable()
    lock = hub.folder / "locks" / "me__warp.lock"
    lock.write_text(str(os.getpid()))  # a commit in progress, until both children have met it
    ctx = multiprocessing.get_context("spawn")
    children = [ctx.Process(target=push_in_a_child, args=(store, root / f"run{m}")) for m in range(2)]
    for child in children:
        child.start()
    deadline = time.time() + 120
    while len(hub.calls("create_commit")) < 3 and time.time() < deadline:  # the write check's, and theirs
        time.sleep(0.05)
    lock.unlink()
    for child in children:
        child.join(timeout=120)
    assert [child.exitcode for child in children] == [0, 0]
    assert len(hub.calls("create_commit")) >= 5, "each child met the commit in progress and retried"
    assert store.push(root / "merge")
    assert [e["kind"] for e in store.log] == ["check", "commit", "commit", "commit"]
    assert sum(e["bytes"] for e in store.log if e["kind"] == "commit") == 21
    assert "4 commit(s) this session" in store.summary()
    assert {"run0", "run1", "merge"} <= set(hub.files("me/warp"))


@pytest.mark.parametrize(
    "status, said",
    [
        (401, r"refused the HF_TOKEN \(401\): it must be a write token"),
        (403, r"refused the HF_TOKEN \(403\)"),
        (404, r"not there \(404\)"),
        (409, r"busy with other commits \(409\)"),
        (429, r"rate limit \(429"),
        (503, r"did not answer.*retry later"),
    ],
)
def test_a_failure_says_what_it_was(tmp_path, status, said):
    hub = StandInHub(tmp_path / "hub")
    hub.fail("whoami", status=status)
    with pytest.raises(HfHubHTTPError) as error:
        hub.api("hf_x").whoami()
    assert error.value.response.status_code == status
    assert re.search(said, store_backends.describe(error.value))


def test_the_default_store_says_why_the_tokens_user_could_not_be_read(hub):
    with pytest.raises(ValueError, match=r"could not be read .*refused the HF_TOKEN \(401\)"):
        storage.resolve_store("", "hf_bad", "kaggle")
    hub.fail("whoami", timeout=True)
    with pytest.raises(ValueError, match=r"could not be read .*did not answer"):
        storage.resolve_store("", "hf_x", "kaggle")


def test_what_a_commit_deletes_is_not_uploaded_by_it_when_a_failed_push_left_it(hub, tmp_path):
    """A run's final whose push failed is carried by the merge's commit, which also discards it: that
    commit must not upload it (nothing would delete it later: 0.5 GB kept for good at GPT-2's size)."""
    root = files_under(tmp_path, run__final=b"f" * 100, merge=b"m")
    store = storage.Store("me/warp", root, token="hf_x")
    hub.fail("create_commit", status=503, times=store_backends.BACKOFF.tries)
    with pytest.warns(UserWarning, match="could not push"):
        assert not store.push(root / "run" / "final")
    assert store.push(root / "merge", delete=[root / "run" / "final"])
    assert set(hub.files("me/warp")) == {"merge"} and store.unstored() == []
