"""The offline study's arms, in one place: what each training seed trains, which models are evaluated, the
curves they form and the comparisons (the paper's claims) that the report makes of them.

Nothing here trains or evaluates (`runner.py`) or computes an interval (`report.py`): the arms are plain
data, so that what the study compares can be read in one page.

Per training seed, for each `Regime` (a run length T and an EMA rate mu):

- iteration 1: `runs` runs of REINFORCE against an EMA anchor from the SFT (Algorithm 1, lines 3-9);
  they give M = 1 (run 0 alone), M = 2 SLERP (runs 0 and 1), M = 4 SLERP (all four) and LERP of runs 0
  and 1, each with its front (1 - eta) theta_sft + eta theta;
- iteration i >= 2: 2 runs from the LITI of the previous iteration's M = 2 merge, merged by SLERP.

and once per seed the two REINFORCE baselines as trajectories, a snapshot every `snapshot_every` steps:
the EMA anchor (02's baseline, at the longest regime's mu) and KL to the frozen SFT (the paper's, mu = 0)
at each of `sft_betas`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

# ------------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Regime:
    """A length of WARP's runs: T steps at EMA rate mu. Within a run the anchor moves about
    1 - exp(-mu T) of the way to the policy (0.22 at mu T = 0.25, 0.98 at mu T = 4)."""

    name: str
    steps: int
    mu: float


@dataclass(frozen=True)
class Study:
    """What the study trains and how it evaluates (the offline preset's settings otherwise: beta = 1,
    batch 32, lr 1e-4, 8-token prompts, 32-token completions at temperature 0.9)."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    regimes: tuple[Regime, ...] = (Regime("T25", 25, 0.01), Regime("T50", 50, 0.08))
    runs: int = 4  # iteration 1's runs per regime; later iterations merge 2
    iterations: int = 2
    eta: float = 0.5  # LITI step to the next iteration's init (the preset's)
    etas: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)  # the points of a front (M = 4 and LERP: eta = 1)
    beta: float = 1.0  # KL coefficient of WARP's runs and of the EMA baseline (the preset's)
    ema_steps: int = 150  # the EMA-anchored REINFORCE trajectory (at the last regime's mu)
    sft_betas: tuple[float, ...] = (0.1, 0.3, 0.5, 1.0)  # REINFORCE with KL to the frozen SFT
    sft_steps: int = 100
    snapshot_every: int = 10
    kl_cap: float = 5.0  # a trajectory's snapshots are evaluated up to the first beyond this KL
    kl_points: tuple[float, ...] = (0.5, 1.0, 2.0)  # where two curves are compared with each other
    n_prompts: int = 384  # held-out prompts, the same for every model and seed
    samples_per_prompt: int = 2
    limit_samples: int = 128  # SFT completions per held-out prompt for the testbed's limit
    workers: int = 2  # seeds trained at once, one process each
    threads: int = 1  # torch threads per process (fixed: a rerun repeats bit for bit)
    warp_overrides: dict = field(default_factory=dict)  # e.g. smaller batches (the smoke run)
    eval_overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        problems = []
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            problems.append(f"seeds={self.seeds}: give distinct training seeds")
        if self.runs < 4:
            problems.append(f"runs={self.runs}: M = 4 needs at least 4 runs in iteration 1")
        if not self.regimes or self.iterations < 1:
            problems.append("give at least one regime and one iteration")
        for r in self.regimes:
            if r.steps < 1 or not 0 < r.mu <= 1:
                problems.append(f"{r}: steps >= 1 and mu in (0, 1]")
        if sorted(self.etas) != list(self.etas) or self.etas[-1] != 1.0 or self.etas[0] <= 0:
            problems.append(f"etas={self.etas}: increasing, in (0, 1], ending at 1 (the merge itself)")
        for what, steps in (("ema_steps", self.ema_steps), ("sft_steps", self.sft_steps)):
            if steps < self.snapshot_every or steps % self.snapshot_every:
                problems.append(f"{what}={steps}: a multiple of snapshot_every={self.snapshot_every}")
        if self.limit_samples < 2 or self.n_prompts < 2 or self.samples_per_prompt < 1:
            problems.append("limit_samples >= 2, n_prompts >= 2, samples_per_prompt >= 1")
        if self.workers < 1 or self.threads < 1:
            problems.append("workers >= 1 and threads >= 1")
        if problems:
            raise ValueError("Study: " + "; ".join(problems))


