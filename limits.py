"""The limit of the testbed: the best reward any policy can reach at a given KL(pi || pi_sft), estimated
from completions of the SFT alone, so that a method's (KL, reward) point can be read as a gap to it.

Two curves, both from a table of N SFT completions per held-out prompt scored by the reward model:

- `optimum`: the KL-regularised optimum pi_beta(y|x) ∝ pi_sft(y|x) exp(r(x, y) / beta), which has the
  highest expected reward of any policy at its own KL(pi_beta || pi_sft). Per prompt, self-normalised
  importance weights w_i ∝ exp(r_i / beta) over the N samples give its reward sum_i w_i r_i and its KL
  sum_i w_i log(N w_i) (exact for the reweighted empirical distribution against the uniform one).
- `best_of_n`: the expected maximum reward of n SFT draws, with the standard bound
  KL <= log n - (n - 1) / n.

Both are against pi_sft at the evaluation temperature (the samples' temperature), which is the KL that
`evaluation.sample_and_score` measures. `gap_to_limit` reads a method's distance to a curve;
`sft_samples` caches the SFT table; `plot_limits` adds both curves to a Pareto plot.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from checkpoints import atomic_write_text
from evaluation import sample_and_score

# --- The two curves -----------------------------------------------------------------------------------


def _scores_by_prompt(samples) -> np.ndarray:
    """(P, N) float64 rewards, one row per prompt (in prompt order), from a table with `prompt`, `score`."""
    counts = samples.groupby("prompt")["score"].size()
    if counts.nunique() != 1:
        raise ValueError(f"every prompt needs the same number of samples, got {sorted(set(counts))}")
    ordered = samples.sort_values("prompt", kind="stable")
    return ordered["score"].to_numpy(np.float64).reshape(len(counts), int(counts.iloc[0]))


def default_betas(scores: np.ndarray, points: int = 36) -> np.ndarray:
    """Log-spaced betas from 10^1.5 down to 1e-2 times the within-prompt reward spread (std): the KL of
    pi_beta then runs from ~0 (beta large: weights ~uniform) to ~log N (beta small: all on the best)."""
    spread = float(np.sqrt(scores.var(axis=1).mean())) or 1.0
    return spread * np.logspace(1.5, -2, points)


def tilted_optimum(scores: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per prompt (rows of (P, N) `scores`): reward, KL to the uniform reweighting and effective sample
    size of pi_beta on the N samples, with w_i = softmax_i(r_i / beta)."""
    logits = scores / beta
    logw = logits - logits.max(axis=1, keepdims=True)
    logw -= np.log(np.exp(logw).sum(axis=1, keepdims=True))  # log w_i, normalised per prompt
    w = np.exp(logw)
    n = scores.shape[1]
    reward = (w * scores).sum(axis=1)
    kl = (w * (logw + math.log(n))).sum(axis=1)  # sum_i w_i log(N w_i), in [0, log N]
    ess = 1.0 / (w**2).sum(axis=1)  # 1 / sum_i w_i^2, in [1, N]
    return reward, kl, ess


def best_of_n_weights(n_samples: int, n: int) -> np.ndarray:
    """(N,) weight of the k-th smallest of N samples in E[max of n draws without replacement]:
    C(k-1, n-1) / C(N, n) (the k-th smallest is the maximum of C(k-1, n-1) of the C(N, n) subsets).
    In log space: w_n = 1 / C(N, n) and w_{k+1} / w_k = k / (k - n + 1), so N = 20,000 costs nothing."""
    log_first = math.lgamma(n + 1) + math.lgamma(n_samples - n + 1) - math.lgamma(n_samples + 1)
    k = np.arange(n, n_samples, dtype=np.float64)  # k = n .. N-1: the ratios to the next weight
    logw = log_first + np.concatenate([[0.0], np.cumsum(np.log(k) - np.log(k - n + 1))])
    return np.concatenate([np.zeros(n - 1), np.exp(logw)])


