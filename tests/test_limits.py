"""The limit of the testbed against closed forms: pi_beta on an enumerable categorical SFT, best-of-n on
uniform rewards, interpolation of the gap only between reliable neighbours, and the SFT table's cache."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pandas as pd
import pytest

import limits
from tests import tiny

# ------------------------------------------------------------------------------------------------------
# (a) pi_beta ∝ pi_sft exp(r / beta) on a categorical "vocabulary" of K = 6 outcomes
# ------------------------------------------------------------------------------------------------------

# two prompts: an SFT law over K = 6 completions each, and the reward of each completion
SFT_PROBS = np.array([[0.30, 0.25, 0.20, 0.12, 0.08, 0.05], [0.05, 0.10, 0.15, 0.20, 0.20, 0.30]])
REWARDS = np.array([[-2.0, -1.0, 0.0, 0.5, 1.5, 3.0], [1.0, -0.5, 2.0, -1.5, 0.0, -3.0]])


def exact_optimum(p: np.ndarray, r: np.ndarray, beta: float, sign: float = 1.0) -> tuple[float, float, float]:
    """Closed form per prompt, averaged over prompts: E_{pi_beta}[r], KL(pi_beta || pi_sft) and the
    reverse KL(pi_sft || pi_beta) (the wrong direction, to show the test separates them); `sign` -1
    tilts by exp(-r / beta) instead (a wrong sign, likewise)."""
    q = p * np.exp(sign * r / beta)
    q /= q.sum(axis=1, keepdims=True)
    reward = (q * r).sum(axis=1)
    kl = (q * np.log(q / p)).sum(axis=1)
    reverse = (p * np.log(p / q)).sum(axis=1)
    return reward.mean(), kl.mean(), reverse.mean()


def categorical_samples(n: int, seed: int = 0) -> pd.DataFrame:
    """n seeded draws per prompt from SFT_PROBS, scored by REWARDS, as `sample_and_score`'s table."""
    rng = np.random.default_rng(seed)
    rows = []
    for prompt, (p, r) in enumerate(zip(SFT_PROBS, REWARDS, strict=True)):
        draws = rng.choice(len(p), size=n, p=p)
        rows.append(pd.DataFrame({"prompt": prompt, "sample": np.arange(n), "score": r[draws]}))
    return pd.concat(rows, ignore_index=True).sample(frac=1.0, random_state=0)  # rows in any order


@pytest.mark.parametrize("beta", [0.25, 0.5, 1.0])
def test_optimum_matches_the_closed_form_on_a_categorical_sft(beta):
    """Reward and KL(pi_beta || pi_sft) from 20,000 SFT draws per prompt match the enumeration. The
    tolerance is well below what a wrong formula moves them by: KL the wrong way round, weights
    exp(-r / beta), or log N left out."""
    reward, kl, reverse = exact_optimum(SFT_PROBS, REWARDS, beta)
    flipped, _, _ = exact_optimum(SFT_PROBS, REWARDS, beta, sign=-1.0)
    assert abs(reverse - kl) > 0.1 and abs(flipped - reward) > 1.0  # the test can tell them apart
    curve = limits.limit_curves(categorical_samples(20_000), betas=[beta])
    point = curve[curve["curve"] == "optimum"].iloc[0]
    assert point["score"] == pytest.approx(reward, abs=0.03)
    assert point["kl"] == pytest.approx(kl, abs=0.02)
    assert point["ess"] > 1000 and bool(point["reliable"])


def test_optimum_per_prompt_matches_the_closed_form():
    """Per prompt, not only on average: a mean over prompts cannot hide one prompt's error."""
    df = categorical_samples(20_000, seed=1)
    scores = limits._scores_by_prompt(df)
    reward, kl, _ = limits.tilted_optimum(scores, 1.0)
    for i in range(2):
        want_r, want_kl, _ = exact_optimum(SFT_PROBS[i : i + 1], REWARDS[i : i + 1], 1.0)
        assert reward[i] == pytest.approx(want_r, abs=0.03) and kl[i] == pytest.approx(want_kl, abs=0.02)


