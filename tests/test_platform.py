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


def test_auto_on_kaggle_without_a_gpu_stops_and_says_how_to_turn_it_on(
    kaggle_without_gpu, monkeypatch, fake_gpu
):
    assert config.platform() == "kaggle"
    with pytest.raises(RuntimeError, match=r"Kaggle .* no gpu\. Turn it on \(Settings -> Accelerator"):
        config.resolve_preset("auto")
    assert config.resolve_preset("offline")[0] == "offline"  # asked for explicitly, it runs
    fake_gpu("Tesla T4", (7, 5), ARCHS_FROM_70)
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
    assert len(lines) == 4 and lines[0].startswith("GPU: none (Settings -> Accelerator -> GPU T4 x2")
    assert lines[1].startswith("internet: no Hub (Settings -> Internet")  # tests run with HF_HUB_OFFLINE
    assert lines[2].startswith("HF_TOKEN: found") and "verysecret" not in "".join(lines)
    assert config.environment_report(None)[2].startswith("HF_TOKEN: not set (Kaggle: Add-ons -> Secrets")
    import peft
    import transformers

    assert lines[3].startswith(f"versions: torch {torch.__version__} (")
    for name, module in (("transformers", transformers), ("peft", peft)):
        assert f"{name} {module.__version__}" in lines[3]
    assert "accelerate " in lines[3] and "datasets " in lines[3]


# torch.cuda.get_arch_list() of real builds: CUDA 12.8 wheels start at sm_70 (no P100), older ones at sm_50
ARCHS_FROM_70 = ["sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
ARCHS_FROM_50 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]


@pytest.mark.parametrize(
    "capability, archs, runs",
    [
        ((6, 0), ARCHS_FROM_70, False),  # Kaggle's P100 under a build from sm_70: the case to refuse
        ((6, 0), ARCHS_FROM_50, True),
        ((7, 5), ARCHS_FROM_70, True),  # T4: its own cubin
        ((8, 9), ARCHS_FROM_70, True),  # L4: sm_86's cubin (same major, lower minor)
        ((8, 9), ["sm_80"], True),
        ((7, 0), ["sm_75"], False),  # a higher minor of the same major does not run on a lower one
        ((9, 0), ["sm_80", "sm_86"], False),  # cubins never cross a major...
        ((9, 0), ["sm_80", "compute_80"], True),  # ...PTX is compiled by the driver for any newer card
        ((8, 0), ["sm_90", "compute_90"], False),  # PTX of a newer architecture does not run on an older one
        ((12, 0), ["sm_90", "sm_100"], False),
        ((12, 0), ARCHS_FROM_70, True),  # sm_120 read as major 12, not 1.20
        ((10, 3), ["sm_100"], True),
        ((9, 0), ["sm_90a"], True),  # arch-specific cubins: exactly that card
        ((10, 0), ["sm_90a", "compute_90a"], False),
        ((7, 5), [], False),  # a CPU build
    ],
)
def test_a_torch_build_runs_on_cards_it_has_kernels_for(capability, archs, runs):
    assert config.runs_on(capability, archs) is runs


@pytest.fixture
def fake_gpu(monkeypatch):
    """fake_gpu(name, capability, archs, count=1): torch.cuda reports that card and that build."""

    def install(name: str, capability: tuple[int, int], archs: list[str], count: int = 1):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(archs))

    return install


def test_a_p100_under_a_build_without_its_kernels_is_refused_before_any_compute(fake_gpu, monkeypatch):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    monkeypatch.setattr(config, "hub_reachable", lambda *a, **k: True)
    fake_gpu("Tesla P100-PCIE-16GB", (6, 0), ARCHS_FROM_70)
    for call in (lambda: config.environment_report(None), lambda: config.resolve_preset("auto")):
        with pytest.raises(RuntimeError) as refused:
            call()
        message = str(refused.value)
        assert "Tesla P100-PCIE-16GB" in message and "6.0" in message and "sm_70" in message
        assert "use T4 x2 or L4" in message and "Settings -> Accelerator" in message
    assert config.resolve_preset("imdb")[0] == "imdb"  # asked for explicitly, the notebook's report stops it


def test_a_supported_gpu_is_reported_with_its_capability(fake_gpu, monkeypatch):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    monkeypatch.setattr(config, "hub_reachable", lambda *a, **k: True)
    fake_gpu("Tesla T4", (7, 5), ARCHS_FROM_70, count=2)
    lines = config.environment_report("hf_x")
    assert lines[0].startswith(
        "GPU: Tesla T4 x2, compute capability 7.5; this torch build has kernels for it"
    )
    assert config.resolve_preset("auto")[0] == "imdb"
    # one unsupported card among the visible ones is enough to stop (the parallel runs use them all)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: [(7, 5), (6, 0)][device])
    with pytest.raises(RuntimeError, match="use T4 x2 or L4"):
        config.resolve_preset("auto")


