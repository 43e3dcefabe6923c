"""Results that can carry a claim, on the offline preset: several training seeds, paired comparisons, the
paper's KL-to-SFT REINFORCE baseline, every WARP iteration's front, the task-vector angle as T grows, and
the coherence of each model.

Per training seed it trains, with the project's own code (`warp.warp`, `warp.train_reinforce_baseline`):

- WARP with I iterations at the preset's mu, and at a second mu (the effect of mu);
- the REINFORCE baseline of 02 (KL to an EMA anchor of the same mu), `baseline_checkpoints` snapshots;
- the paper's REINFORCE baseline, KL to the frozen SFT (mu = 0), at several betas: its Pareto curve;

then evaluates every model on the same held-out prompts with the same sampling seed (`evaluation.evaluate`):
reward, KL to the SFT, perplexity of the completions under a reference LM trained apart from the SFT
(`config.reference_lm`), distinct-1/2. Differences are paired by prompt (`evaluation.paired_diff`,
`evaluation.matched_kl_diff`: one model against a front at the model's KL), with 95% intervals per seed,
and across seeds as the mean with a t-interval. Once, for the first seed, two runs from the SFT are
snapshotted along T to give the angle between their task vectors as T grows.

    python bench/results.py                           # 3 seeds, offline preset (README gives the time)
    python bench/results.py --seeds 0 1 --out runs/results_2
    python bench/results.py --smoke --sft S --data D --reward-model R --reference L   # the test's run

It writes `<out>/results.md` (the tables README quotes), `results.json`, `samples.csv` (every sample of
every model and seed), `pareto.png`, `iterations.png` and `angles.png`, and resumes where it stopped:
finished trainings are read back, not redone.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import checkpoints  # noqa: E402
import config  # noqa: E402
import evaluation  # noqa: E402
import runs  # noqa: E402
import utils  # noqa: E402
import warp  # noqa: E402
from bench.machine import cpu_model  # noqa: E402

T_95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}  # t(0.975, df)


@dataclass
class Study:
    """What the study trains and evaluates (the offline preset's settings otherwise)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    iterations: int = 3
    mus: tuple[float, ...] = (0.01, 0.05)  # the first is the preset's; the others show the effect of mu
    frozen_betas: tuple[float, ...] = (0.1, 0.3, 1.0)  # REINFORCE with KL to the SFT
    etas: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)  # front points (1 - eta) * sft + eta * slerp
    n_prompts: int = 128  # held-out prompts (the offline EvalConfig has 64)
    samples_per_prompt: int = 2
    angle_steps: tuple[int, ...] = (25, 50, 100, 200)  # T at which the two runs' angle is measured
    threads: int = 2
    warp_overrides: dict | None = None  # e.g. fewer steps (the smoke run)
    eval_overrides: dict | None = None


SMOKE = Study(
    seeds=(0, 1),
    iterations=2,
    mus=(0.01, 0.05),
    frozen_betas=(0.1, 1.0),
    etas=(0.5, 1.0),
    n_prompts=4,
    samples_per_prompt=2,
    angle_steps=(1, 2),
    threads=1,
    warp_overrides=dict(
        steps=1, batch_size=4, max_new_tokens=4, prompt_tokens=4, baseline_checkpoints=2, save_every=1
    ),
    eval_overrides=dict(max_new_tokens=4, prompt_tokens=4),
)


# ------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def timed(minutes: dict, key: str):
    """Record the minutes the block takes under `key`."""
    start = time.time()
    yield
    minutes[key] = (time.time() - start) / 60


def state_at(where) -> dict:
    """A policy's parameters from a `save_pretrained` folder or a state file."""
    if Path(where).is_dir():
        return utils.state_of(utils.load_policy(str(where))[0])
    return checkpoints.load_state_file(where)


def warp_config(paths: dict, study: Study, seed: int, out_dir: Path, **kw) -> config.WarpConfig:
    return config.WarpConfig.for_preset(
        "offline", sft=paths["sft"], reward_model=paths["reward_model"], data=paths["data"],
        out_dir=str(out_dir), seed=seed, iterations=study.iterations, cpu_threads=study.threads,
        **{**(study.warp_overrides or {}), **kw},
    )  # fmt: skip