def limit_curves(
    samples,
    betas: Sequence[float] | None = None,
    *,
    min_ess: float = 10.0,
    kl_margin: float = 1.0,
):
    """The `optimum` and `best_of_n` curves of a table of per-sample SFT scores (columns `prompt`,
    `score`; N samples per prompt, as `sample_and_score` returns for the SFT).

    Columns: curve, beta (optimum) or n (best_of_n), score, kl, ess, ess_min, reliable. Per point, reward
    and KL are averaged per prompt and then over prompts, as `evaluation.summarise` does.

    optimum: the KL estimate is that of the reweighted sample, bounded by log N however far pi_beta
    really is from pi_sft, and it is dominated by few samples when the effective sample size
    1 / sum w_i^2 is small. `ess` is the median over prompts (a typical prompt), `ess_min` the smallest.
    A point is `reliable` when its KL <= log N - `kl_margin` and its `ess` >= `min_ess`. The estimated KL
    falls short of pi_beta's true KL as the ESS falls, but the (KL, reward) pair stays near the true
    frontier, a little below it: with Gaussian rewards and N = 256, 0.04 sd below at ESS 17 (KL 1.9) and
    0.07 sd at ESS 9 (KL 2.6); with bounded (uniform) rewards within 0.001 sd up to KL 2.9.

    best_of_n (n = 1, 2, 4, ... <= N): the exact expectation of the max of n draws without replacement
    from each prompt's N samples, sum_k r_(k) C(k-1, n-1) / C(N, n) with r sorted ascending. That is the
    U-statistic of the max: an unbiased estimate of E[max of n i.i.d. SFT draws] with no resampling
    noise; drawing with replacement from the N would count repeats and bias it low. `kl` is the bound
    log n - (n - 1) / n (the best-of-n policy's KL is at most that; equal for continuous rewards).
    """
    import pandas as pd

    scores = _scores_by_prompt(samples)
    n_samples = scores.shape[1]
    rows = []
    for beta in default_betas(scores) if betas is None else betas:
        reward, kl, ess = tilted_optimum(scores, float(beta))
        point = dict(score=reward.mean(), kl=kl.mean(), ess=float(np.median(ess)), ess_min=ess.min())
        reliable = point["kl"] <= math.log(n_samples) - kl_margin and point["ess"] >= min_ess
        rows.append(dict(curve="optimum", beta=float(beta), n=np.nan, **point, reliable=reliable))
    ascending = np.sort(scores, axis=1)
    n = 1
    while n <= n_samples:
        score = (ascending @ best_of_n_weights(n_samples, n)).mean()
        kl = math.log(n) - (n - 1) / n
        rows.append(dict(curve="best_of_n", beta=np.nan, n=n, score=score, kl=kl, ess=np.nan,
                         ess_min=np.nan, reliable=True))  # fmt: skip
        n *= 2
    out = pd.DataFrame(rows)
    return out.astype({"score": float, "kl": float, "ess": float, "ess_min": float, "reliable": bool})


def gap_to_limit(limit_curve, kl, score, curve: str = "optimum"):
    """A method's score minus the limit curve's score at the method's KL (the same for arrays of points).

    The curve's score at `kl` is the linear interpolation between its two neighbouring points (sorted by
    KL) that bracket `kl`, and only when both are reliable; elsewhere (outside the reliable range, or
    across an unreliable point) the gap is NaN: never extrapolated. `limit_curve` is `limit_curves`' frame
    (its `curve` rows are used) or one curve of it. The estimated optimum sits slightly below the true one
    (`limit_curves`), so a gap a little above 0 is estimation error, not a policy beating the optimum.
    """
    part = limit_curve[limit_curve["curve"] == curve] if "curve" in limit_curve else limit_curve
    part = part.sort_values("kl", kind="stable")
    xs, ys = part["kl"].to_numpy(float), part["score"].to_numpy(float)
    ok = part["reliable"].to_numpy(bool) if "reliable" in part else np.ones(len(xs), bool)
    kls, scores = np.broadcast_arrays(np.asarray(kl, float), np.asarray(score, float))
    gaps = np.full(kls.shape, np.nan)
    for idx, x in np.ndenumerate(kls):
        for i in range(len(xs) - 1):
            if xs[i] <= x <= xs[i + 1] and ok[i] and ok[i + 1]:
                w = (x - xs[i]) / (xs[i + 1] - xs[i]) if xs[i + 1] > xs[i] else 0.0
                gaps[idx] = scores[idx] - ((1 - w) * ys[i] + w * ys[i + 1])
                break
    return float(gaps) if gaps.ndim == 0 else gaps


# --- The SFT samples, computed once -------------------------------------------------------------------


