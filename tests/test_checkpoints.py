"""Properties of checkpointing: atomic writes, save/reload, RNG state, and the Hub helpers without network."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import checkpoints
import storage
import utils


def leftovers(folder: Path) -> list[str]:
    """Temporary or backup entries that an atomic write must not leave behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp")


# ------------------------------------------------------------------------------------------------------
# Atomic files and folders
# ------------------------------------------------------------------------------------------------------


def test_atomic_dir_keeps_the_previous_folder_when_the_body_raises(tmp_path):
    """If writing a checkpoint fails, the previous checkpoint is intact and no temporary folder remains."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "weights.txt").write_text("old")
    with pytest.raises(RuntimeError, match="crash"):
        with checkpoints.atomic_dir(ckpt) as tmp:
            (tmp / "weights.txt").write_text("half-writ")
            assert (ckpt / "weights.txt").read_text() == "old"  # readers still see the old one
            raise RuntimeError("crash")
    assert (ckpt / "weights.txt").read_text() == "old"
    assert sorted(p.name for p in ckpt.iterdir()) == ["weights.txt"]
    assert leftovers(tmp_path) == []


def test_atomic_dir_replaces_the_folder_whole_on_success(tmp_path):
    """On success the new folder replaces the old one entirely (no stale files), leaving no temporaries."""
    ckpt = tmp_path / "sub" / "ckpt"
    with checkpoints.atomic_dir(ckpt) as tmp:
        (tmp / "stale.txt").write_text("1")
    with checkpoints.atomic_dir(ckpt) as tmp:
        assert tmp != ckpt
        (tmp / "new.txt").write_text("2")
    assert sorted(p.name for p in ckpt.iterdir()) == ["new.txt"]
    assert leftovers(ckpt.parent) == []


def test_atomic_torch_save_round_trip_and_failed_save_keeps_old(tmp_path):
    """atomic_torch_save round-trips tensors; a save that fails leaves the old file and no temporary."""
    path = tmp_path / "state" / "opt.pt"
    obj = {"w": torch.randn(3, 4), "step": 7, "nested": [torch.arange(5)]}
    checkpoints.atomic_torch_save(obj, path)
    back = torch.load(path)
    assert (
        back["step"] == 7
        and torch.equal(back["w"], obj["w"])
        and torch.equal(back["nested"][0], obj["nested"][0])
    )
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises for a lambda
        checkpoints.atomic_torch_save({"f": lambda: 0}, path)
    assert torch.equal(torch.load(path)["w"], obj["w"])
    assert leftovers(path.parent) == []


def test_atomic_write_text_overwrites(tmp_path):
    """atomic_write_text creates parents, overwrites, and leaves no temporary file."""
    path = tmp_path / "a" / "b.txt"
    checkpoints.atomic_write_text(path, "one")
    checkpoints.atomic_write_text(path, "two")
    assert path.read_text() == "two" and leftovers(path.parent) == []


# ------------------------------------------------------------------------------------------------------
# save_pretrained_atomic + load_policy
# ------------------------------------------------------------------------------------------------------


def test_to_json_is_strict_json_with_null_for_undefined_numbers(tmp_path):
    """Headline files must parse with strict readers: NaN (an undefined CI or angle) is written as null,
    numpy and torch scalars as plain numbers; atomic writes are readable by others (not 0600)."""
    import numpy as np

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))

    obj = {"ci": float("nan"), "inf": [float("-inf")], "np": np.float32(0.5), "t": torch.tensor(2.0), "ok": 1}
    assert strict(checkpoints.to_json(obj)) == {"ci": None, "inf": [None], "np": 0.5, "t": 2.0, "ok": 1}
    checkpoints.atomic_write_text(tmp_path / "h.json", checkpoints.to_json(obj))
    assert (tmp_path / "h.json").stat().st_mode & 0o044 == 0o044


def test_save_pretrained_atomic_then_load_policy_round_trips(tmp_path, make_gpt2, bpe_tokenizer):
    """A policy saved with save_pretrained_atomic reloads with the same weights (tied), a left-padding
    tokenizer with a pad token, and the extra info.json."""
    model = make_gpt2(seed=3, vocab_size=len(bpe_tokenizer))
    model.config.eos_token_id = model.config.bos_token_id = model.config.pad_token_id = (
        bpe_tokenizer.eos_token_id
    )
    tok = bpe_tokenizer
    path = tmp_path / "policy"
    checkpoints.save_pretrained_atomic(
        model, tok, path, extra={"iteration": 1, "angles": {"angle/mean": 42.0}}
    )
    checkpoints.save_pretrained_atomic(model, tok, path, extra={"iteration": 2})  # overwriting works too
    assert json.loads((path / "info.json").read_text()) == {"iteration": 2}
    assert leftovers(tmp_path) == []

    loaded, ltok = utils.load_policy(str(path))
    assert ltok.padding_side == "left" and ltok.pad_token_id is not None
    assert ltok.encode("A brilliant film") == tok.encode("A brilliant film")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    a, b = utils.state_of(model), utils.state_of(loaded)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_load_policy_sets_pad_to_eos_when_missing(tmp_path, make_gpt2, make_bpe_tokenizer):
    """A tokenizer without a pad token gets pad = EOS and left padding from load_policy."""
    from transformers import PreTrainedTokenizerFast

    base = make_bpe_tokenizer(["a tiny corpus of words", "another line of words"], vocab_size=300)
    tok = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, eos_token="<|endoftext|>")
    assert tok.pad_token is None
    model = make_gpt2(vocab_size=len(tok))
    model.save_pretrained(tmp_path / "p")
    tok.save_pretrained(tmp_path / "p")
    _, ltok = utils.load_policy(str(tmp_path / "p"))
    assert ltok.pad_token == ltok.eos_token == "<|endoftext|>" and ltok.padding_side == "left"


# ------------------------------------------------------------------------------------------------------
# RNG state
# ------------------------------------------------------------------------------------------------------


def test_rng_state_reproduces_the_same_draws_also_through_a_file(tmp_path):
    """After set_rng_state(rng_state()) Python and torch draw the same numbers, also via a file."""
    random.seed(1)
    torch.manual_seed(1)
    state = checkpoints.rng_state()
    first = (random.random(), torch.rand(4), torch.randperm(10))
    checkpoints.atomic_torch_save(state, tmp_path / "rng.pt")

    random.seed(99)
    torch.manual_seed(99)
    checkpoints.set_rng_state(state)
    again = (random.random(), torch.rand(4), torch.randperm(10))
    assert first[0] == again[0] and torch.equal(first[1], again[1]) and torch.equal(first[2], again[2])

    random.seed(123)
    torch.manual_seed(123)
    checkpoints.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    from_disk = (random.random(), torch.rand(4), torch.randperm(10))
    assert first[0] == from_disk[0] and torch.equal(first[1], from_disk[1])


# ------------------------------------------------------------------------------------------------------
# Hub helpers (no network)
# ------------------------------------------------------------------------------------------------------


def test_hf_token_reads_the_environment(monkeypatch):
    """hf_token returns HF_TOKEN from the environment, and None when it is unset or empty."""
    monkeypatch.setenv("HF_TOKEN", "hf_test_123")
    assert storage.hf_token() == "hf_test_123"
    monkeypatch.setenv("HF_TOKEN", "")
    assert storage.hf_token() is None
    monkeypatch.delenv("HF_TOKEN")
    assert storage.hf_token() is None


def test_a_hub_store_without_a_token_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"STORE='me/warp' is a Hub repo, and there is no HF_TOKEN"):
        storage.Store("me/warp", tmp_path, token=None)
    storage.Store(str(tmp_path / "drive"), tmp_path, token=None)  # a folder needs none


def test_resolve_checkpoint_prefers_a_local_folder(tmp_path):
    """resolve_checkpoint returns an existing local folder (or its subfolder) without downloading."""
    (tmp_path / "run" / "iter1").mkdir(parents=True)
    assert checkpoints.resolve_checkpoint(str(tmp_path / "run")) == str(tmp_path / "run")
    assert checkpoints.resolve_checkpoint(str(tmp_path / "run"), "iter1") == str(tmp_path / "run" / "iter1")


def test_a_missing_checkpoint_under_the_notebooks_root_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    """A fresh session without `checkpoints/`: 02's `checkpoints/reward_model` is a folder that 01 makes,
    not a Hub repo of a user `checkpoints`; it fails with what to do, and the Hub is not asked. A Hub id
    (`me/reward_model`) is still looked up there."""
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **k: asked.append(repo) or 1 / 0)
    monkeypatch.chdir(tmp_path)
    hint = storage.missing_hint("01_reward_model.ipynb", "the reward model")
    with pytest.raises(FileNotFoundError) as missing:
        checkpoints.resolve_checkpoint("checkpoints/reward_model", hint=hint)
    assert str(missing.value) == f"no checkpoint at checkpoints/reward_model. {hint}" and asked == []
    with pytest.raises(FileNotFoundError, match=r"^me/reward_model: not a local folder, nor on the Hub"):
        checkpoints.resolve_checkpoint("me/reward_model", hint=hint)
    assert asked == ["me/reward_model"]