def train_seed(paths: dict, study: Study, seed: int, out: Path) -> dict:
    """Everything one seed trains; returns where each model is and the minutes each training took."""
    base = out / f"seed{seed}"
    made, minutes = {}, {}
    prompts = None
    for mu in study.mus:
        cfg = warp_config(paths, study, seed, base / f"warp_mu{mu}", mu=mu)
        if prompts is None:
            prompts = warp.training_prompts(cfg, utils.load_policy(cfg.sft)[1])[0]
        with timed(minutes, f"WARP mu={mu}"):
            made[("warp", mu)] = warp.warp(cfg, prompts)
        made[("iters", mu)] = [
            Path(cfg.out_dir) / f"iter{i}" / "slerp.safetensors" for i in range(study.iterations - 1)
        ] + [made[("warp", mu)]["slerp"]]
        if mu == study.mus[0]:  # 02's baseline: KL to an EMA anchor of the same mu
            with timed(minutes, "REINFORCE (EMA anchor)"):
                warp.train_reinforce_baseline(cfg, prompts)
            made["reinforce"] = sorted((Path(cfg.out_dir) / "reinforce").glob("step*"))
    for beta in study.frozen_betas:  # the paper's baseline: KL to the frozen SFT
        cfg = warp_config(paths, study, seed, base / f"reinforce_sft_beta{beta}", mu=0.0, beta=beta)
        with timed(minutes, f"REINFORCE (KL to SFT, beta={beta})"):
            made[("frozen", beta)] = warp.train_reinforce_baseline(cfg, prompts)
    return {"models": made, "minutes": minutes}


def angles_along_t(paths: dict, study: Study, seed: int, out: Path) -> list[dict]:
    """Two runs from the SFT with different seeds, snapshotted at `angle_steps`: their task vectors'
    angle (mean, min and max over tensors, degrees) at each T."""
    cfg = warp_config(paths, study, seed, out / "angles")
    runs.claim_out_dir(cfg)
    sft, tokenizer = utils.load_policy(cfg.sft)
    prompts = warp.training_prompts(cfg, tokenizer)[0]
    total = max(study.angle_steps)
    for m in range(2):
        spec = runs.RunSpec(
            str(out / "angles" / f"run{m}"), "", seed + 1000 * m, total, save_points=tuple(study.angle_steps)
        )
        warp.train_run(cfg, spec, prompts)
    init = utils.state_of(sft)
    rows = []
    for t in study.angle_steps:
        states = [state_at(out / "angles" / f"run{m}" / f"step{t:05d}") for m in range(2)]
        rows.append({"T": t, **utils.angle_summary(utils.task_vector_angles(init, states))})
    return rows


# ------------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------------


def evaluate_seed(paths: dict, study: Study, trained: dict) -> tuple[dict, dict]:
    """Every model of one seed on the same prompts and sampling seed: ({name: headline}, {name: samples})."""
    import torch
    import transformers

    ecfg = config.EvalConfig.for_preset(
        "offline", n_prompts=study.n_prompts, samples_per_prompt=study.samples_per_prompt,
        **(study.eval_overrides or {}),
    )  # fmt: skip
    torch.set_num_threads(study.threads)
    sft, tokenizer = utils.load_policy(paths["sft"])
    model, _ = utils.load_policy(paths["sft"])
    reference = transformers.AutoModelForCausalLM.from_pretrained(paths["reference"]).eval()
    reward_model, reward_tokenizer = utils.load_reward_model(paths["reward_model"])
    reward_fn = utils.make_reward_fn(reward_model, reward_tokenizer, tokenizer, 64, 512)
    rows, labels, _ = evaluation.eval_prompts(paths["data"], tokenizer, ecfg.n_prompts, ecfg.prompt_tokens)
    sft_state = utils.state_of(sft)
    models = trained["models"]
    headlines, tables = {}, {}

    def run(name, state):
        utils.load_state(model, state)
        headlines[name], tables[name] = evaluation.evaluate(
            model, sft, tokenizer, reward_fn, rows, labels, ecfg, reference
        )

    run("SFT", sft_state)
    for mu in study.mus:
        for i, where in enumerate(models[("iters", mu)]):
            if mu != study.mus[0] and i < study.iterations - 1:
                continue  # the other mus: the last iteration's front only
            target = state_at(where)
            for eta in study.etas:
                run(front_name(mu, i + 1, eta), utils.liti(sft_state, target, eta))
        if mu == study.mus[0]:
            run("WARP LITI", state_at(models[("warp", mu)]["liti"]))
    for snapshot in models["reinforce"]:
        run(f"REINFORCE EMA {snapshot.name}", state_at(snapshot))
    for beta in study.frozen_betas:
        run(f"REINFORCE SFT beta={beta}", state_at(models[("frozen", beta)]))
    return headlines, tables


def front_name(mu: float, iteration: int, eta: float) -> str:
    return f"WARP mu={mu} iter{iteration} eta={eta}"


