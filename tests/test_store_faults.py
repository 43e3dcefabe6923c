"""Nothing is lost when a push fails or the session dies right after one: a push that fails through every
retry (the Hub stand-in's planned 503s), or a process SIGKILLed right after the Hub took its commit (before
it heard back), then the session rerun on a fresh disk (a new Kaggle session, joined to the last only by
the store), ends with the store of an undisturbed session; and no push said "stored" (returned True, which
is what the notebooks print "stored" on) for what the store did not hold.

The sample covers every kind of push 02 makes, on 02's own functions (`warp.warp`, then
`warp.train_reinforce_baseline`) with tiny settings: a run's final (`RunFiles.finish`, in iteration 0 and
in the last), a merge (`Stage.keep` of iteration 0's next start), the final policies (`Stage.end`), a
progress checkpoint (`push_progress`: `store_progress_minutes=0`), REINFORCE's snapshots (one rides with a
progress checkpoint, the last with the run's final). The other kinds are pushes of the same `Store.push`
from notebook cells, tested on those cells' own code in tests/test_storage.py (whole notebook runs for each
fault do not fit CI's budget): 01's model (`test_01_stores_the_model_with_its_progress_deleted_in_one_commit_
and_a_rerun_only_pushes`, `test_handoff_after_a_push_the_hub_refused_says_to_rerun_the_cell`) and 03's and
04's records (`test_03_and_04_say_stored_only_once_the_hub_took_their_records`, on a Hub stand-in that
refuses, then answers). `bench/store_faults.py` sweeps every commit of 02's training.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import config
import storage
import store_backends
import utils
import warp
from tests import tiny
from tests.hub_standin import StandInHub
from tests.test_store_processes import without_times

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = dict(
    iterations=2, runs=2, steps=2, batch_size=4, max_new_tokens=4, prompt_tokens=4, save_every=1,
    cpu_threads=1, baseline_checkpoints=2, store_progress_minutes=0, parallel=False,
)  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny.save_tiny_assets(tmp_path_factory.mktemp("assets"), n_train=40)


def session_02(assets: dict, ck: str | Path, repo: str) -> storage.Store:
    """02's training in one session on the disk `ck`: the store checked, WARP, REINFORCE, the squash."""
    ck = Path(ck)
    cfg = config.WarpConfig.for_preset("offline", **assets, out_dir=str(ck / "warp"), **SETTINGS)
    store = storage.Store(repo, ck, token="hf_x", progress_minutes=0)
    store.check_writable()
    prompts = warp.training_prompts(cfg, utils.load_policy(cfg.sft)[1])[0]
    warp.warp(cfg, prompts, store=store)
    warp.train_reinforce_baseline(cfg, prompts, store)
    store.squash()
    return store


CHILD = """
import json, sys
sys.path.insert(0, {root!r})
from tests.test_store_faults import session_02
session_02(json.loads({assets!r}), {ck!r}, "me/warp")
"""


def same_store(a: dict[str, bytes], b: dict[str, bytes]) -> None:
    """Two stores' files: the same paths, the same bytes (JSON records: wall times and folders aside)."""
    assert set(a) == set(b), set(a) ^ set(b)
    for f in a:
        if f.endswith(".json"):
            assert without_times(a[f]) == without_times(b[f]), f
        elif f != ".warp-store":  # the write check's note carries its time
            assert a[f] == b[f], f


@pytest.fixture(scope="module")
def undisturbed(assets, tmp_path_factory):
    """The store of an undisturbed session (on a stand-in of its own)."""
    work = tmp_path_factory.mktemp("undisturbed")
    hub = StandInHub(work / "hub")
    with pytest.MonkeyPatch.context() as mp:
        hub.install(mp)
        session_02(assets, work / "ck", "me/warp")
    commits = [c for c in hub.commits("me/warp")]
    return hub.files("me/warp"), commits


def honest_pushes(monkeypatch) -> list:
    """Make every push that returns True check, right then, that the store holds each path it was given."""
    real, pushed = storage.Store.push, []

    def push(self, *paths, delete=()):
        stored = real(self, *paths, delete=delete)
        if stored:
            missing = [p for p in paths if Path(p).exists() and not self.holds(p)]
            assert not missing, f"push said stored, the store lacks {missing}"
            pushed.append(paths)
        return stored

    monkeypatch.setattr(storage.Store, "push", push)
    return pushed


# each kind of push, by a file its commit names (the commit message names its first three files)
PUSHES = {
    "a run's final, iteration 0": "iter0/run1/final.safetensors",
    "a run's final, last iteration": "iter1/run0/final.safetensors",
    "a merge (the next start)": "iter1/init.safetensors",
    "the final policies": "final_slerp",
    "a progress checkpoint": "iter1/run1/progress.pt",
    "REINFORCE's snapshot with a progress checkpoint": "reinforce/step00004",
    "REINFORCE's final and last snapshot": "reinforce/metrics.json",
}


@pytest.mark.parametrize("push", list(PUSHES))
def test_a_push_that_fails_loses_nothing(assets, undisturbed, tmp_path, monkeypatch, push):
    """The push fails through every retry: the session goes on (a later push carries what it left, or
    nothing does and the session ends with it unstored); a rerun on a fresh disk ends with the store of an
    undisturbed session, and no push said stored for what the store lacked."""
    hub = StandInHub(tmp_path / "hub").install(monkeypatch)
    pushed = honest_pushes(monkeypatch)
    hub.fail("create_commit", match=PUSHES[push], status=503, times=store_backends.BACKOFF.tries)
    with pytest.warns(UserWarning, match=r"could not push .*did not answer"):
        session_02(assets, tmp_path / "session1", "me/warp")
    assert len(hub.refusals(503)) == store_backends.BACKOFF.tries, "the planned push met every 503"
    hub.clear_faults()
    again = session_02(assets, tmp_path / "session2", "me/warp")  # a new session: nothing local
    same_store(hub.files("me/warp"), undisturbed[0])
    assert pushed and again.unstored() == []


@pytest.mark.parametrize("push", ["a run's final, iteration 0", "a merge (the next start)"])
def test_a_session_killed_right_after_a_commit_loses_nothing(
    assets, undisturbed, tmp_path, monkeypatch, push
):
    """The session is SIGKILLed right after the Hub took the commit, before it heard back (so its own
    record of the commit is lost with it); a rerun on a fresh disk ends with the undisturbed store."""
    hub = StandInHub(tmp_path / "hub")
    hub.fail("create_commit", match=PUSHES[push], kill=True)
    env = {**os.environ, "WARP_STANDIN_HUB": str(hub.folder)}
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT / "tests" / "standin_site"), env.get("PYTHONPATH")])
    )
    code = CHILD.format(root=str(ROOT), assets=json.dumps(assets), ck=str(tmp_path / "session1"))
    child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == -9, child.stderr[-3000:]
    assert any(PUSHES[push] in c["message"] for c in hub.commits("me/warp")), "killed after that commit"
    shutil.rmtree(tmp_path / "session1")
    hub.install(monkeypatch)
    pushed = honest_pushes(monkeypatch)
    session_02(assets, tmp_path / "session2", "me/warp")
    same_store(hub.files("me/warp"), undisturbed[0])
    assert pushed