def test_optimum_kl_and_ess_on_exact_weight_patterns():
    """beta -> inf: uniform weights, KL 0, ESS N, reward the SFT mean. beta -> 0 with k tied best
    samples: weight 1/k on each, KL log(N / k) exactly, ESS k, reward the best."""
    n, k = 16, 4
    r = np.array([[0.0] * (n - k) + [2.0] * k])
    reward, kl, ess = limits.tilted_optimum(r, 1e6)
    assert kl[0] == pytest.approx(0.0, abs=1e-9) and ess[0] == pytest.approx(n)
    assert reward[0] == pytest.approx(r.mean(), abs=1e-5)
    reward, kl, ess = limits.tilted_optimum(r, 1e-3)
    assert kl[0] == pytest.approx(math.log(n / k)) and ess[0] == pytest.approx(k) and reward[0] == 2.0


def test_default_grid_spans_kl_from_zero_to_log_n_and_flags_the_unreliable_end():
    """The default betas reach KL ~0 and ~log N; KL falls monotonically as beta grows and is never above
    log N; points with KL > log N - 1 or ESS < 10 are flagged, the low-KL end is not."""
    n = 64
    df = pd.DataFrame({"prompt": np.repeat(np.arange(20), n)})
    df["score"] = np.random.default_rng(0).normal(size=len(df))
    curve = limits.limit_curves(df)
    opt = curve[curve["curve"] == "optimum"]
    assert opt["kl"].min() < 0.01 and opt["kl"].max() > math.log(n) - 0.2
    assert (opt["kl"] <= math.log(n) + 1e-9).all()
    assert np.all(np.diff(opt.sort_values("beta")["kl"].to_numpy()) <= 1e-12)
    bad = (opt["kl"] > math.log(n) - 1) | (opt["ess"] < 10)
    assert (opt["reliable"] == ~bad).all() and bad.any() and (~bad).any()
    assert (opt["ess_min"] <= opt["ess"]).all()


def test_reliable_points_lie_near_the_true_frontier_for_gaussian_rewards():
    """r ~ N(0, 1): pi_beta is N(1 / beta, 1), so the best reward at KL k is sqrt(2 k). At every point
    flagged reliable (N = 256, 64 prompts) the curve is within 0.1 of that and not above it by more
    than noise; flagging on KL alone (ESS ignored) would admit points 0.2 or more below it."""
    n, prompts = 256, 64
    df = pd.DataFrame({"prompt": np.repeat(np.arange(prompts), n)})
    df["score"] = np.random.default_rng(2).normal(size=len(df))
    opt = limits.limit_curves(df, betas=np.geomspace(3.0, 0.1, 30))
    opt = opt[opt["curve"] == "optimum"]
    err = opt["score"] - np.sqrt(2 * opt["kl"])
    assert opt["reliable"].sum() >= 10
    assert (err[opt["reliable"]].abs() < 0.1).all() and (err[opt["reliable"]] < 0.03).all()
    kl_only = opt["kl"] <= math.log(n) - 1
    assert err[kl_only].min() < -0.2


def test_unequal_samples_per_prompt_are_refused():
    df = pd.DataFrame({"prompt": [0, 0, 1], "score": [0.0, 1.0, 2.0]})
    with pytest.raises(ValueError, match="same number of samples"):
        limits.limit_curves(df)


# ------------------------------------------------------------------------------------------------------
# (b) best-of-n against E[max of n uniforms] = n / (n + 1), and its KL bound
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_samples", [8, 256, 20_000])
def test_best_of_n_weights_give_the_exact_expectation_on_uniform_order_statistics(n_samples):
    """E[r_(k)] = k / (N + 1) for N uniforms, so the weights must turn it into n / (n + 1) exactly; with
    replacement (weights (k/N)^n - ((k-1)/N)^n) they would not. They sum to 1 and vanish below rank n."""
    expected_order = np.arange(1, n_samples + 1) / (n_samples + 1)
    for n in (1, 2, 3, 8, n_samples):
        w = limits.best_of_n_weights(n_samples, n)
        assert w.sum() == pytest.approx(1.0, rel=1e-9) and (w[: n - 1] == 0).all()
        assert w @ expected_order == pytest.approx(n / (n + 1), rel=1e-9)
        if n_samples <= 256:  # against the integers themselves
            exact = [math.comb(k - 1, n - 1) / math.comb(n_samples, n) for k in range(1, n_samples + 1)]
            assert np.allclose(w, exact, rtol=1e-9, atol=0)