def front_names(mu: float, iteration: int, etas) -> list[str]:
    """The SFT and the front points of one iteration, by eta."""
    return ["SFT"] + [front_name(mu, iteration, e) for e in etas]


def by_kl(tables: list) -> list:
    """Sample tables sorted by mean KL: a curve for `evaluation.matched_kl_diff`."""
    return sorted(tables, key=lambda t: float(t["kl"].mean()))


def front(tables: dict, mu: float, iteration: int, etas) -> list:
    """The SFT and the front points of one iteration, sorted by mean KL."""
    return by_kl([tables[n] for n in front_names(mu, iteration, etas)])


def comparisons(tables: dict, study: Study) -> list[dict]:
    """The paired differences of one seed: (what, column, difference, 95% half-width)."""
    mu0, last = study.mus[0], study.iterations
    warp_front = front(tables, mu0, last, study.etas)
    slerp = tables[front_name(mu0, last, 1.0)]
    reinforce = sorted(k for k in tables if k.startswith("REINFORCE EMA"))
    out = []

    def add(what, col, diff):
        out.append({"comparison": what, "column": col, "diff": diff[0], "ci95": diff[1]})

    for name in reinforce[-1:] + [f"REINFORCE SFT beta={b}" for b in study.frozen_betas]:
        d, ci, _ = evaluation.matched_kl_diff(warp_front, tables[name])
        add(f"WARP front - {name}, at its KL", "score", (-d, ci))
    # WARP's two policies against each baseline's curve (from the SFT along its checkpoints or betas)
    curves = {
        "REINFORCE EMA curve": [tables["SFT"]] + [tables[n] for n in reinforce],
        "REINFORCE SFT curve": [tables["SFT"]]
        + [tables[f"REINFORCE SFT beta={b}"] for b in study.frozen_betas],
    }
    points = [(f"WARP front eta={e}", tables[front_name(mu0, last, e)]) for e in study.etas[:-1]]
    for label, curve in curves.items():
        for name, table in [("WARP slerp", slerp), ("WARP LITI", tables["WARP LITI"]), *points]:
            d, ci, _ = evaluation.matched_kl_diff(by_kl(curve), table)
            add(f"{name} - {label}, at its KL", "score", (d, ci))
    add("WARP slerp - WARP LITI", "score", evaluation.paired_diff(tables["WARP LITI"], slerp))
    add("WARP slerp - WARP LITI", "kl", evaluation.paired_diff(tables["WARP LITI"], slerp, "kl"))
    for mu in study.mus[1:]:
        other = tables[front_name(mu, last, 1.0)]
        add(f"slerp mu={mu} - slerp mu={mu0}", "score", evaluation.paired_diff(slerp, other))
        add(f"slerp mu={mu} - slerp mu={mu0}", "kl", evaluation.paired_diff(slerp, other, "kl"))
        d, ci, _ = evaluation.matched_kl_diff(warp_front, other)
        add(f"slerp mu={mu} - front mu={mu0}, at its KL", "score", (d, ci))
        d, ci, _ = evaluation.matched_kl_diff(front(tables, mu, last, study.etas), slerp)
        add(f"slerp mu={mu0} - front mu={mu}, at its KL", "score", (d, ci))
    for i in range(2, last + 1):
        previous = tables[front_name(mu0, i - 1, 1.0)]
        d, ci, _ = evaluation.matched_kl_diff(front(tables, mu0, i, study.etas), previous)
        add(f"front of iteration {i} - slerp of iteration {i - 1}, at its KL", "score", (-d, ci))
    for name in ["WARP LITI", front_name(mu0, last, 1.0), reinforce[-1]]:
        add(f"{name} - SFT", "ref_nll", evaluation.paired_diff(tables["SFT"], tables[name], "ref_nll"))
    return out


# ------------------------------------------------------------------------------------------------------
# Across seeds: tables and plots
# ------------------------------------------------------------------------------------------------------


def across(values: list[float]) -> tuple[float, float]:
    """Mean over seeds and the half-width of its 95% t-interval (NaN with one seed)."""
    vals = [v for v in values if not math.isnan(v)]
    if len(vals) < 2:
        return (vals[0] if vals else float("nan")), float("nan")
    return statistics.mean(vals), T_95.get(len(vals) - 1, 1.96) * statistics.stdev(vals) / math.sqrt(
        len(vals)
    )


def fmt(mean: float, ci: float, digits: int = 2) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" if math.isnan(ci) else f"{mean:.{digits}f} ± {ci:.{digits}f}"


