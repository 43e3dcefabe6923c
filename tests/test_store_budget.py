"""bench/store_budget.py: a ledger replayed with the imdb preset's file sizes (no models built here)."""

from __future__ import annotations

from bench.store_budget import kind, replay

SIZES = {"state": {"*": 500}, "progress": {"*": 2000}, "policy": {"model.safetensors": 500, "config.json": 1},
         "reward_model": {"model.safetensors": 260}}  # fmt: skip


def test_each_file_is_counted_at_its_kinds_size_and_deletions_leave_the_store():
    assert (
        kind("warp/iter0/run1/final.safetensors") == "state"
        and kind("warp/iter1/init.safetensors") == "state"
    )
    assert (
        kind("warp/iter0/run0/progress.pt") == "progress"
        and kind("reward_model_progress/config.json") is None
    )
    assert (
        kind("warp/final_slerp/model.safetensors") == "policy"
        and kind("warp/reinforce/step00020/x") == "policy"
    )
    assert kind("reward_model/model.safetensors") == "reward_model" and kind("warp/merge.json") is None
    ledger = [
        {"session": "a", "added": ["reward_model/model.safetensors", "reward_model/config.json"],
         "sizes": [9, 3], "deleted": []},
        {"session": "b", "added": ["warp/iter0/run0/final.safetensors", "warp/config.json"], "sizes": [7, 2],
         "deleted": []},
        {"session": "b", "added": ["warp/final_slerp/model.safetensors", "warp/final_slerp/config.json"],
         "sizes": [7, 1], "deleted": ["warp/iter0/run0/final.safetensors"]},
        {"session": "b", "added": [], "sizes": [], "deleted": []},  # a squash
    ]  # fmt: skip
    a, b = replay(ledger, SIZES)
    assert a == {"commits": 1, "files": 2, "uploaded": 260 + 3, "held": 263, "progress": 0}
    assert b["commits"] == 3 and b["uploaded"] == 500 + 2 + 500 + 1
    assert b["held"] == 263 + 2 + 500 + 1  # the run's final left the store with the commit that replaced it
    assert replay(ledger, None)[1]["uploaded"] == 7 + 2 + 7 + 1  # the sizes as written


def test_readmes_numbers_are_checked_against_the_replay():
    """README's 29 commits, 13.3 GB uploaded, 3.8 GB after 02 and 5.8 GB after 04 are matched as README
    rounds them; one commit more is told."""
    from bench.store_budget import readme_check

    gb = 10**9
    rows = [{"commits": 2, "uploaded": 0.27 * gb, "held": 0.27 * gb}, {"commits": 10, "uploaded": 6 * gb,
            "held": 3.78 * gb}, {"commits": 2, "uploaded": 0, "held": 3.78 * gb},
            {"commits": 15, "uploaded": 6.98 * gb, "held": 5.79 * gb}]  # fmt: skip
    assert all(v["same"] for v in readme_check(rows).values())
    rows[3]["commits"] += 1
    check = readme_check(rows)
    assert (
        not check["commits"]["same"] and check["commits"]["measured"] == 30 and check["after_04_gb"]["same"]
    )