def test_best_of_n_on_uniform_rewards_and_the_kl_bound():
    """Sampled Uniform(0, 1) rewards, N = 8 per prompt, 20,000 prompts: the curve's score is n / (n + 1)
    within 0.005 (drawing with replacement would give 0.837 at n = 8, not 0.889), n = 1, 2, 4, 8, and
    kl = log n - (n - 1) / n."""
    n_samples, prompts = 8, 20_000
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"prompt": np.repeat(np.arange(prompts), n_samples), "score": rng.random(prompts * 8)})
    bon = limits.limit_curves(df, betas=[1.0])
    bon = bon[bon["curve"] == "best_of_n"]
    assert bon["n"].tolist() == [1, 2, 4, 8]
    for _, row in bon.iterrows():
        n = row["n"]
        assert row["score"] == pytest.approx(n / (n + 1), abs=0.005)
        assert row["kl"] == pytest.approx(math.log(n) - (n - 1) / n, abs=1e-12)
    assert bon["reliable"].all()


# ------------------------------------------------------------------------------------------------------
# (c) gap_to_limit: between reliable neighbours only, NaN elsewhere
# ------------------------------------------------------------------------------------------------------


def curve_frame(kl, score, reliable, curve="optimum") -> pd.DataFrame:
    return pd.DataFrame({"curve": curve, "kl": kl, "score": score, "reliable": reliable})


def test_gap_interpolates_between_neighbours_and_is_nan_outside():
    """At KL 0.5 the neighbours are (0, 0) and (1, 1): the limit is 0.5 (interpolating from (0, 0) to the
    last reliable point (2, 1.5) would give 0.375). Beyond the last reliable point, below the first and
    above the last: NaN."""
    frame = curve_frame([0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 1.5, 1.8], [True, True, True, False])
    assert limits.gap_to_limit(frame, 0.5, 1.0) == pytest.approx(0.5)
    assert limits.gap_to_limit(frame, 1.5, 1.0) == pytest.approx(1.0 - 1.25)
    assert limits.gap_to_limit(frame, 2.0, 1.5) == pytest.approx(0.0)  # on a point
    for kl in (2.5, 3.0, -0.1, 4.0):
        assert math.isnan(limits.gap_to_limit(frame, kl, 1.0)), kl


def test_gap_never_bridges_an_unreliable_point_and_takes_arrays_and_a_curve():
    """An unreliable point in the middle leaves a hole; arrays give arrays; rows of other curves are
    ignored, and `curve` picks which one."""
    frame = pd.concat(
        [
            curve_frame([2.0, 0.0, 1.0, 3.0], [2.0, 0.0, 1.0, 3.0], [True, True, False, True]),  # unsorted
            curve_frame([0.0, 3.0], [10.0, 40.0], [True, True], curve="best_of_n"),
        ]
    )
    gaps = limits.gap_to_limit(frame, np.array([0.5, 1.5, 2.5]), np.array([1.0, 1.0, 1.0]))
    assert math.isnan(gaps[0]) and math.isnan(gaps[1]) and gaps[2] == pytest.approx(1.0 - 2.5)
    assert limits.gap_to_limit(frame, 1.5, 30.0, curve="best_of_n") == pytest.approx(30.0 - 25.0)


