"""The offline study's report: from the per-prompt tables the runner writes, every comparison of
`arms.comparisons_of` pooled over training seeds with a 95% interval, each model's gap to the testbed's
limit, the claims table, and the plots.

Intervals: a bootstrap that resamples the two shared sources of noise at once, the held-out prompts
(the same for every seed: one multinomial reweighting of the prompts per replicate, applied to every
seed) and the training seeds (drawn with replacement); the evaluation sampling noise differs between
seeds (each has its own sampling seed) and within a prompt, so it is in both. In every replicate the
matched-KL reading is redone from that replicate's means: which two neighbouring points bracket the KL,
and the interpolation weight between them. A seed whose curve does not reach the KL gives no value (it is
counted, not hidden); the pooled difference is the mean over the seeds that have one. The limit
(`limits.tilted_optimum`, per prompt) is recomputed from the same reweighted prompts.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from pathlib import Path

import numpy as np

from bench.study import arms, runner

COLUMNS = ("score", "kl", "gold", "ref_nll")


@contextlib.contextmanager
def quiet():
    """No numpy warnings for NaNs: a seed or curve without a value is expected, and counted."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


# ------------------------------------------------------------------------------------------------------
# Data and resampling
# ------------------------------------------------------------------------------------------------------


class Means:
    """Per seed, model and column, the mean over prompts in each bootstrap replicate (replicate 0 is the
    data itself), and which seeds each replicate draws."""

    def __init__(self, tables: dict[int, object], replicates: int, rng_seed: int = 0):
        self.seeds = sorted(tables)
        prompts = sorted(set().union(*(set(t["prompt"]) for t in tables.values())))
        self.n_prompts = len(prompts)
        rng = np.random.default_rng(rng_seed)
        p = self.n_prompts
        weights = rng.multinomial(p, np.full(p, 1 / p), size=replicates) / p
        self.weights = np.vstack([np.full(p, 1 / p), weights])  # (R, P)
        s = len(self.seeds)
        self.seed_draws = np.vstack([np.arange(s), rng.integers(0, s, size=(replicates, s))])  # (R, S)
        self.models: dict[int, dict[str, dict[str, np.ndarray]]] = {}
        for seed, t in tables.items():
            self.models[seed] = {}
            for name, part in t.groupby("model"):
                part = part.set_index("prompt").reindex(prompts)
                if part["score"].isna().any():
                    raise ValueError(f"seed {seed}: {name} lacks some held-out prompts")
                self.models[seed][name] = {c: self.weights @ part[c].to_numpy(float) for c in COLUMNS}

    def get(self, seed: int, model: str, col: str) -> np.ndarray:
        """(R,) means; NaN when the model was not evaluated for this seed (past `kl_cap`)."""
        m = self.models[seed].get(model)
        return m[col] if m is not None else np.full(len(self.weights), np.nan)

    def pool(self, per_seed: np.ndarray) -> np.ndarray:
        """(S, R) per-seed values -> (R,) means over each replicate's drawn seeds (NaN seeds left out)."""
        drawn = per_seed[self.seed_draws.T, np.arange(per_seed.shape[1])]  # (S, R)
        with quiet():
            return np.nanmean(drawn, axis=0)


def read(kls: np.ndarray, values: np.ndarray, at: np.ndarray) -> np.ndarray:
    """A curve's value at KL `at`, per replicate: (n, R) KLs and values of its points in curve order,
    (R,) targets. Linear between the first pair of neighbouring points that brackets the target; NaN
    where none does (no extrapolation) or a point is missing."""
    out = np.full(at.shape, np.nan)
    for i in range(len(kls) - 1):
        lo, hi = kls[i], kls[i + 1]
        with np.errstate(all="ignore"):
            hit = np.isnan(out) & (np.minimum(lo, hi) <= at) & (at <= np.maximum(lo, hi))
            w = np.where(hi != lo, (at - lo) / (hi - lo), 0.0)
        out = np.where(hit, values[i] + w * (values[i + 1] - values[i]), out)
    return out


def summary(pooled: np.ndarray) -> dict:
    """Estimate (replicate 0) and the 95% percentile interval of the others."""
    rest = pooled[1:][~np.isnan(pooled[1:])]
    lo, hi = np.percentile(rest, [2.5, 97.5]) if len(rest) else (np.nan, np.nan)
    return {"estimate": float(pooled[0]), "lo": float(lo), "hi": float(hi),
            "replicates": int(len(rest))}  # fmt: skip


