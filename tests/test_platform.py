"""Kaggle and Colab: `auto` never falls back to the CPU series there, the environment report says what is
missing and how to get it, Hub repos are created private, and the token never appears in a notebook."""

from __future__ import annotations

import json

import pytest
import torch

import config
import storage
from tests import tiny
from tests.notebook import run_notebook


@pytest.fixture
def kaggle_without_gpu(monkeypatch):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_on_kaggle_without_a_gpu_stops_and_says_how_to_turn_it_on(kaggle_without_gpu, monkeypatch):
    assert config.platform() == "kaggle"
    with pytest.raises(RuntimeError, match=r"Kaggle .* no gpu\. Turn it on \(Settings -> Accelerator"):
        config.resolve_preset("auto")
    assert config.resolve_preset("offline")[0] == "offline"  # asked for explicitly, it runs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(config, "hub_reachable", lambda *a, **k: False)
    with pytest.raises(RuntimeError, match=r"no internet\. Turn it on \(Settings -> Internet -> on\)"):
        config.resolve_preset("auto")


def test_colab_is_recognised(monkeypatch):
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    monkeypatch.delenv("KAGGLE_URL_BASE", raising=False)
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab-2026")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert config.platform() == "colab"
    with pytest.raises(RuntimeError, match=r"Runtime -> Change runtime type -> T4 GPU"):
        config.resolve_preset("auto")


def test_environment_report_says_what_is_missing_without_the_token(kaggle_without_gpu):
    lines = config.environment_report("hf_verysecret")
    assert len(lines) == 3 and lines[0].startswith("GPU: none (Settings -> Accelerator")
    assert lines[1].startswith("internet: no Hub (Settings -> Internet")  # tests run with HF_HUB_OFFLINE
    assert lines[2].startswith("HF_TOKEN: found") and "verysecret" not in "".join(lines)
    assert config.environment_report(None)[2].startswith("HF_TOKEN: not set (Kaggle: Add-ons -> Secrets")


def test_pushed_repos_are_created_private(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token):
            calls.append(("token", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id, kw))

        def create_commit(self, repo_id, operations, **kw):
            calls.extend(("upload", repo_id, op.path_in_repo) for op in operations)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    (tmp_path / "warp").mkdir()
    (tmp_path / "warp" / "f.txt").write_text("x")
    storage.Store("me/warp", tmp_path, token="hf_x").push(tmp_path / "warp" / "f.txt")
    assert ("create", "me/warp", {"exist_ok": True, "private": True}) in calls and ("token", "hf_x") in calls
    assert ("upload", "me/warp", "warp/f.txt") in calls


@pytest.mark.slow
def test_a_notebook_never_shows_the_token_and_says_how_to_push_later(tmp_path):
    """01 on tiny models with an HF_TOKEN and no STORE: stays local, says how to keep it, never prints the
    token (in its outputs or anywhere in the executed notebook)."""
    overrides = {
        "reward_base": tiny.save_tiny_reward(tmp_path / "rm", arch="distilbert"),
        "data": tiny.save_tiny_reviews(tmp_path / "data"),
        **dict(epochs=1, batch_size=4, batches_per_epoch=2, val_pairs=8, eval_batch_size=8, max_length=64),
    }
    secret = "hf_DoNotPrintThis123"
    text, _ = run_notebook(
        "01_reward_model", tmp_path, hf_token=secret, PRESET="imdb", CHECKPOINTS="ck", OVERRIDES=overrides
    )
    assert "HF_TOKEN: found" in text and "To keep it beyond this session, set STORE" in text
    assert secret not in (tmp_path / "01_reward_model.out.ipynb").read_text()
    assert json.loads((tmp_path / "ck" / "reward_model" / "metrics.json").read_text())["epochs"] == 1