FULL = Study()
# one seed, fewer prompts and shorter trajectories: the study's shape in minutes (not its power)
QUICK = Study(
    seeds=(0,), regimes=(Regime("T50", 50, 0.08),), ema_steps=100, sft_betas=(0.1, 0.3, 1.0), sft_steps=60,
    n_prompts=96, limit_samples=64, workers=1, threads=2,
)  # fmt: skip
# toy size for the test: every arm, one or two steps each
SMOKE = Study(
    seeds=(0, 1), regimes=(Regime("T2", 2, 0.5),), etas=(0.5, 1.0), ema_steps=2, sft_betas=(0.1, 1.0),
    sft_steps=2, snapshot_every=1, kl_points=(0.001,), n_prompts=4, limit_samples=4, workers=1,
    warp_overrides=dict(batch_size=4, max_new_tokens=4, prompt_tokens=4, save_every=1, warmup_steps=0),
    eval_overrides=dict(max_new_tokens=4, prompt_tokens=4),
)  # fmt: skip


# ------------------------------------------------------------------------------------------------------
# What is trained
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One RL run of a training seed (`warp.train_run`), in `<seed folder>/<name>`."""

    name: str
    steps: int
    mu: float
    beta: float
    seed: int
    init: str = ""  # the merge whose LITI step starts it ("" = the SFT)
    snapshots: tuple[int, ...] = ()


@dataclass(frozen=True)
class Merge:
    """A merge of runs' final states: `slerp` (around `base`: the SFT or the iteration's init), `lerp`
    (their mean), or `one` (run 0 alone, M = 1)."""

    name: str
    how: str
    runs: tuple[str, ...]
    base: str = ""  # "" = the SFT, else the init made from the merge of that name


def iteration_dir(regime: Regime, i: int) -> str:
    return f"{regime.name}/iter{i}"


def runs_of(study: Study, seed: int) -> list[Run]:
    """Every RL run of one training seed, in the order the runner trains them (a later iteration's runs
    after the merge they start from)."""
    out = []
    for r_index, regime in enumerate(study.regimes):
        for i in range(1, study.iterations + 1):
            n = study.runs if i == 1 else 2
            init = "" if i == 1 else f"{iteration_dir(regime, i - 1)}/slerp2"
            for m in range(n):
                run_seed = 100_000 * seed + 1000 * r_index + 100 * i + m
                out.append(Run(f"{iteration_dir(regime, i)}/run{m}", regime.steps, regime.mu, study.beta,
                               run_seed, init))  # fmt: skip
    every = study.snapshot_every
    ema_mu = study.regimes[-1].mu
    out.append(Run("reinforce_ema", study.ema_steps, ema_mu, study.beta, 100_000 * seed + 90_000,
                   snapshots=tuple(range(every, study.ema_steps + 1, every))))  # fmt: skip
    for b, beta in enumerate(study.sft_betas):
        out.append(Run(f"reinforce_sft_beta{beta}", study.sft_steps, 0.0, beta, 100_000 * seed + 91_000 + b,
                       snapshots=tuple(range(every, study.sft_steps + 1, every))))  # fmt: skip
    return out


def merges_of(study: Study) -> list[Merge]:
    """The merges of every regime and iteration (the same for every seed)."""
    out = []
    for regime in study.regimes:
        first = iteration_dir(regime, 1)
        runs = tuple(f"{first}/run{m}" for m in range(study.runs))
        out += [
            Merge(f"{first}/one", "one", runs[:1]),
            Merge(f"{first}/slerp2", "slerp", runs[:2]),
            Merge(f"{first}/slerp4", "slerp", runs[:4]),
            Merge(f"{first}/lerp2", "lerp", runs[:2]),
        ]
        for i in range(2, study.iterations + 1):
            it = iteration_dir(regime, i)
            out.append(Merge(f"{it}/slerp2", "slerp", (f"{it}/run0", f"{it}/run1"),
                             base=f"{iteration_dir(regime, i - 1)}/slerp2"))  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------------
# What is evaluated: models and the curves they form
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    """One evaluated policy: the SFT, a front point (1 - eta) theta_sft + eta theta_merge, or a snapshot
    of a baseline run."""

    name: str
    merge: str = ""
    eta: float = 0.0
    run: str = ""
    step: int = 0


FRONT_LABELS = {"one": "M=1", "slerp2": "M=2 SLERP", "slerp4": "M=4 SLERP", "lerp2": "M=2 LERP"}
POINT_ONLY = ("lerp2",)  # compared only at its own KL: the merge itself, no front


def front_label(regime: Regime, merge: str) -> str:
    """`T100 M=2 SLERP`, `T100 iter2 M=2 SLERP` ...: the front of a merge, by regime and iteration."""
    it, kind = merge.split("/")[-2:]
    i = int(it.removeprefix("iter"))
    return f"{regime.name} " + (f"iter{i} " if i > 1 else "") + FRONT_LABELS[kind]


def curves_of(study: Study) -> dict[str, list[Model]]:
    """Every curve of the study, from the SFT outwards: each merge's front (by eta) and each baseline's
    trajectory (by step). Every model of the study is on one of them (the SFT on all)."""
    sft = Model("SFT")
    out = {}
    for regime in study.regimes:
        for merge in merges_of(study):
            if merge.name.startswith(regime.name + "/"):
                label = front_label(regime, merge.name)
                etas = (1.0,) if merge.name.split("/")[-1] in POINT_ONLY else study.etas
                out[label] = [sft] + [Model(f"{label} eta={e}", merge=merge.name, eta=e) for e in etas]
    for run in runs_of(study, 0):
        if run.snapshots:
            label = baseline_label(run)
            out[label] = [sft] + [Model(f"{label} step{s}", run=run.name, step=s) for s in run.snapshots]
    return out


def baseline_label(run: Run) -> str:
    if run.name == "reinforce_ema":
        return f"REINFORCE EMA mu={run.mu}"
    return f"REINFORCE SFT beta={run.beta}"


def models_of(study: Study) -> list[Model]:
    """Every model the study evaluates, each once."""
    seen = {}
    for curve in curves_of(study).values():
        for m in curve:
            seen.setdefault(m.name, m)
    return list(seen.values())


# ------------------------------------------------------------------------------------------------------
# The comparisons: the paper's claims
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """`better` minus `worse` in reward (positive: the paper's claim holds), at one KL.

    Each side is a curve name, or a curve's last point written `curve@end` (a model at its own KL);
    `envelope:` + names joined by `|` is the best of several curves at each KL (computed within each
    bootstrap replicate). At `kl` (a number) both sides are read off their curves; with `kl=None`, one
    side is a single point and the other curve is read at that point's KL. A curve is read by linear
    interpolation between the two neighbouring points that bracket the KL, never extrapolated.
    """

    claim: str
    label: str
    better: str
    worse: str
    kl: float | None = None
    headline: bool = False


CLAIMS = {
    "ema": "EMA anchor above the SFT anchor (REINFORCE)",
    "slerp_vs_one": "SLERP of M = 2 above one policy's front (M = 1)",
    "slerp_vs_lerp": "SLERP front above LERP",
    "more_runs": "M = 4 above M = 2",
    "liti_front": "WARP's front above the REINFORCE trajectories",
    "iterations": "a second iteration raises the front",
}


def comparisons_of(study: Study) -> list[Comparison]:
    """The comparisons of the report, grouped by claim; `headline` marks the one per claim and regime
    that README's table shows."""
    curves = curves_of(study)
    ema = next(c for c in curves if c.startswith("REINFORCE EMA"))
    sft_anchor = "envelope:" + "|".join(c for c in curves if c.startswith("REINFORCE SFT"))
    out = []
    middle = study.kl_points[len(study.kl_points) // 2]
    for k in study.kl_points:
        out.append(Comparison("ema", f"EMA trajectory - best SFT-anchor trajectory, at KL {k}", ema,
                              sft_anchor, kl=k, headline=k == middle))  # fmt: skip
        for c in curves:
            if c.startswith("REINFORCE SFT"):
                out.append(Comparison("ema", f"EMA trajectory - {c}, at KL {k}", ema, c, kl=k))
    for regime in study.regimes:
        r = regime.name
        one, s2, s4, lerp = (f"{r} {FRONT_LABELS[k]}" for k in ("one", "slerp2", "slerp4", "lerp2"))
        # a merge reaches further than what it is compared with (SLERP than one run, M = 4 than M = 2, a
        # second iteration than the first): its front is read at the nearer point's KL
        out += [
            Comparison("slerp_vs_one", f"{r}: M=2 SLERP front - M=1 (one run), at the run's KL", s2,
                       f"{one}@end", headline=True),
            Comparison("slerp_vs_lerp", f"{r}: M=2 SLERP front - M=2 LERP, at LERP's KL", s2, f"{lerp}@end",
                       headline=True),
            Comparison("more_runs", f"{r}: M=4 SLERP front - M=2 SLERP, at M=2's KL", s4, f"{s2}@end",
                       headline=True),
        ]  # fmt: skip
        last = f"{r} iter{study.iterations} M=2 SLERP" if study.iterations > 1 else s2
        for k in study.kl_points:
            out.append(Comparison("slerp_vs_one", f"{r}: M=2 front - M=1 front, at KL {k}", s2, one, kl=k))
            out.append(Comparison("more_runs", f"{r}: M=4 front - M=2 front, at KL {k}", s4, s2, kl=k))
            out.append(Comparison("liti_front", f"{r}: WARP's last front - EMA trajectory, at KL {k}", last,
                                  ema, kl=k))  # fmt: skip
            out.append(Comparison("liti_front", f"{r}: WARP's last front - best SFT-anchor, at KL {k}", last,
                                  sft_anchor, kl=k))  # fmt: skip
        out += [
            Comparison("liti_front", f"{r}: WARP (last SLERP) - EMA trajectory, at its KL", f"{last}@end",
                       ema, headline=True),
            Comparison("liti_front", f"{r}: WARP (last SLERP) - best SFT-anchor, at its KL", f"{last}@end",
                       sft_anchor, headline=True),
        ]  # fmt: skip
        for i in range(2, study.iterations + 1):
            now = f"{r} iter{i} M=2 SLERP"
            before = s2 if i == 2 else f"{r} iter{i - 1} M=2 SLERP"
            out.append(Comparison("iterations", f"{r}: iteration {i}'s front - iteration {i - 1}'s SLERP, at "
                                  "its KL", now, f"{before}@end", headline=True))  # fmt: skip
            for k in study.kl_points:
                label = f"{r}: iteration {i}'s front - iteration {i - 1}'s, at KL {k}"
                out.append(Comparison("iterations", label, now, before, kl=k))
    return out


def anchor_travel(regime: Regime) -> float:
    """The fraction of the way to the policy that the EMA anchor covers in T steps, 1 - (1 - mu)^T."""
    return 1 - (1 - regime.mu) ** regime.steps


def with_seeds(study: Study, seeds) -> Study:
    return dataclasses.replace(study, seeds=tuple(seeds))


def describe(study: Study) -> str:
    """One paragraph of what the study trains, for the report and the command's first line."""
    regimes = ", ".join(
        f"{r.name} (T = {r.steps}, mu = {r.mu}, mu T = {r.mu * r.steps:g}, anchor travels "
        f"{anchor_travel(r):.0%})"
        for r in study.regimes
    )
    steps = sum(r.steps for r in runs_of(study, 0))
    return (
        f"{len(study.seeds)} training seeds; regimes {regimes}; {study.runs} runs in iteration 1, 2 in each "
        f"of {study.iterations - 1} later iteration(s); REINFORCE trajectories: EMA anchor "
        f"{study.ema_steps} steps, KL to the SFT at beta = {', '.join(map(str, study.sft_betas))} "
        f"{study.sft_steps} steps each, a snapshot every {study.snapshot_every}; {steps} RL steps and "
        f"{len(models_of(study))} models per seed; {study.n_prompts} held-out prompts x "
        f"{study.samples_per_prompt} samples; the limit from {study.limit_samples} SFT samples a prompt "
        f"(pi_beta reliable at most to KL log N - 1 = {math.log(study.limit_samples) - 1:.1f})."
    )