# ------------------------------------------------------------------------------------------------------
# Comparisons
# ------------------------------------------------------------------------------------------------------


class Reader:
    """Curves, points and the limit of one study, read per seed and replicate."""

    def __init__(self, study: arms.Study, means: Means, limit_scores: np.ndarray | None):
        self.study, self.means = study, means
        self.curves = {k: [m.name for m in v] for k, v in arms.curves_of(study).items()}
        self.limit = None
        if limit_scores is not None:
            import limits

            betas = limits.default_betas(limit_scores)
            n = limit_scores.shape[1]
            rk = [limits.tilted_optimum(limit_scores, float(b)) for b in betas]
            reward = np.stack([r for r, _, _ in rk], axis=1)  # (P, G)
            kl = np.stack([k for _, k, _ in rk], axis=1)
            ess = np.stack([np.median(e) for _, _, e in rk])
            ok = (kl.mean(0) <= math.log(n) - 1) & (ess >= 10)
            last = int(np.argmin(ok)) if not ok.all() else len(ok)  # reliable up to the first failure
            self.limit = (means.weights @ kl[:, :last], means.weights @ reward[:, :last])  # (R, G')
            self.limit_reach = float(kl[:, :last].mean(0).max()) if last else 0.0
            # best-of-n: achievable, with KL at most log n - (n - 1) / n, so a lower bound on the limit
            ns = [2**j for j in range(int(math.log2(n)) + 1)]
            ascending = np.sort(limit_scores, axis=1)
            per_prompt = np.stack([ascending @ limits.best_of_n_weights(n, k) for k in ns], axis=1)
            bound = np.array([math.log(k) - (k - 1) / k for k in ns])
            self.best_of_n = (
                np.broadcast_to(bound, (len(means.weights), len(ns))),
                means.weights @ per_prompt,
            )

    def points(self, seed: int, curve: str, col: str) -> tuple[np.ndarray, np.ndarray]:
        names = self.curves[curve]
        kls = np.stack([self.means.get(seed, n, "kl") for n in names])
        return kls, np.stack([self.means.get(seed, n, col) for n in names])

    def side(self, seed: int, spec: str, col: str, at: np.ndarray | None):
        """(kl, value) of a `name@end` point, or a curve's (or envelope's) value at `at`."""
        if spec.endswith("@end"):
            kls, vals = self.points(seed, spec.removesuffix("@end"), col)
            return kls[-1], vals[-1]
        if at is None:
            raise ValueError(f"{spec}: a curve needs a KL to be read at")
        names = spec.removeprefix("envelope:").split("|")
        reads = np.stack([read(*self.points(seed, n, col), at) for n in names])
        with quiet():
            return at, np.nanmax(reads, axis=0)

    def limit_at(self, at: np.ndarray, curve: str = "optimum") -> np.ndarray:
        """The limit's reward at KL `at` per replicate: pi_beta (NaN past its reliable range), or the
        best-of-n curve (a lower bound on the limit, to KL log N)."""
        if self.limit is None:
            return np.full(at.shape, np.nan)
        kl, reward = self.limit if curve == "optimum" else self.best_of_n
        return read(kl.T, reward.T, at)

    def compare(self, c: arms.Comparison, col: str) -> dict:
        """One comparison pooled over seeds: its estimate and interval, the seeds with a value, and the
        room the limit leaves above the worse side at the same KL."""
        diffs, rooms = [], []
        for seed in self.means.seeds:
            r = len(self.means.weights)
            at = None if c.kl is None else np.full(r, float(c.kl))
            if at is None:  # one side is a point: its KL is where the other is read
                point = c.better if c.better.endswith("@end") else c.worse
                at, _ = self.side(seed, point, col, None)
            _, better = self.side(seed, c.better, col, at)
            _, worse = self.side(seed, c.worse, col, at)
            diffs.append(better - worse)
            limit = np.fmax(self.limit_at(at), self.limit_at(at, "best_of_n"))  # best-of-n past pi_beta
            rooms.append(limit - worse if col == "score" else np.full(r, np.nan))
        diffs, rooms = np.stack(diffs), np.stack(rooms)
        out = summary(self.means.pool(diffs))
        out["seeds"] = int((~np.isnan(diffs[:, 0])).sum())
        out["room"] = summary(self.means.pool(rooms))
        return out

    def model(self, name: str, col: str) -> dict:
        return summary(self.means.pool(np.stack([self.means.get(s, name, col) for s in self.means.seeds])))

    def gap(self, name: str, curve: str = "optimum") -> dict:
        """Score minus the limit (`curve`: pi_beta, NaN beyond its reliable range, or best-of-n) at the
        model's KL, pooled over seeds."""
        gaps = [
            self.means.get(s, name, "score") - self.limit_at(self.means.get(s, name, "kl"), curve)
            for s in self.means.seeds
        ]
        return summary(self.means.pool(np.stack(gaps)))


