"""02's M runs in 2 processes on the CPU (`cpu_processes=2`: the `runs.run_parallel` path of Kaggle's T4 x2,
each run in a spawned process of its own that pushes its final state itself) against the Hub stand-in,
with the faults of a busy Hub: two processes' commits overlapping (409), an outage (503) and the rate limit
(429), each retried. The store must end as it does when one process trains the runs one after another."""

from __future__ import annotations

import json
import os

import pytest
import torch

import config
import runs
import storage
import store_backends
import utils
import warp
from tests import tiny
from tests.hub_standin import StandInHub

SETTINGS = dict(
    iterations=2, runs=2, steps=2, batch_size=4, max_new_tokens=4, prompt_tokens=4, save_every=3,
    cpu_threads=1, train_reinforce_baseline=False,
)  # fmt: skip
# what differs between two runs of the same settings: wall times (metrics, timing.json), each run's own
# folder, and the number of processes
CHANGING = {"time/step_seconds", "warp", "reinforce", "out_dir", "cpu_processes"}
README_02_COMMITS = 10  # README: 02 makes 10 commits at the imdb defaults (with REINFORCE and its summary)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny.save_tiny_assets(tmp_path_factory.mktemp("assets"), n_train=40)


def train(assets, ck, repo: str, processes: int) -> storage.Store:
    """02's training cells on a fresh disk: the store checked, WARP's I x M runs in `processes` processes."""
    cfg = config.WarpConfig.for_preset(
        "offline", **assets, out_dir=str(ck / "warp"), cpu_processes=processes, **SETTINGS
    )
    backoff = store_backends.Backoff(tries=8, first=0.05, total=30.0)  # real waits: they reach the children
    store = storage.Store(repo, ck, token="hf_x", backoff=backoff)
    store.check_writable()
    prompts = warp.training_prompts(cfg, utils.load_policy(cfg.sft)[1])[0]
    assert runs.processes_for(cfg) == processes
    warp.warp(cfg, prompts, processes=runs.processes_for(cfg), store=store)
    return store


def without_times(data: bytes):
    """A JSON record without what changes between runs of the same settings (`CHANGING`)."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in CHANGING}
        return [strip(v) for v in value] if isinstance(value, list) else value

    return strip(json.loads(data))


def test_two_processes_store_what_one_does_through_409_503_and_429(assets, tmp_path, monkeypatch):
    """The runs of each iteration train in 2 spawned processes that push their finals while the notebook's
    process merges, with a 409 from their overlapping commits, a 503 on a merge and a 429 on a run's final,
    each retried: (1) the children's commits are in the notebook's `store.log` and `summary`; (2) each
    run's final leaves the store in the commit that stores its iteration's merge; (3) the store ends with
    the files, bytes and size of a one-process run (wall times aside), (4) in as many commits, within
    02's count in README and the stand-in's hourly budget."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # the CPU path even where there are GPUs
    hub = StandInHub(tmp_path / "hub").install(monkeypatch)
    one = train(assets, tmp_path / "one", "me/one", processes=1)
    hub.fail("create_commit", match="final.safetensors", hold=60, overlap=True)  # held until the other's 409
    hub.fail("create_commit", match="iter1/init.safetensors", status=503, times=2)  # the merge's commit
    hub.fail("create_commit", match="iter1/run1/final", status=429)  # a child's commit
    two = train(assets, tmp_path / "two", "me/two", processes=2)

    parent = os.getpid()
    children = {c["pid"] for c in hub.calls("create_commit") if c["pid"] != parent}
    assert len(children) == 4, "each of the 4 runs committed from a process of its own"
    refused = hub.refusals()
    assert {r["pid"] for r in refused if r["status"] == 409} <= children and any(
        r["status"] == 409 for r in refused
    ), "the children's commits overlapped"
    assert [r["status"] for r in refused if r["status"] != 409] == [503, 503, 429]
    assert not [e for e in two._log.entries() if e["kind"] == "failed"], "every fault was retried away"

    # (1) the children's commits are counted where the notebook reads them
    finals = [e for e in two.log if any(f.endswith("final.safetensors") for f in e["added"])]
    history = hub.commits("me/two")  # the repo's first commit (its creation), then the store's
    assert len(finals) == 4 and len(two.log) == len(one.log) == len(history) - 1
    assert f"{len(two.log)} commit(s) this session" in two.summary()
    uploads = lambda store: sorted(f for e in store.log for f in e["added"])
    assert uploads(two) == uploads(one), "each file uploaded as often (a child re-sent the parent's records)"

    # (2) a run's final is deleted by the commit that stores the merge made from it
    for i in range(2):
        merge = next(c for c in history if f"warp/iter{i}/merge.json" in c["added"])
        assert {f"warp/iter{i}/run{m}/final.safetensors" for m in range(2)} <= set(merge["deleted"]), i

    # (3) the same files, the same weights, the same records
    a, b = hub.files("me/one"), hub.files("me/two")
    assert set(a) == set(b) and not [f for f in b if f.endswith("final.safetensors")]
    for f in a:
        if f.endswith(".json"):
            assert without_times(a[f]) == without_times(b[f]), f
        elif f != ".warp-store":  # the write check's note carries the time
            assert a[f] == b[f], f
    timed = [f for f in a if f.endswith(("metrics.json", "timing.json"))]
    other = [f for f in a if f not in timed and f != ".warp-store"]
    assert sum(len(b[f]) for f in other) == sum(len(a[f]) for f in other)

    # (4) no commit more than one process makes, within README's count for 02 and the hourly budget
    two.squash()
    one.squash()
    assert len(two.log) == len(one.log) <= README_02_COMMITS
    assert len(hub.refusals(429)) == 1, "only the planned 429: the budget was never reached"