def model_table(headlines: dict[int, dict[str, dict]]) -> list[str]:
    """Per model: reward, KL, perplexity under the reference LM, distinct-1/2 (mean ± t-interval, seeds)."""
    cols = [("score", "reward"), ("kl", "KL to SFT"), ("ref_ppl", "ref. perplexity"),
            ("distinct-1", "distinct-1"), ("distinct-2", "distinct-2")]  # fmt: skip
    lines = ["| model | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    names = list(next(iter(headlines.values())))
    for name in names:
        cells = [fmt(*across([h[name][c] for h in headlines.values()])) for c, _ in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def comparison_table(per_seed: dict[int, list[dict]]) -> list[str]:
    """Each paired difference per seed (with its paired 95% interval), then across seeds."""
    seeds = list(per_seed)
    head = (
        "| difference | column | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " | across seeds | CI excludes 0 |"
    )
    lines = [head, "|---" * (len(seeds) + 4) + "|"]
    for j, row in enumerate(per_seed[seeds[0]]):
        cells = [per_seed[s][j] for s in seeds]
        mean, ci = across([c["diff"] for c in cells])
        sig = sum(abs(c["diff"]) > c["ci95"] for c in cells if not math.isnan(c["diff"]))
        lines.append(
            f"| {row['comparison']} | {row['column']} | "
            + " | ".join(fmt(c["diff"], c["ci95"]) for c in cells)
            + f" | {fmt(mean, ci)} | {sig} of {len(seeds)} seeds |"
        )
    return lines


def plots(out: Path, study: Study, headlines: dict[int, dict[str, dict]], angles: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def point(names):  # mean and sd over seeds of (KL, reward) for each name
        res = []
        for n in names:
            kl = [h[n]["kl"] for h in headlines.values()]
            sc = [h[n]["score"] for h in headlines.values()]
            sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
            res.append((statistics.mean(kl), statistics.mean(sc), sd(kl), sd(sc)))
        return res

    def draw(ax, names, label, **kw):
        pts = point(names)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], xerr=[p[2] for p in pts],
                    yerr=[p[3] for p in pts], label=label, capsize=2, **kw)  # fmt: skip

    names = list(next(iter(headlines.values())))
    mu0, last = study.mus[0], study.iterations
    fig, ax = plt.subplots(figsize=(7, 5))
    draw(ax, front_names(mu0, last, study.etas), f"WARP front (mu={mu0}, I={last})", marker="o")
    for mu in study.mus[1:]:
        draw(ax, front_names(mu, last, study.etas), f"WARP front (mu={mu})", marker="^")
    draw(ax, ["WARP LITI"], "WARP LITI", marker="*", markersize=12, linestyle="none")
    draw(ax, ["SFT"] + sorted(n for n in names if n.startswith("REINFORCE EMA")), "REINFORCE, EMA anchor",
         marker="s", linestyle="--")  # fmt: skip
    draw(ax, ["SFT"] + [f"REINFORCE SFT beta={b}" for b in sorted(study.frozen_betas, reverse=True)],
         "REINFORCE, KL to SFT (beta from high to low)", marker="D", linestyle=":")  # fmt: skip
    ax.set(
        xlabel="KL(pi || pi_sft)",
        ylabel="reward",
        title=f"Reward vs KL, mean ± sd over {len(headlines)} seeds",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 5))
    for i in range(1, last + 1):
        draw(ax, front_names(mu0, i, study.etas), f"iteration {i}", marker="o")
    ax.set(xlabel="KL(pi || pi_sft)", ylabel="reward", title=f"WARP's front after each iteration (mu={mu0})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "iterations.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        [a["T"] for a in angles], [a["angle/mean"] for a in angles], marker="o", label="mean over tensors"
    )
    ts = [a["T"] for a in angles]
    lo, hi = [a["angle/min"] for a in angles], [a["angle/max"] for a in angles]
    ax.fill_between(ts, lo, hi, alpha=0.2, label="min to max")
    ax.set(xlabel="T (RL steps from the SFT)", ylabel="angle between task vectors (degrees)", xscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "angles.png", dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------


def default_paths(out: Path) -> dict:
    """The offline preset's SFT, data and reference LM; the reward model from 01 (run here if missing)."""
    paths = config.preset_paths("offline")
    paths["reference"] = config.reference_lm("offline")
    reward = out / "ck" / "reward_model"
    if not (reward / "metrics.json").exists():  # 01 on the offline preset, as run_series runs it
        import run_series

        run_series.main(
            ["--preset", "offline", "--only", "01", "--checkpoints", str(out / "ck"), "--out", str(out)]
        )
    paths["reward_model"] = str(reward)
    return paths


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1 2)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "results"), help="working and output folder")
    parser.add_argument("--smoke", action="store_true", help="one step of everything (the test)")
    parser.add_argument(
        "--report-only", action="store_true",
        help="recompute the comparisons, tables and plots from <out>/samples.csv and results.json",
    )  # fmt: skip
    for name in ("sft", "data", "reward-model", "reference"):
        parser.add_argument(f"--{name}", default=None, help=f"{name} folder (default: the offline preset's)")
    args = parser.parse_args(argv)
    study = SMOKE if args.smoke else Study()
    if args.seeds:
        study = dataclasses.replace(study, seeds=tuple(args.seeds))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        return write_report(out, study, rebuilt(out, study))
    start = time.time()
    given = {
        "sft": args.sft,
        "data": args.data,
        "reward_model": args.reward_model,
        "reference": args.reference,
    }
    paths = given if all(given.values()) else {**default_paths(out), **{k: v for k, v in given.items() if v}}

    headlines, per_seed, minutes, samples = {}, {}, {}, []
    for seed in study.seeds:
        print(f"[results] seed {seed}: training", flush=True)
        trained = train_seed(paths, study, seed, out)
        minutes[seed] = trained["minutes"]
        print(f"[results] seed {seed}: evaluating", flush=True)
        with timed(minutes[seed], "evaluation"):
            headlines[seed], tables = evaluate_seed(paths, study, trained)
        per_seed[seed] = comparisons(tables, study)
        samples += [t.assign(model=name, seed=seed) for name, t in tables.items()]
    print("[results] angles along T", flush=True)
    angle_time = {}
    with timed(angle_time, "angles"):
        angles = angles_along_t(paths, study, study.seeds[0], out)

    import pandas as pd

    pd.concat(samples).to_csv(out / "samples.csv", index=False)
    total = (time.time() - start) / 60
    result = {
        "seeds": list(study.seeds), "study": dataclasses.asdict(study), "paths": paths,
        "headlines": headlines, "comparisons": per_seed, "angles": angles, "minutes": minutes,
        "angle_minutes": angle_time["angles"], "total_minutes": total, "machine": machine(),
    }  # fmt: skip
    return write_report(out, study, result)


