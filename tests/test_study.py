"""The offline study (`bench/study`): the arms hold the paper's controls and the issue's power, the report's
statistics are right on data whose answer is known, and the command runs at toy size, pairs every model
of a seed on the same prompts and draws, gives each seed its own draws, and resumes instead of redoing."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.study import arms, report, runner
from tests import tiny

# ------------------------------------------------------------------------------------------------------
# The arms
# ------------------------------------------------------------------------------------------------------


def test_the_full_study_has_the_controls_the_dose_and_the_power():
    s = arms.FULL
    assert len(s.seeds) >= 6 and s.n_prompts >= 384 and s.samples_per_prompt >= 2
    assert any(r.mu * r.steps >= 4 for r in s.regimes) and s.iterations >= 2  # the anchor really moves
    assert any(r.steps == 25 for r in s.regimes)
    curves = arms.curves_of(s)
    for r in s.regimes:  # M = 1 with its LITI sweep, M = 2 and M = 4 SLERP, LERP of the same 2 runs
        for kind in ("M=1", "M=2 SLERP", "M=4 SLERP", "iter2 M=2 SLERP"):  # fronts: every eta
            assert [m.eta for m in curves[f"{r.name} {kind}"][1:]] == list(s.etas), kind
        assert [m.eta for m in curves[f"{r.name} M=2 LERP"][1:]] == [1.0]  # LERP: the merge alone
    merges = {m.name: m for m in arms.merges_of(s)}
    first = f"{s.regimes[0].name}/iter1"
    assert merges[f"{first}/lerp2"].runs == merges[f"{first}/slerp2"].runs  # LERP of the same 2 runs
    assert merges[f"{first}/slerp4"].runs[:2] == merges[f"{first}/slerp2"].runs
    assert {0.1, 0.3, 1.0} <= set(s.sft_betas) and len(s.sft_betas) >= 4 and s.snapshot_every <= 10
    trajectories = [c for c in curves if c.startswith("REINFORCE")]
    assert len(trajectories) == 1 + len(s.sft_betas)
    for c in trajectories:  # a snapshot every snapshot_every steps, from the SFT
        steps = [m.step for m in curves[c][1:]]
        assert steps == list(range(s.snapshot_every, steps[-1] + 1, s.snapshot_every))


def test_every_comparison_reads_curves_that_exist_and_every_claim_has_a_headline():
    for study in (arms.FULL, arms.QUICK, arms.SMOKE):
        curves = arms.curves_of(study)
        for c in arms.comparisons_of(study):
            for side in (c.better, c.worse):
                for name in side.removeprefix("envelope:").removesuffix("@end").split("|"):
                    assert name in curves, (c.label, name)
            assert (c.kl is None) == (c.better.endswith("@end") or c.worse.endswith("@end")), c.label
        assert {c.claim for c in arms.comparisons_of(study) if c.headline} == set(arms.CLAIMS)


def test_runs_have_distinct_seeds_across_regimes_iterations_and_training_seeds():
    seeds = [r.seed for s in range(6) for r in arms.runs_of(arms.FULL, s)]
    assert len(seeds) == len(set(seeds))


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(seeds=(0, 0)), "distinct"),
        (dict(etas=(0.5, 0.25, 1.0)), "etas"),
        (dict(etas=(0.5,)), "ending at 1"),
        (dict(runs=2), "M = 4"),
        (dict(ema_steps=25), "multiple of snapshot_every"),
        (dict(regimes=(arms.Regime("x", 10, 0.0),)), "mu in (0, 1]"),
    ],
)
def test_a_bad_study_is_refused_before_anything_runs(change, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        dataclasses.replace(arms.FULL, **change)


def test_the_anchor_travel_is_the_ema_closed_form():
    assert arms.anchor_travel(arms.Regime("a", 25, 0.01)) == pytest.approx(0.222, abs=1e-3)
    assert arms.anchor_travel(arms.Regime("b", 100, 0.04)) == pytest.approx(1 - 0.96**100)


# ------------------------------------------------------------------------------------------------------
# The report's statistics, on tables whose answer is known
# ------------------------------------------------------------------------------------------------------


def test_read_interpolates_between_neighbours_only_and_never_extrapolates():
    kls = np.array([[0.0], [1.0], [3.0]])
    vals = np.array([[0.0], [2.0], [3.0]])
    got = [float(report.read(kls, vals, np.array([k]))[0]) for k in (0.5, 1.0, 2.0, 3.0)]
    assert got == pytest.approx([1.0, 2.0, 2.5, 3.0])
    assert np.isnan(report.read(kls, vals, np.array([3.5]))[0])
    assert np.isnan(report.read(kls, vals, np.array([-0.1]))[0])
    missing = np.array([[0.0], [np.nan], [3.0]])  # a point not evaluated breaks the curve there
    assert np.isnan(report.read(missing, vals, np.array([0.5]))[0])


TOY = dataclasses.replace(arms.SMOKE, kl_points=(0.5,))
SLERP = "T2 M=2 SLERP"


def toy_tables(effect: float, seed_sd: float, prompt_sd: float, n_seeds: int = 6, n_prompts: int = 64,
               rng=None, reach: float = 10.0) -> dict:  # fmt: skip
    """Per-prompt tables of TOY's models: every curve is reward = KL on a line, except that the M = 2 SLERP
    point sits `effect` (+ a seed effect + prompt noise) above it; `reach` cuts the M = 1 front short."""
    rng = rng or np.random.default_rng(0)
    models = arms.models_of(TOY)
    kl_of = {m.name: 0.3 + 0.05 * i for i, m in enumerate(models)}
    kl_of.update({"SFT": 0.0, "T2 M=1 eta=0.5": 1.0, "T2 M=1 eta=1.0": 2.0})  # M = 1 reaches every point
    out = {}
    for s in range(n_seeds):
        bump = effect + seed_sd * rng.standard_normal()
        rows = []
        for m in models:
            kl = np.full(n_prompts, kl_of[m.name]) + 0.01 * rng.standard_normal(n_prompts)
            if m.name.startswith("T2 M=1") and kl_of[m.name] > reach:
                continue
            score = kl + prompt_sd * rng.standard_normal(n_prompts)
            if m.name == "T2 M=2 SLERP eta=1.0":
                score = score + bump
            rows.append(pd.DataFrame(dict(model=m.name, prompt=np.arange(n_prompts), score=score, kl=kl,
                                          gold=score, ref_nll=1.0, length=4)))  # fmt: skip
        out[s] = pd.concat(rows, ignore_index=True)
    return out


def slerp_vs_one(tables, replicates=400):
    c = arms.Comparison("slerp_vs_one", "M=2 SLERP - M=1 front, at SLERP's KL", f"{SLERP}@end", "T2 M=1")
    means = report.Means(tables, replicates)
    return report.Reader(dataclasses.replace(TOY, seeds=tuple(tables)), means, None).compare(c, "score")


def test_a_point_on_the_curve_differs_by_zero_and_one_above_it_by_its_height():
    assert slerp_vs_one(toy_tables(0.0, 0.0, 0.0))["estimate"] == pytest.approx(0.0, abs=1e-9)
    got = slerp_vs_one(toy_tables(0.3, 0.0, 0.0))
    assert got["estimate"] == pytest.approx(0.3, abs=1e-9) and got["seeds"] == 6


def test_the_interval_counts_the_seeds_not_only_the_prompts():
    """No prompt noise, a large seed effect: a bootstrap over prompts alone would give a zero-width
    interval; over seeds it is about as wide as a t-interval of the seed effects."""
    tables = toy_tables(0.0, 0.5, 0.0, rng=np.random.default_rng(3))
    got = slerp_vs_one(tables, replicates=2000)
    bumps = [t[t.model == f"{SLERP} eta=1.0"].score.mean() - t[t.model == f"{SLERP} eta=1.0"].kl.mean()
             for t in tables.values()]  # fmt: skip
    se = np.std(bumps, ddof=1) / math.sqrt(len(bumps))
    assert got["estimate"] == pytest.approx(np.mean(bumps), abs=1e-3)
    assert 2.5 * se < got["hi"] - got["lo"] < 5 * se


def test_the_interval_covers_the_true_effect_about_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    hits = [
        (lambda r: r["lo"] <= 0.2 <= r["hi"])(slerp_vs_one(toy_tables(0.2, 0.1, 0.5, rng=rng), 300))
        for _ in range(60)
    ]
    assert 0.85 <= np.mean(hits) <= 1.0, np.mean(hits)  # percentile bootstrap with 6 seeds: a little under


def test_a_seed_whose_curve_does_not_reach_is_counted_not_hidden():
    tables = toy_tables(0.3, 0.0, 0.0)
    short = toy_tables(0.3, 0.0, 0.0, reach=0.45)  # M = 1's front stops at the SFT
    tables[5] = short[5]
    got = slerp_vs_one(tables)
    assert got["seeds"] == 5 and got["estimate"] == pytest.approx(0.3, abs=1e-9)


def test_the_envelope_is_the_best_curve_at_each_kl():
    means = report.Means(toy_tables(0.0, 0.0, 0.0, n_seeds=2), 10)
    reader = report.Reader(dataclasses.replace(TOY, seeds=(0, 1)), means, None)
    at = np.full(11, 0.5)
    a = reader.side(0, "REINFORCE SFT beta=0.1", "score", at)[1]
    b = reader.side(0, "REINFORCE SFT beta=1.0", "score", at)[1]
    env = reader.side(0, "envelope:REINFORCE SFT beta=0.1|REINFORCE SFT beta=1.0", "score", at)[1]
    assert np.allclose(env, np.fmax(a, b), equal_nan=True)


def test_a_model_on_the_limit_curve_has_a_gap_of_zero():
    import limits

    rng = np.random.default_rng(0)
    scores = rng.standard_normal((64, 32))
    beta = float(limits.default_betas(scores)[14])
    reward, kl, _ = limits.tilted_optimum(scores, beta)
    tables = toy_tables(0.0, 0.0, 0.0, n_seeds=2, n_prompts=64)
    for t in tables.values():
        on = t.model == "T2 M=2 SLERP eta=1.0"
        t.loc[on, "score"], t.loc[on, "kl"] = reward, kl
    means = report.Means(tables, 50)
    reader = report.Reader(dataclasses.replace(TOY, seeds=(0, 1)), means, scores)
    gap = reader.gap("T2 M=2 SLERP eta=1.0")
    assert gap["estimate"] == pytest.approx(0.0, abs=1e-9) and gap["lo"] <= 0 <= gap["hi"]
    assert reader.gap("T2 M=2 LERP eta=1.0")["estimate"] < 0  # reward = KL lies far below pi_beta


# ------------------------------------------------------------------------------------------------------
# The command at toy size
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from bench.study.__main__ import main

    d = tmp_path_factory.mktemp("study")
    (d / "data").mkdir()
    for split, n in (("train", 120), ("test", 40)):
        with open(d / "data" / f"{split}.jsonl", "w") as f:
            for i, text in enumerate(tiny.corpus(n)):
                f.write(json.dumps({"text": text, "label": i % 2}) + "\n")
    args = [
        "--smoke", "--out", str(d / "out"), "--data", str(d / "data"), "--bootstrap", "100",
        "--sft", tiny.save_tiny_policy(d / "sft"), "--reference", tiny.save_tiny_policy(d / "ref", seed=1),
        "--reward-model", tiny.save_tiny_reward(d / "rm"),
    ]  # fmt: skip
    return d / "out", args, main(args)


def test_the_command_writes_the_report_and_every_model_of_every_seed(smoke):
    out, _, result = smoke
    for name in ("study.md", "study.json", "pareto.png", "gold.png", "evaluated/limit.csv.gz"):
        assert (out / name).stat().st_size > 0, name
    names = {m.name for m in arms.models_of(arms.SMOKE)}
    for seed in arms.SMOKE.seeds:
        table = pd.read_csv(runner.result_path(out, seed))
        assert set(table.model) == names
        assert table.groupby("model").prompt.apply(tuple).nunique() == 1  # the same prompts for all
    assert result["seeds"] == list(arms.SMOKE.seeds)
    assert "## The paper's claims" in (out / "study.md").read_text()
    limit = pd.read_csv(runner.limit_path(out))  # its parts joined: every prompt, N samples each
    assert len(runner.limit_parts(arms.SMOKE)) == 2 and len(limit) == len(limit.drop_duplicates())
    assert limit.groupby("prompt").size().to_dict() == dict.fromkeys(range(4), arms.SMOKE.limit_samples)


def test_models_of_a_seed_share_draws_and_seeds_do_not(smoke):
    out = smoke[0]
    sft = [pd.read_csv(runner.seed_dir(out, s) / "eval" / "SFT.csv", keep_default_na=False) for s in (0, 1)]
    assert sft[0].prompt.tolist() == sft[1].prompt.tolist()
    assert sft[0].completion.tolist() != sft[1].completion.tolist()  # each seed its own sampling seed
    again = pd.read_csv(runner.seed_dir(out, 0) / "eval" / "T2_M=1_eta=0.5.csv", keep_default_na=False)
    assert len(again) == len(sft[0])


def test_a_rerun_reads_back_and_an_interrupted_seed_redoes_only_what_is_missing(smoke):
    from bench.study.__main__ import main

    out, args, _ = smoke
    kept = sorted((runner.seed_dir(out, 0)).glob("**/metrics.json")) + [runner.result_path(out, 1)]
    kept += sorted((out / "limit_cache").glob("sft_samples-*.csv"))  # the limit's parts
    stamps = [p.stat().st_mtime_ns for p in kept]
    runner.result_path(out, 0).unlink()  # seed 0 "killed" after training, one evaluation lost
    lost = runner.seed_dir(out, 0) / "eval" / "T2_M=2_SLERP_eta=1.0.csv"
    lost.unlink()
    limit = pd.read_csv(runner.limit_path(out))
    runner.limit_path(out).unlink()  # killed before the limit's parts were joined
    main(args)
    assert [p.stat().st_mtime_ns for p in kept] == stamps  # no run retrained, seed 1 and no part redone
    assert lost.exists() and runner.result_path(out, 0).exists()
    pd.testing.assert_frame_equal(pd.read_csv(runner.limit_path(out)), limit)


# ------------------------------------------------------------------------------------------------------
# The committed study
# ------------------------------------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[1] / "docs" / "study"


@pytest.mark.skipif(not (DOCS / "evaluated").exists(), reason="no study committed")
def test_the_committed_report_is_what_its_committed_tables_give(tmp_path):
    """docs/study's numbers are recomputed from the per-prompt tables beside them (`--report-only`)."""
    import shutil

    shutil.copytree(DOCS / "evaluated", tmp_path / "evaluated")
    committed = json.loads((DOCS / "study.json").read_text())
    got = report.write(tmp_path, arms.FULL, replicates=committed["replicates"])
    assert got["seeds"] == committed["seeds"] and len(got["comparisons"]) == len(committed["comparisons"])
    for mine, theirs in zip(got["comparisons"], committed["comparisons"], strict=True):
        assert mine["label"] == theirs["label"]
        for col in ("score", "gold"):
            for key in ("estimate", "lo", "hi"):
                a, b = mine[col][key], theirs[col][key]
                assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-6), mine["label"]


def test_best_of_n_reads_as_a_lower_bound_on_the_limit():
    """A model at best-of-4's (KL bound, expected max) has a best-of-n gap of 0 and lies at or below
    pi_beta (best-of-n is a policy, so the optimum at its KL is at least as high)."""
    import limits

    scores = np.random.default_rng(1).standard_normal((64, 32))
    bon = limits.limit_curves(pd.DataFrame({"prompt": np.repeat(np.arange(64), 32), "score": scores.ravel()}))
    four = bon[(bon.curve == "best_of_n") & (bon.n == 4)].iloc[0]
    tables = toy_tables(0.0, 0.0, 0.0, n_seeds=2, n_prompts=64)
    for t in tables.values():
        on = t.model == f"{SLERP} eta=1.0"
        t.loc[on, "score"], t.loc[on, "kl"] = four.score, four.kl
    reader = report.Reader(dataclasses.replace(TOY, seeds=(0, 1)), report.Means(tables, 50), scores)
    assert reader.gap(f"{SLERP} eta=1.0", "best_of_n")["estimate"] == pytest.approx(0.0, abs=1e-9)
    assert reader.gap(f"{SLERP} eta=1.0")["estimate"] <= 1e-9