def test_no_p100_is_recommended_anywhere():
    """The code and the notebooks point to T4 x2 or L4 (a P100 does not run current torch builds)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = [*root.glob("*.py"), *root.glob("*.ipynb"), *root.glob("bench/*.py")]
    recommends = re.compile(r"(or|GPU|use|Accelerator ->) P100")
    assert [f.name for f in files if recommends.search(f.read_text())] == []
    assert "T4 x2" in config.HOW_TO["kaggle"]["gpu"] and "L4" in config.HOW_TO["kaggle"]["gpu"]


def test_pushed_repos_are_created_private(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token):
            calls.append(("token", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id, kw))

        def list_repo_files(self, repo_id):
            return []

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


def troubleshooting_row(case: str) -> str:
    """The row of docs/troubleshooting.md whose case starts with `case`."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md").read_text()
    return next(line for line in text.splitlines() if line.startswith(f"| {case}"))


def test_troubleshooting_quotes_what_a_missing_earlier_output_prints(tmp_path, monkeypatch):
    """The messages a notebook can stop with (the `checkpoints` folder missing or there: the same; a Hub
    id that is not there) are the ones the row quotes, with what to do."""
    import huggingface_hub

    import checkpoints

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **k: 1 / 0)  # not there
    hint = storage.missing_hint("01_reward_model.ipynb", "the reward model")
    messages = []
    for made, source in (
        (False, "checkpoints/reward_model"),
        (True, "checkpoints/reward_model"),
        (True, "me/reward_model"),
    ):
        if made:
            (tmp_path / "checkpoints").mkdir(exist_ok=True)
        with pytest.raises(FileNotFoundError) as missing:
            checkpoints.resolve_checkpoint(source, hint=hint)
        messages.append(str(missing.value))
    row = troubleshooting_row("a missing earlier output")
    assert messages[0] == messages[1] and messages[0].startswith(
        "no checkpoint at checkpoints/reward_model. "
    )
    assert messages[2].startswith("me/reward_model: not a local folder, nor on the Hub (")
    for quoted in (
        "me/reward_model: not a local folder, nor on the Hub (",
        "no checkpoint at checkpoints/reward_model. ",
        "the reward model is made by 01_reward_model.ipynb: run it first with the same STORE (",
        "or on Kaggle add 01_reward_model.ipynb's output as input (Add Input -> Your Work)",
    ):
        assert quoted in row and any(quoted in m for m in messages), quoted
    assert "WARP is made by 02_warp_training.ipynb: " in storage.missing_hint(
        "02_warp_training.ipynb", "WARP"
    )
    assert "earlier output found: " in row and "Save & Run All" in row


def test_a_full_drive_store_warns_keeps_the_local_copy_and_is_in_troubleshooting(tmp_path, monkeypatch):
    """A folder store whose disk is full (a Drive over its quota): the push warns with the message the
    troubleshooting row quotes, says it did not store, and the local copy and the store's old file stay."""
    import errno
    import shutil

    root, drive = tmp_path / "checkpoints", tmp_path / "MyDrive" / "warp-imdb-checkpoints"
    (root / "eval").mkdir(parents=True)
    (root / "eval" / "results.csv").write_text("new")
    (drive / "eval").mkdir(parents=True)
    (drive / "eval" / "results.csv").write_text("old")

    def full(src, dst, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", full)
    store = storage.Store(str(drive), root)
    with pytest.warns(UserWarning) as caught:
        assert store.push(root / "eval" / "results.csv") is False
    warning = str(caught[0].message)
    assert warning.startswith(f"could not push {root / 'eval' / 'results.csv'} to {drive} (OSError: ")
    assert "(OSError: [Errno 28] disk full while writing " in warning
    assert (root / "eval" / "results.csv").read_text() == "new" and (
        drive / "eval" / "results.csv"
    ).read_text() == "old"
    row = troubleshooting_row("a full Drive")
    assert "`could not push ... to /content/drive/MyDrive/warp-imdb-checkpoints (OSError: " in row
    assert "(OSError: [Errno 28] disk full while writing ...)" in row
    assert "Empty bin" in row and "30 days" in row and "Hub store" in row