def test_gap_on_a_real_curve_is_zero_on_it_and_positive_above_it():
    df = categorical_samples(2_000)
    curve = limits.limit_curves(df)
    opt = curve[(curve["curve"] == "optimum") & curve["reliable"]].sort_values("kl")
    mid = opt.iloc[len(opt) // 2]
    assert limits.gap_to_limit(curve, mid["kl"], mid["score"]) == pytest.approx(0.0, abs=1e-9)
    assert limits.gap_to_limit(curve, mid["kl"], mid["score"] - 0.1) == pytest.approx(-0.1, abs=1e-9)


# ------------------------------------------------------------------------------------------------------
# (d) the SFT table is computed once per key
# ------------------------------------------------------------------------------------------------------

KEY = dict(n_samples=4, temperature=0.9, max_new_tokens=3, seed=0)


@pytest.mark.parametrize(
    "change",
    [
        dict(sft="other"),
        dict(reward_model="other"),
        dict(prompt_rows=[[5, 6, 8]]),
        dict(n_samples=8),
        dict(temperature=1.0),
        dict(max_new_tokens=4),
        dict(seed=1),
    ],  # fmt: skip
)
def test_every_field_of_the_key_changes_the_hash(change):
    base = dict(sft="s", reward_model="r", prompt_rows=[[5, 6, 7]], **KEY)
    assert limits.sft_samples_key(**base)["hash"] != limits.sft_samples_key(**{**base, **change})["hash"]
    assert limits.sft_samples_key(**base)["hash"] == limits.sft_samples_key(**dict(base))["hash"]


def test_sft_samples_are_cached_and_recomputed_when_the_key_changes(tmp_path, monkeypatch):
    """A tiny saved SFT and reward model: the first call samples and writes the table, the second reads
    it back (same scores and texts, no sampling), a changed temperature or prompt set samples again."""
    sft, rm = tiny.save_tiny_policy(tmp_path / "sft"), tiny.save_tiny_reward(tmp_path / "rm")
    calls = []
    real = limits.sample_and_score

    def counting(*args, **kwargs):
        calls.append(kwargs["temperature"])
        return real(*args, **kwargs)

    monkeypatch.setattr(limits, "sample_and_score", counting)
    cache, rows = tmp_path / "cache", [[5, 6, 7], [8, 9, 10]]
    first = limits.sft_samples(cache, sft, rm, rows, **KEY)
    assert len(calls) == 1 and len(first) == 2 * KEY["n_samples"]
    assert len(list(cache.glob("sft_samples-*.csv"))) == 1 and len(list(cache.glob("*.json"))) == 1
    again = limits.sft_samples(cache, sft, rm, rows, **KEY)
    assert len(calls) == 1
    assert np.allclose(again["score"], first["score"], rtol=0, atol=1e-12)
    assert again["completion"].tolist() == first["completion"].tolist()
    limits.sft_samples(cache, sft, rm, rows, **{**KEY, "temperature": 1.0})
    limits.sft_samples(cache, sft, rm, rows[:1], **KEY)
    assert calls == [0.9, 1.0, 0.9] and len(list(cache.glob("sft_samples-*.csv"))) == 3


@pytest.mark.parametrize("retrained", ["reward_model", "sft"])
def test_a_model_retrained_in_its_folder_is_another_key_and_a_copy_the_same(tmp_path, monkeypatch, retrained):
    """The cache keys the models by their contents, not their folders: a reward model (01 rerun) or an SFT
    rewritten in the same folder samples and scores again, and the table is the new model's; a copy of
    both folders elsewhere with new mtimes (a store pulled into a new session) reads the cached table."""
    sft, rm = tiny.save_tiny_policy(tmp_path / "sft"), tiny.save_tiny_reward(tmp_path / "rm")
    calls, real = [], limits.sample_and_score
    monkeypatch.setattr(limits, "sample_and_score", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    cache, rows = tmp_path / "cache", [[5, 6, 7], [8, 9, 10]]
    first = limits.sft_samples(cache, sft, rm, rows, **KEY)
    if retrained == "reward_model":
        tiny.save_tiny_reward(tmp_path / "rm", seed=1)  # same architecture: files of the same sizes
    else:
        tiny.save_tiny_policy(tmp_path / "sft", seed=1)
    second = limits.sft_samples(cache, sft, rm, rows, **KEY)
    assert len(calls) == 2 and len(list(cache.glob("sft_samples-*.csv"))) == 2
    fresh = limits.sft_samples(tmp_path / "fresh", sft, rm, rows, **KEY)  # what the new models give
    assert np.allclose(second["score"], fresh["score"], rtol=0, atol=1e-12)
    assert not np.allclose(second["score"], first["score"], rtol=0, atol=1e-6)
    copies = [
        shutil.copytree(tmp_path / m, tmp_path / "pulled" / m, copy_function=shutil.copy)
        for m in ("sft", "rm")
    ]
    calls.clear()
    again = limits.sft_samples(cache, str(copies[0]), str(copies[1]), rows, **KEY)
    assert not calls and np.allclose(again["score"], second["score"], rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------------
# plot
# ------------------------------------------------------------------------------------------------------


def test_plot_limits_draws_the_reliable_line_solid_the_rest_dashed_and_best_of_n_markers():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = limits.limit_curves(categorical_samples(64))
    fig, ax = plt.subplots()
    limits.plot_limits(ax, curve)
    styles = {line.get_label(): line for line in ax.get_lines()}
    solid = styles["limit: pi_beta (importance-weighted)"]
    assert solid.get_linestyle() == "-"
    assert max(solid.get_xdata()) <= curve.loc[curve["reliable"] & (curve["curve"] == "optimum"), "kl"].max()
    assert styles["pi_beta, unreliable"].get_linestyle() == "--"
    markers = styles["best-of-n (KL bound)"]
    assert markers.get_linestyle() == "None" and len(markers.get_xdata()) == 7  # n = 1, ..., 64
    plt.close(fig)