def write_report(out: Path, study: Study, result: dict) -> dict:
    """results.json, the plots and results.md of `result`; the report is also printed."""
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    plots(out, study, result["headlines"], result["angles"])
    text = report(result, study)
    (out / "results.md").write_text(text)
    print(text)
    return result


def rebuilt(out: Path, study: Study) -> dict:
    """A finished study's result with its comparisons recomputed from the samples it saved."""
    import pandas as pd

    result = json.loads((out / "results.json").read_text())
    samples = pd.read_csv(out / "samples.csv", keep_default_na=False)
    result["headlines"] = {int(k): v for k, v in result["headlines"].items()}
    result["minutes"] = {int(k): v for k, v in result["minutes"].items()}
    result["comparisons"] = {}
    for seed, part in samples.groupby("seed"):
        tables = {
            name: t.drop(columns=["model", "seed"]).reset_index(drop=True)
            for name, t in part.groupby("model")
        }
        result["comparisons"][int(seed)] = comparisons(tables, study)
    return result


def machine() -> str:
    import torch

    return f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def report(result: dict, study: Study) -> str:
    seeds = result["seeds"]
    lines = [
        f"# Offline results: {len(seeds)} training seeds, paired by prompt",
        "",
        f"{result['machine']}; {result['total_minutes']:.0f} min in all. Each model is evaluated on the "
        f"same {study.n_prompts} held-out prompts x {study.samples_per_prompt} samples with the same "
        "sampling seed. Across seeds: mean ± 95% t-interval over the seeds.",
        "",
        "## Models",
        "",
        *model_table(result["headlines"]),
        "",
        "## Paired differences (per seed: mean ± paired 95% interval over prompts)",
        "",
        *comparison_table(result["comparisons"]),
        "",
        "## Task-vector angle between two runs from the SFT, as T grows (seed " + str(seeds[0]) + ")",
        "",
        "| T | mean angle | min | max |",
        "|---|---|---|---|",
        *[
            f"| {a['T']} | {a['angle/mean']:.1f} | {a['angle/min']:.1f} | {a['angle/max']:.1f} |"
            for a in result["angles"]
        ],
        "",
        "## Minutes per seed",
        "",
    ]
    for seed, mins in result["minutes"].items():
        lines.append(f"- seed {seed}: " + ", ".join(f"{k} {v:.1f}" for k, v in mins.items()))
    lines.append(f"- angles along T: {result['angle_minutes']:.1f}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