def model_fingerprint(source: str | Path) -> str:
    """What a model is, for a cache key: a local folder (or file) by the SHA-256 of its files' names and
    bytes (hidden ones such as `.cache/` aside), so that a model retrained in the same folder is another
    model while a copy of it (a store pulled into a new session, new mtimes) is the same; anything else
    (a Hub id) by its name. Reads every byte: about a second per GB, against the minutes of a table."""
    path = Path(source)
    if not path.exists():
        return str(source)
    files = [path] if path.is_file() else sorted(
        f for f in path.rglob("*")
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)
    )  # fmt: skip
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.relative_to(path).as_posix()}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def sft_samples_key(
    sft: str,
    reward_model: str,
    prompt_rows: Sequence[Sequence[int]],
    *,
    n_samples: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
) -> dict:
    """What the SFT table depends on, with its `hash` for the file name: the two models by their contents
    (`model_fingerprint`; where they were read from is recorded in "paths", outside the hash), the prompts
    by their tokens, and the sampling settings."""
    key = dict(sft=model_fingerprint(sft), reward_model=model_fingerprint(reward_model), n_samples=n_samples,
               temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)  # fmt: skip
    prompts = hashlib.sha256(json.dumps([list(map(int, r)) for r in prompt_rows]).encode()).hexdigest()
    key["prompts"] = prompts
    key["hash"] = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    key["paths"] = {"sft": str(sft), "reward_model": str(reward_model)}
    return key


def sft_samples(
    cache_dir: str | Path,
    sft: str,
    reward_model: str,
    prompt_rows: list[list[int]],
    *,
    n_samples: int,
    temperature: float,
    max_new_tokens: int,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "cpu",
):
    """`sample_and_score`'s table of `n_samples` SFT completions per prompt, scored by the reward model;
    read from `cache_dir` when a table with the same key (`sft_samples_key`) is there, else computed
    (models loaded from `sft` and `reward_model`, sampling seeded with `seed`) and written atomically as
    `sft_samples-<hash>.csv` with its key beside it in a `.json`."""
    import pandas as pd

    import utils

    key = sft_samples_key(sft, reward_model, prompt_rows, n_samples=n_samples, temperature=temperature,
                          max_new_tokens=max_new_tokens, seed=seed)  # fmt: skip
    path = Path(cache_dir) / f"sft_samples-{key['hash']}.csv"
    if path.exists():
        return pd.read_csv(path, keep_default_na=False)
    policy, tokenizer = utils.load_policy(sft)
    policy.to(device).eval()
    rm, rm_tokenizer = utils.load_reward_model(reward_model)
    reward_fn = utils.make_reward_fn(rm.to(device), rm_tokenizer, tokenizer, batch_size, 512)
    torch.manual_seed(seed)
    table = sample_and_score(  # the SFT's own samples: KL 0, no log-prob passes
        policy, None, tokenizer, reward_fn, prompt_rows, samples_per_prompt=n_samples,
        max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size,
    )  # fmt: skip
    atomic_write_text(path.with_suffix(".json"), json.dumps(key, indent=2))
    atomic_write_text(path, table.to_csv(index=False))
    return table


# --- Plot ---------------------------------------------------------------------------------------------


def plot_limits(ax, limit_df) -> None:
    """Draw both curves on a (KL, reward) Axes: the optimum pi_beta as a line (dashed where unreliable),
    best-of-n as markers labelled with n."""
    opt = limit_df[limit_df["curve"] == "optimum"].sort_values("kl")
    good = opt[opt["reliable"]]
    ax.plot(good["kl"], good["score"], color="black", lw=1.5, label="limit: pi_beta (importance-weighted)")
    if len(good) < len(opt):  # dashed from the last reliable point on
        bad = opt[opt["kl"] >= (good["kl"].max() if len(good) else -np.inf)]
        ax.plot(bad["kl"], bad["score"], color="black", lw=1.0, ls="--", label="pi_beta, unreliable")
    bon = limit_df[limit_df["curve"] == "best_of_n"]
    ax.plot(bon["kl"], bon["score"], ls="none", marker="s", color="gray", label="best-of-n (KL bound)")
    for _, r in bon.iterrows():
        ax.annotate(f"n={int(r['n'])}", (r["kl"], r["score"]), fontsize=7, color="gray")
