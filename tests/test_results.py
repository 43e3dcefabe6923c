"""`bench/results.py`, the study behind README's Results: one step of everything on tiny models, checking
that comparisons are paired (same prompts, same sampling seed) and that a rerun reads back, not retrains."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from bench import results
from tests import tiny


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    d = tmp_path_factory.mktemp("results")
    (d / "data").mkdir()
    for split, n in (("train", 120), ("test", 40)):
        with open(d / "data" / f"{split}.jsonl", "w") as f:
            for i, text in enumerate(tiny.corpus(n)):
                f.write(json.dumps({"text": text, "label": i % 2}) + "\n")
    args = [
        "--smoke", "--out", str(d / "out"), "--data", str(d / "data"),
        "--sft", tiny.save_tiny_policy(d / "sft"), "--reference", tiny.save_tiny_policy(d / "ref", seed=1),
        "--reward-model", tiny.save_tiny_reward(d / "rm"),
    ]  # fmt: skip
    return d / "out", args, results.main(args)


def test_every_model_is_evaluated_on_the_same_prompts_and_draws(smoke):
    out, _, result = smoke
    samples = pd.read_csv(out / "samples.csv")
    prompts = {key: tuple(sorted(g["prompt"])) for key, g in samples.groupby(["seed", "model"])}
    assert len(set(prompts.values())) == 1  # paired: every model and seed on the same prompt rows
    sft = [tuple(g.sort_values(["prompt", "sample"])["completion"].fillna("")) for _, g in
           samples[samples.model == "SFT"].groupby("seed")]  # fmt: skip
    assert len(sft) == 2 and sft[0] == sft[1]  # the same sampling seed: the SFT draws the same texts
    for seed, heads in result["headlines"].items():
        assert abs(heads["SFT"]["kl"]) < 1e-5 and heads["SFT"]["ref_ppl"] > 1
        trained = [n for n in heads if n != "SFT"]
        assert len(trained) == 11 and all(heads[n]["kl"] > 0 for n in trained), seed


def test_comparisons_cover_the_claims_and_outputs_exist(smoke):
    out, _, result = smoke
    rows = [r["comparison"] for r in result["comparisons"][0]]
    assert sum("REINFORCE SFT beta=" in r for r in rows) == 2 and any("REINFORCE EMA" in r for r in rows)
    assert any("mu=0.05 - slerp mu=0.01" in r for r in rows)
    assert any("iteration 2 - slerp of iteration 1" in r for r in rows)
    assert sum(r.endswith("- SFT") for r in rows) == 3
    assert [a["T"] for a in result["angles"]] == [1, 2]
    for name in ("results.md", "results.json", "pareto.png", "iterations.png", "angles.png"):
        assert (out / name).stat().st_size > 0, name


def test_a_rerun_reads_the_trainings_back(smoke):
    out, args, _ = smoke
    finished = sorted(out.glob("seed*/**/metrics.json"))
    stamps = [p.stat().st_mtime_ns for p in finished]
    assert len(finished) >= 2 * (2 * 2 * 2 + 1 + 2)  # per seed: 2 mus x I x M runs, 3 REINFORCE runs
    again = results.main(args)
    assert [p.stat().st_mtime_ns for p in finished] == stamps
    first = smoke[2]["headlines"]
    assert {s: {n: h["score"] for n, h in hs.items()} for s, hs in again["headlines"].items()} == {
        s: {n: h["score"] for n, h in hs.items()} for s, hs in first.items()
    }  # the same models and draws: the same numbers


def test_report_only_recomputes_the_same_comparisons_from_the_saved_samples(smoke):
    out, args, result = smoke
    again = results.main(args + ["--report-only"])
    for seed, rows in result["comparisons"].items():
        for mine, theirs in zip(rows, again["comparisons"][seed], strict=True):
            assert mine["comparison"] == theirs["comparison"]
            assert mine["diff"] == pytest.approx(theirs["diff"], nan_ok=True, abs=1e-9)
    assert any("WARP LITI - REINFORCE SFT curve" in r["comparison"] for r in again["comparisons"][0])
