"""`bench/reward_budget.py` (01's accuracy-versus-budget curve) as a smoke run: two doublings of 8 training
pairs on 32 held-out real reviews at 64 tokens, through 01 itself. Checks that the outputs exist and are
well formed, that the sessions chained (the second budget's epoch continued the first) and that a mode
resumed in the same folder keeps the other's curve in the outputs. Skips when
`../shared/data` is absent. And, without 01, that progress files a GPU session wrote
are read on the CPU."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import pytest
import torch

from bench import reward_budget

MISSING = (
    None if reward_budget.SHARED_DATA.exists() else f"real reviews not found: {reward_budget.SHARED_DATA}"
)


@pytest.mark.slow
@pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
def test_budget_curve_smoke(tmp_path):
    docs = tmp_path / "docs"
    args = ["--modes", "lora", "--start", "8", "--max-budget", "16", "--batch-size", "4", "--heldout", "32"]
    args += ["--max-length", "64", "--out", str(tmp_path / "work"), "--docs", str(docs)]
    result = reward_budget.main(args)

    rows = list(csv.DictReader((docs / "reward_budget.csv").open()))
    assert [(r["mode"], int(r["pairs"])) for r in rows] == [("lora", 0), ("lora", 8), ("lora", 16)]
    for r in rows[1:]:
        assert 0.0 <= float(r["heldout_accuracy"]) <= 1.0 and 0.0 <= float(r["fixed_pairs_accuracy"]) <= 1.0
        assert float(r["train_minutes"]) > 0 and float(r["wall_minutes"]) > 0
    assert float(rows[2]["wall_minutes"]) > float(rows[1]["wall_minutes"])  # cumulative over the sessions

    saved = json.loads((docs / "reward_budget.json").read_text())
    assert saved["reviews"] == {"train": 3968, "heldout": 32}
    assert saved["chosen_pairs"]["lora"] in (None, 8)  # 8 when the doubling to 16 gained < 0.005
    assert saved["settings"]["lora"]["batch_size"] == 4 and saved["settings"]["lora"]["max_length"] == 64
    assert saved["curve"] == result["curve"] and len(saved["curve"]) == 3
    assert (docs / "reward_budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (docs / "reward_budget.md").read_text().splitlines()
    assert table[0].startswith("| mode | training pairs |") and len(table) == 4  # header, rule, 2 budgets

    # the split the notebook read: 32 held-out reviews, half of them positive, and the rest to train on
    folder = tmp_path / "work" / "data"
    test = [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines()]
    assert len(test) == 32 and sum(r["label"] for r in test) == 16
    assert len((folder / "train.jsonl").read_text().splitlines()) == 3968

    # another mode resumed in the same folder: the outputs list both curves, and the first is untouched
    args = ["--modes", "last_layer", "--start", "8", "--max-budget", "8", "--batch-size", "4"]
    args += ["--heldout", "32", "--max-length", "64", "--out", str(tmp_path / "work"), "--docs", str(docs)]
    both = reward_budget.main(args + ["--resume"])
    modes = [(r["mode"], r["pairs"]) for r in both["curve"]]
    assert modes == [("last_layer", 0), ("last_layer", 8), ("lora", 0), ("lora", 8), ("lora", 16)]
    assert [r for r in both["curve"] if r["mode"] == "lora"] == result["curve"]
    assert set(both["chosen_pairs"]) == set(both["settings"]) == {"lora", "last_layer"}
    table = (docs / "reward_budget.md").read_text().splitlines()
    assert len(table) == 2 + 1 + 2  # header and rule, last_layer's 8 pairs, lora's 8 and 16


def save_as_on_a_gpu(state: dict, path) -> None:
    """torch.save with every storage tagged cuda:0, as a session on a GPU leaves its progress file."""
    import torch.serialization

    real = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: "cuda:0"
    try:
        torch.save(state, path)
    finally:
        torch.serialization.location_tag = real


def test_progress_files_written_on_a_gpu_are_read_on_the_cpu(tmp_path, monkeypatch):
    """A session of 01 on a GPU leaves tensors tagged for CUDA in its progress file: the curve reads them
    on the CPU (after a session and on --resume) instead of failing to deserialize them."""
    figs = {"pairwise_accuracy": 0.5, "reward_gap": 0.1, "val_loss": 0.69}
    scores = (torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.5]))  # 3 of 4 pairs ordered right
    seen = [{"pairs": 0, **figs}]

    def session_on_a_gpu(work, overrides, threads):  # what 01 leaves: an epoch more in its history
        folder = work / "ck" / "reward_model_progress"
        folder.mkdir(parents=True, exist_ok=True)
        seen.append({"pairs": seen[-1]["pairs"] + overrides["batches_per_epoch"] * 4, **figs})
        state = {"history": seen, "val_scores": scores, "train_seconds": 90.0, "val_seconds": 30.0}
        save_as_on_a_gpu(state, folder / "progress.pt")
        (folder / "config.json").write_text(json.dumps({"mode": overrides["mode"]}))
        return 60.0

    if not torch.cuda.is_available():  # the premise: such a file is not read without a map_location
        save_as_on_a_gpu({"scores": scores}, tmp_path / "probe.pt")
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "probe.pt", weights_only=True)
    monkeypatch.setattr(reward_budget, "run_session", session_on_a_gpu)
    args = SimpleNamespace(
        out=str(tmp_path), resume=False, start=8, max_budget=8, tol=0.005, reward_base="", batch_size=4,
        heldout=4, max_length=64, eval_batch_size=4, precision="no", threads=1,
    )  # fmt: skip
    rows, _, saved = reward_budget.budget_curve("lora", args, tmp_path / "data", deadline=float("inf"))
    assert [r["pairs"] for r in rows] == [0, 8] and rows[1]["heldout_accuracy"] == 0.75
    assert saved == {"mode": "lora"}
    args.resume, args.max_budget = True, 16  # the resume reads the progress file before its next session
    rows, _, _ = reward_budget.budget_curve("lora", args, tmp_path / "data", deadline=float("inf"))
    assert [r["pairs"] for r in rows] == [0, 8, 16]
    progress = reward_budget.read_progress(tmp_path / "lora" / "ck" / "reward_model_progress" / "progress.pt")
    assert all(t.device.type == "cpu" for t in progress["val_scores"])
