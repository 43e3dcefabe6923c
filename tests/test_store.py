"""The checkpoint store: a session killed at a random step inside a run, whose local files are then lost
(a new Kaggle session), resumes from the store, repeats at most `save_every` steps, and ends with the same
weights as an uninterrupted run (bitwise on the CPU)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoints
import config
import runs
import storage
import utils
import warp
from tests import tiny
from tests.hub_standin import StandInHub
from tests.notebook import kill_notebook_when

ROOT = Path(__file__).resolve().parents[1]


def test_store_mirrors_files_and_folders_under_its_root(tmp_path):
    root, where = tmp_path / "ck", tmp_path / "drive"
    store = storage.Store(str(where), root)
    (root / "warp" / "run0").mkdir(parents=True)
    (root / "warp" / "run0" / "final.pt").write_bytes(b"weights")
    (root / "warp" / "config.json").write_text("{}")
    with pytest.warns(UserWarning, match="outside"):
        store.push(root / "warp" / "run0", root / "warp" / "config.json", tmp_path / "elsewhere.txt")
    assert (where / "warp" / "run0" / "final.pt").read_bytes() == b"weights"
    assert not (where / "elsewhere.txt").exists()  # outside the root: not the store's business
    new_root = tmp_path / "new_session"
    fresh = storage.Store(str(where), new_root)
    fresh.pull(new_root / "warp" / "config.json", new_root / "warp" / "missing.pt")
    assert (new_root / "warp" / "config.json").read_text() == "{}"
    assert not (new_root / "warp" / "run0").exists()  # only what was asked for
    fresh.pull(new_root / "warp" / "run0")
    assert (new_root / "warp" / "run0" / "final.pt").read_bytes() == b"weights"
    storage.Store("", root).push(root / "warp")  # no store: nothing happens
    assert "token" not in repr(storage.Store("me/repo", root, token="hf_secret"))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny.save_tiny_assets(tmp_path_factory.mktemp("assets"), n_train=80)


SETTINGS = dict(
    iterations=2, runs=2, steps=12, batch_size=4, max_new_tokens=4, prompt_tokens=4, save_every=3,
    cpu_threads=1, parallel=False,
)  # fmt: skip

CHILD = """
import json, sys
sys.path.insert(0, {root!r})
import checkpoints, config, storage, utils, warp
cfg = config.WarpConfig.for_preset("offline", **json.loads({cfg!r}))
prompts = warp.training_prompts(cfg, utils.load_policy(cfg.sft)[1])[0]
warp.warp(cfg, prompts, store=storage.Store({store!r}, {ck!r}, progress_minutes=0))
"""


def run_warp(assets, ck: Path, store: Path) -> dict[str, Path]:
    cfg = config.WarpConfig.for_preset("offline", **assets, out_dir=str(ck / "warp"), **SETTINGS)
    prompts = warp.training_prompts(cfg, utils.load_policy(cfg.sft)[1])[0]
    return warp.warp(cfg, prompts, store=storage.Store(str(store), ck, progress_minutes=0))


def test_a_dead_session_resumes_from_the_store_bitwise(assets, tmp_path, monkeypatch):
    whole = run_warp(assets, tmp_path / "whole" / "ck", tmp_path / "whole" / "store")
    # what the store holds leaves the local disk once no next step needs it; nothing is kept twice
    local, stored = (
        {
            p.relative_to(tmp_path / "whole" / k / "warp").as_posix()
            for p in (tmp_path / "whole" / k).rglob("*.*")
            if not p.name.startswith(".")  # the folder store's ledger
        }
        for k in ("ck", "store")
    )
    states = {f"iter{i}/run{m}/final.safetensors" for i in range(2) for m in range(2)}
    states |= {"iter0/slerp.safetensors", "iter1/init.safetensors"}
    assert not states & (local | stored), (
        "run finals and merged states: discarded once the next merge is stored"
    )
    duplicates = {"iter0/init.safetensors", "iter1/slerp.safetensors", "iter2/init.safetensors"}
    assert not duplicates & (local | stored), "the SFT, the last SLERP and the last LITI are the finals"
    assert {f"iter{i}/run{m}/metrics.json" for i in range(2) for m in range(2)} <= stored  # for 02's plots
    assert not any("progress" in f for f in local | stored), "progress checkpoints are gone once runs end"
    assert {"final_slerp/model.safetensors", "final_liti/model.safetensors"} <= local & stored

    # session 1: a process killed (SIGKILL) once the store holds a progress checkpoint of a random run
    ck, store = tmp_path / "dead" / "ck", tmp_path / "dead" / "store"
    victim = random.Random().choice([f"iter{i}/run{m}" for i in range(2) for m in range(2)])
    cfg = json.dumps({**assets, "out_dir": str(ck / "warp"), **SETTINGS})
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(root=str(ROOT), cfg=cfg, store=str(store), ck=str(ck))]
    )
    progress = store / "warp" / victim / "progress.pt"
    deadline = time.time() + 300
    while not progress.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert progress.exists(), f"the child never checkpointed {victim}"
    assert not (store / "warp" / victim / "metrics.json").exists(), (
        "killed after the run ended, not inside it"
    )
    stored_step = torch.load(progress, weights_only=True)["step"]

    # session 2: a new machine, nothing local; it resumes from the store
    import shutil

    shutil.rmtree(ck)
    resumed_from = {}
    real = runs.resume_run

    def spy(path, *args):
        step, history = real(path, *args)
        resumed_from[Path(path).parent.relative_to(ck / "warp").as_posix()] = step
        return step, history

    monkeypatch.setattr(runs, "resume_run", spy)
    again = run_warp(assets, ck, store)
    assert resumed_from[victim] >= stored_step >= SETTINGS["save_every"]  # at most save_every steps repeated
    for name in ("slerp", "liti"):
        a = utils.state_of(utils.load_policy(str(whole[name]))[0])
        b = utils.state_of(utils.load_policy(str(again[name]))[0])
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_model_card_names_hub_ids_in_its_metadata_and_local_paths_in_its_text(tmp_path):
    from huggingface_hub import ModelCard

    checkpoints.write_model_card(
        tmp_path, "A title", "What it is.", "lvwerra/gpt2-imdb", "/data/reviews.jsonl", {"beta": 0.1},
        {"score": 1.23456, "steps": 10},
    )  # fmt: skip
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "lvwerra/gpt2-imdb" and card.data.datasets is None
    assert (
        "| score | 1.235 |" in card.text
        and "`/data/reviews.jsonl`" in card.text
        and '"beta": 0.1' in card.text
    )


def test_hub_store_pulls_whole_folders_and_never_mistakes_an_error_for_an_empty_store(tmp_path, monkeypatch):
    files = {"warp/final_slerp/config.json": b"{}", "warp/final_slerp/model.safetensors": b"w", "x/y": b"z"}
    hub = StandInHub(tmp_path / "hub").install(monkeypatch)
    hub.put("me/warp", files)
    store = storage.Store("me/warp", tmp_path, token="hf_x")
    store.pull(tmp_path / "warp" / "final_slerp", tmp_path / "warp" / "missing.pt")
    assert sorted(p.name for p in (tmp_path / "warp" / "final_slerp").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    assert not (tmp_path / "x").exists() and not list(
        tmp_path.glob("warp/.*")
    )  # only what was asked, no leftovers
    store.delete(tmp_path / "warp" / "final_slerp")
    assert list(hub.files("me/warp")) == ["x/y"]

    # a repo not created yet: RepositoryNotFoundError, the real one (404), means empty
    storage.Store("me/new", tmp_path / "fresh", token="hf_x").pull(tmp_path / "fresh" / "warp")  # nothing yet
    for listing in ("repo_info", "list_repo_files"):
        hub.fail(listing, status=429, times=10)  # rate limited through every retry
    with pytest.raises(ConnectionError):  # not "the store is empty": that would retrain and overwrite it
        storage.Store("me/warp", tmp_path / "other", token="hf_x").pull(tmp_path / "other" / "warp")


def test_a_failed_push_warns_and_training_goes_on(tmp_path, monkeypatch):
    import huggingface_hub

    def quota(*a, **k):
        raise RuntimeError("storage quota exceeded")

    monkeypatch.setattr(huggingface_hub, "HfApi", quota)
    (tmp_path / "warp").mkdir()
    (tmp_path / "warp" / "progress.pt").write_bytes(b"p")
    with pytest.warns(
        UserWarning, match=r"could not push .*progress\.pt to me/warp \(RuntimeError: storage quota"
    ):
        storage.Store("me/warp", tmp_path, token="hf_x").push(tmp_path / "warp" / "progress.pt")
    with pytest.warns(UserWarning, match=r"outside .*: not pushed"):
        storage.Store(str(tmp_path / "drive"), tmp_path / "warp").push(tmp_path / "elsewhere")


@pytest.mark.parametrize("kind", ["folder", "hub"])
def test_release_frees_only_what_the_store_holds_and_pull_brings_it_back(tmp_path, monkeypatch, kind):
    """`release` deletes a local copy only when the store has it (never the only copy); pulling into a folder
    that exists fetches the entries it lacks (the released REINFORCE snapshots), each folder whole."""
    root = tmp_path / "ck" / "reinforce"
    for step in ("step00001", "step00002"):
        (root / step).mkdir(parents=True)
        (root / step / "model.safetensors").write_bytes(step.encode())
    (root / "metrics.json").write_text("[]")
    if kind == "hub":
        hub = StandInHub(tmp_path / "hub").install(monkeypatch)
        store = storage.Store("me/warp", tmp_path / "ck", token="hf_x")
        hub.put(
            "me/warp", {f"reinforce/{s}/model.safetensors": s.encode() for s in ("step00001", "step00002")}
        )
    else:
        store = storage.Store(str(tmp_path / "drive"), tmp_path / "ck")
        assert store.push(root / "step00001", root / "step00002")
    assert not storage.Store("", tmp_path / "ck").push(root)  # no store: nothing pushed, says so
    storage.Store("", tmp_path / "ck").release(root / "step00001")
    assert (root / "step00001").exists(), "without a store the local copy is the only one"
    store.release(root / "step00001", root / "metrics.json")
    assert not (root / "step00001").exists(), "held by the store: freed"
    assert (root / "metrics.json").exists(), "not in the store: kept"
    store.pull(root)  # the folder exists: its missing entries come back
    assert (root / "step00001" / "model.safetensors").read_bytes() == b"step00001"


def run_04(work: Path, params: dict) -> None:
    from tests.notebook import run_notebook

    work.mkdir(parents=True, exist_ok=True)
    run_notebook("04_mu_sweep", work, **params)


def test_04_killed_mid_sweep_resumes_from_the_store_bitwise(assets, tmp_path):
    """04 killed (SIGKILL, kernel and all) inside the second mu's runs, after the store got one of its
    progress checkpoints, its local files lost: the rerun takes the first mu from the store, resumes the
    second where the store left it, and ends with the weights of an uninterrupted sweep."""
    import shutil

    from safetensors.torch import load_file

    settings = {**assets, **SETTINGS, "iterations": 1, "reward_max_length": 64, "store_progress_minutes": 0}
    evals = {"n_prompts": 4, "samples_per_prompt": 1, "max_new_tokens": 4, "limit_samples": 0}
    params = {"PRESET": "offline", "CHECKPOINTS": "ck", "MUS": [0.01, 0.1], "OVERRIDES": settings}
    params["EVAL_OVERRIDES"] = evals
    run_04(tmp_path / "whole", params)

    work, drive = tmp_path / "dead", tmp_path / "drive"
    work.mkdir()
    params = {**params, "STORE": str(drive)}
    second = drive / "mu_sweep" / "mu=0.1" / "iter0"
    ready = lambda: bool(list(second.glob("run*/progress.pt")))
    kill_notebook_when(ROOT / "04_mu_sweep.ipynb", work, params, ready, timeout=600)
    assert list(second.glob("run*/progress.pt")), "the child never checkpointed the second mu"
    assert (drive / "mu_sweep" / "mu=0.01" / "final_slerp").exists(), "killed before the first mu ended"
    assert not (drive / "mu_sweep" / "mu=0.1" / "final_slerp").exists(), "killed after the sweep ended"

    shutil.rmtree(work / "ck")  # the new session has nothing local
    run_04(work, params)
    for mu in (0.01, 0.1):
        final = Path("ck") / "mu_sweep" / f"mu={mu}" / "final_slerp" / "model.safetensors"
        a, b = load_file(str(work / final)), load_file(str(tmp_path / "whole" / final))
        assert all(torch.equal(a[k], b[k]) for k in a), mu


def fake_run_files(monkeypatch):
    """runs.RunFiles with its model writes faked: a snapshot is a folder with the step, progress only the
    step and precision (what check_resume reads); the accelerator unwraps nothing."""
    from types import SimpleNamespace

    def snapshot(model, tokenizer, path, extra=None):
        with checkpoints.atomic_dir(path) as tmp:
            (tmp / "model.safetensors").write_text(str(extra["step"]))

    def progress(path, accelerator, policy, anchor, optimizer, scheduler, step, history, mixed_precision):
        checkpoints.save_progress(path, None, step=step, mixed_precision=mixed_precision)

    monkeypatch.setattr(checkpoints, "save_pretrained_atomic", snapshot)
    monkeypatch.setattr(runs, "save_run", progress)
    return SimpleNamespace(unwrap_model=lambda model: model)


def train(files: runs.RunFiles, steps: range, accelerator) -> None:
    for step in steps:
        files.save(step, accelerator, None, None, None, None, [], None, "no")


def test_snapshots_made_before_an_interrupt_are_stored_when_the_run_resumes(tmp_path, monkeypatch):
    """REINFORCE with save points 10/20/30 and its progress kept local (the time rule): interrupted after
    step 22, rerun on the same disk, it resumes; at its end the store holds all three snapshots."""
    accelerator = fake_run_files(monkeypatch)
    ck, drive = tmp_path / "ck", tmp_path / "drive"
    spec = runs.RunSpec(str(ck / "reinforce"), "", 0, 30, save_points=(10, 20, 30))
    first = runs.RunFiles(spec, storage.Store(str(drive), ck, progress_minutes=60), save_every=5)
    first.check_resume("no")
    train(first, range(1, 23), accelerator)
    assert not (drive / "reinforce").exists(), "nothing stored yet (the time rule)"

    again = runs.RunFiles(spec, storage.Store(str(drive), ck, progress_minutes=60), save_every=5)  # a rerun
    assert not again.finished()
    again.check_resume("no")
    assert checkpoints.progress_entry(again.progress, "step") == 20
    train(again, range(21, 31), accelerator)
    again.finish(None, [])
    stored = sorted(p.name for p in (drive / "reinforce").iterdir())
    assert stored == ["metrics.json", "step00010", "step00020", "step00030"]
    assert not again.progress.exists()


def test_a_run_whose_final_push_fails_keeps_its_progress_and_the_next_push_stores_it(tmp_path, monkeypatch):
    """The run's end: its final state and metrics written here, the push fails (an outage through every
    retry). The local progress stays (the store may hold only an older state); the next push of the
    session carries the final state and the metrics and deletes the stored progress."""
    from tests.hub_standin import StandInHub

    accelerator = fake_run_files(monkeypatch)
    hub = StandInHub(tmp_path / "hub").install(monkeypatch)
    ck = tmp_path / "ck"
    store = storage.Store("me/warp", ck, token="hf_x", progress_minutes=0)
    spec = runs.RunSpec(str(ck / "warp" / "iter0" / "run0"), "", 0, 4)
    files = runs.RunFiles(spec, store, save_every=2)
    files.check_resume("no")
    train(files, range(1, 4), accelerator)
    assert "warp/iter0/run0/progress.pt" in hub.files("me/warp")  # stored by the time rule (0 minutes)
    hub.fail("create_commit", status=503, times=100)
    with pytest.warns(UserWarning, match=r"could not push .*final\.safetensors.*Not stored"):
        files.finish({"w": torch.zeros(2)}, [{"step": 4}])
    assert files.progress.exists(), "the push failed: the local progress stays"
    assert set(store.unstored()) == {files.final, files.done}
    hub.clear_faults()
    assert store.push()  # e.g. the stage's next commit
    held = set(hub.files("me/warp"))
    assert {"warp/iter0/run0/final.safetensors", "warp/iter0/run0/metrics.json"} <= held
    assert "warp/iter0/run0/progress.pt" not in held