# ------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------


def load(out: Path, study: arms.Study):
    """The finished seeds' tables ({seed: DataFrame}), their metadata, and the limit's (P, N) scores."""
    import pandas as pd

    tables, meta = {}, {}
    for seed in study.seeds:
        path = runner.result_path(out, seed)
        if path.exists():
            tables[seed] = pd.read_csv(path)
            meta[seed] = json.loads(runner.meta_path(path).read_text())
    limit = None
    if runner.limit_path(out).exists():
        import limits

        limit = limits._scores_by_prompt(pd.read_csv(runner.limit_path(out)))
    return tables, meta, limit


def verdict(s: dict) -> str:
    if math.isnan(s["estimate"]):
        return "no value"
    if s["lo"] > 0:
        return "holds"
    if s["hi"] < 0:
        return "reversed"
    return f"not shown; excludes > {s['hi']:+.2f}"


def fmt(s: dict, digits: int = 2) -> str:
    if math.isnan(s["estimate"]):
        return "-"
    return f"{s['estimate']:+.{digits}f} [{s['lo']:+.{digits}f}, {s['hi']:+.{digits}f}]"


def write(out: Path, study: arms.Study, replicates: int = 2000) -> dict:
    """study.md, study.json, pareto.png and gold.png from what `out/evaluated` holds; returns the result."""
    out = Path(out)
    tables, meta, limit = load(out, study)
    if not tables:
        raise FileNotFoundError(f"{out / 'evaluated'} holds no finished seed of this study; run it first")
    means = Means(tables, replicates)
    reader = Reader(study, means, limit)
    rows = []
    for c in arms.comparisons_of(study):
        rows.append({"claim": c.claim, "label": c.label, "headline": c.headline, "kl": c.kl,
                     "score": reader.compare(c, "score"), "gold": reader.compare(c, "gold")})  # fmt: skip
    models = {}
    for name in [m.name for m in arms.models_of(study)]:
        models[name] = {col: reader.model(name, col) for col in COLUMNS}
        models[name]["gap"] = reader.gap(name)
        models[name]["gap_best_of_n"] = reader.gap(name, "best_of_n")
    result = {
        "seeds": means.seeds, "prompts": means.n_prompts, "replicates": replicates,
        "study": arms.describe(study), "comparisons": rows, "models": models, "meta": meta,
        "limit_reach": getattr(reader, "limit_reach", None),
    }  # fmt: skip
    (out / "study.json").write_text(json.dumps(result, indent=1, default=float))
    plots(out, study, reader, limit)
    text = markdown(result, study)
    (out / "study.md").write_text(text)
    print(text)
    return result


def markdown(result: dict, study: arms.Study) -> str:
    seeds, rows = result["seeds"], result["comparisons"]
    minutes = [sum(m["minutes"].values()) for m in result["meta"].values()]
    machine = next(iter(result["meta"].values()))["machine"]
    lines = [
        f"# Offline study: {len(seeds)} training seed(s) ({', '.join(map(str, seeds))})",
        "",
        result["study"],
        "",
        f"{machine}; {sum(minutes):.0f} min of training and evaluation in all "
        f"({min(minutes):.0f}-{max(minutes):.0f} min per seed). Intervals: 95%, bootstrap over "
        f"{result['prompts']} prompts and {len(seeds)} seeds ({result['replicates']} replicates), the "
        "matched-KL reading redone in each. The limit (pi_beta from the SFT's samples) is reliable up to "
        f"KL {result['limit_reach'] or float('nan'):.2f}.",
        "",
        "## The paper's claims",
        "",
        "Reward difference (positive: the claim holds) with its 95% interval; the gold reward's (the "
        "corpus lexicon) at the same KL; the seeds that had a value; room = the limit minus the worse side "
        "at that KL (how much better any policy could have been; pi_beta where it is reliable, beyond it "
        "best-of-n, which is achievable and so a lower bound on the room).",
        "",
        "| claim | comparison | reward | gold | seeds | room to the limit | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["headline"]:
            lines.append(
                f"| {arms.CLAIMS[r['claim']]} | {r['label']} | {fmt(r['score'])} | {fmt(r['gold'])} | "
                f"{r['score']['seeds']} of {len(seeds)} | {fmt(r['score']['room'])} | {verdict(r['score'])} |"
            )
    lines += ["", "## Every comparison", "", "| claim | comparison | reward | gold | seeds |",
              "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['claim']} | {r['label']} | {fmt(r['score'])} | {fmt(r['gold'])} | "
                     f"{r['score']['seeds']} of {len(seeds)} |")  # fmt: skip
    lines += ["", "## Models (mean over seeds [95% interval])", "",
              "| model | reward | KL to SFT | gold | reference NLL | gap to pi_beta | gap to best-of-n |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, m in result["models"].items():
        if not math.isnan(m["score"]["estimate"]):
            cells = [fmt(m[c]).replace("+", "") for c in COLUMNS] + [fmt(m["gap"]), fmt(m["gap_best_of_n"])]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Merges (mean over seeds)", "", "| merge | angle, mean over tensors | angle, flat | "
              "SLERP / individual norm | LERP / individual norm |", "|---|---|---|---|---|"]  # fmt: skip
    merges = {}
    for m in result["meta"].values():
        for name, d in m["merges"].items():
            merges.setdefault(name, []).append(d)
    for name, ds in merges.items():
        if ds and ds[0]:
            keys = ("angle/mean", "angle/flat", "norm_ratio/slerp", "norm_ratio/lerp")
            cells = [f"{np.mean([d.get(k, np.nan) for d in ds]):.3g}" for k in keys]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Minutes per seed", ""]
    for seed, m in result["meta"].items():
        spent = ", ".join(f"{k} {v:.1f}" for k, v in m["minutes"].items())
        lines.append(f"- seed {seed}: {spent}; not evaluated (past KL {study.kl_cap}): "
                     f"{len(m['not_evaluated'])} snapshots")  # fmt: skip
    return "\n".join(lines) + "\n"


def plots(out: Path, study: arms.Study, reader: Reader, limit) -> None:
    """pareto.png (reward vs KL, one panel per regime, the limit curves on each) and gold.png (the gold
    reward vs KL: over-optimisation shows as gold flat or falling while the reward rises)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import limits

    limit_df = None
    if limit is not None:
        import pandas as pd

        p, n = limit.shape
        limit_df = limits.limit_curves(pd.DataFrame({"prompt": np.repeat(np.arange(p), n),
                                                     "score": limit.ravel()}))  # fmt: skip
    seeds = reader.means.seeds

    def mean_points(curve, col):
        kls, vals = zip(*(reader.points(s, curve, col) for s in seeds), strict=True)
        with quiet():
            return np.nanmean(np.stack(kls)[:, :, 0], 0), np.nanmean(np.stack(vals)[:, :, 0], 0)

    baselines = [c for c in reader.curves if c.startswith("REINFORCE")]
    for col, name in (("score", "pareto.png"), ("gold", "gold.png")):
        fig, axes = plt.subplots(1, len(study.regimes), figsize=(7 * len(study.regimes), 5), squeeze=False)
        for ax, regime in zip(axes[0], study.regimes, strict=True):
            if col == "score" and limit_df is not None:
                limits.plot_limits(ax, limit_df)
            for curve in [c for c in reader.curves if c.startswith(regime.name + " ")] + baselines:
                x, y = mean_points(curve, col)
                single = len(x) == 2  # SFT and the merge: a point
                style = dict(ls="none", marker="*", markersize=11) if single else dict(marker="o", ms=3)
                if curve in baselines:
                    style = dict(ls="--", marker=".", ms=3)
                ax.plot(x[1:] if single else x, y[1:] if single else y, label=curve, **style)
            title = f"{regime.name}: T = {regime.steps}, mu = {regime.mu}; mean over {len(seeds)} seed(s)"
            ylabel = "reward" if col == "score" else "gold reward (lexicon)"
            ax.set(xlabel="KL(pi || pi_sft)", ylabel=ylabel, title=title)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
