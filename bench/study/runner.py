"""The offline study's runner: trains and evaluates the arms of `arms.py`, one training seed at a time (or
`Study.workers` at once, one process each), resumable at every level.

- A seed's runs go through `warp.train_run` (progress checkpoints: a killed run continues bit for bit),
  its merges and LITI inits are state files written atomically, and each evaluated model's samples are
  written as soon as they are scored: a restart redoes at most one run's last `save_every` steps and one
  model's evaluation.
- When a seed is finished its per-prompt table, `<out>/evaluated/seed<N>.csv.gz` (every model's mean
  reward, KL, gold reward and reference NLL per held-out prompt), and `seed<N>.json` (minutes, merge
  diagnostics) are all the report needs: they are small enough to commit, so that a later session on
  another machine adds seeds to the same study (`--out` pointing at a folder holding them).
- The testbed's limit: `limit_samples` SFT completions per held-out prompt, scored
  (`<out>/evaluated/limit.csv.gz`), once for the study, in `limit_parts` parts by prompts (each cached
  when done) queued after the seeds, so that they fill the time the last seeds leave idle.

Every model of a seed is evaluated on the same held-out prompts (the same for every seed) with that seed's
own sampling seed, so differences are paired by prompt within a seed and the evaluation noise differs
between seeds (`report.py` resamples prompts and seeds).
"""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import checkpoints
import config
import evaluation
import geometry
import runs
import utils
import warp
from bench.study import arms

EVAL_SEED = 10_000  # + the training seed: each seed's own evaluation sampling seed


def seed_dir(out: Path, seed: int) -> Path:
    return Path(out) / f"seed{seed}"


def result_path(out: Path, seed: int) -> Path:
    """A finished seed's per-prompt table (its `.json` beside it)."""
    return Path(out) / "evaluated" / f"seed{seed}.csv.gz"


def limit_path(out: Path) -> Path:
    return Path(out) / "evaluated" / "limit.csv.gz"


def meta_path(table: Path) -> Path:
    """The `.json` beside a result table (`seed0.csv.gz` -> `seed0.json`)."""
    return Path(table).with_suffix("").with_suffix(".json")


def write_result(table, target: Path, meta: dict) -> None:
    """A result table (gzipped CSV) and its metadata; the table last and atomically, so that it exists
    only once complete (a seed or the limit counts as done by its table)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    checkpoints.atomic_write_text(meta_path(target), json.dumps(meta, indent=1))
    tmp = target.with_name(target.name + ".tmp")
    table.to_csv(tmp, index=False, float_format="%.5g", compression="gzip")
    tmp.replace(target)


def warp_config(paths: dict, study: arms.Study, run: arms.Run, folder: Path) -> config.WarpConfig:
    return config.WarpConfig.for_preset(
        "offline", sft=paths["sft"], reward_model=paths["reward_model"], data=paths["data"],
        out_dir=str(folder), seed=run.seed, mu=run.mu, beta=run.beta, steps=run.steps,
        cpu_threads=study.threads, **study.warp_overrides,
    )  # fmt: skip


def eval_config(study: arms.Study) -> config.EvalConfig:
    return config.EvalConfig.for_preset(
        "offline", n_prompts=study.n_prompts, samples_per_prompt=study.samples_per_prompt,
        limit_samples=study.limit_samples, **study.eval_overrides,
    )  # fmt: skip


def state_at(where: Path) -> dict:
    """A policy's parameters from a `save_pretrained` folder or a state file."""
    if Path(where).is_dir():
        return utils.state_of(utils.load_policy(str(where))[0])
    return checkpoints.load_state_file(where)


class Progress:
    """A seed's work in units (an RL step is 1, an evaluated model `eval_units`), written to
    `<out>/progress/seed<N>.json` for the parent's overall bar."""

    def __init__(self, out: Path, seed: int, study: arms.Study):
        self.path = Path(out) / "progress" / f"seed{seed}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.total = seed_units(study)
        self.done = 0.0

    def add(self, units: float) -> None:
        self.done += units
        checkpoints.atomic_write_text(self.path, json.dumps({"done": self.done, "total": self.total}))


def eval_units(study: arms.Study) -> float:
    """An evaluated model in RL-step units (measured: 768 samples ~ 20 steps of batch 32)."""
    return 20 * study.n_prompts * study.samples_per_prompt / 768


def seed_units(study: arms.Study) -> float:
    return sum(r.steps for r in arms.runs_of(study, 0)) + eval_units(study) * len(arms.models_of(study))


# ------------------------------------------------------------------------------------------------------
# One seed
# ------------------------------------------------------------------------------------------------------


def train(paths: dict, study: arms.Study, seed: int, out: Path, progress: Progress) -> dict:
    """Every run and merge of one seed; returns the merges' diagnostics (angles, norm ratios)."""
    base = seed_dir(out, seed)
    sft, tokenizer = utils.load_policy(paths["sft"])
    sft_state = utils.state_of(sft)
    merges = {m.name: m for m in arms.merges_of(study)}
    prompts = None

    def merged(name: str) -> dict:
        """A merge's state, made (with its diagnostics in a `.json` beside it) the first time."""
        path = base / "merges" / f"{name}.safetensors"
        if path.exists():
            return checkpoints.load_state_file(path)
        m = merges[name]
        states = [state_at(finals[r]) for r in m.runs]
        around = init_state(m.base) if m.base else sft_state
        info = {}
        if m.how == "slerp":  # Alg. 1, line 10
            state = utils.slerp(around, states)
            info = geometry.merge_diagnostics(around, states, state)
        elif m.how == "lerp":  # the mean of 2 runs (the only LERP arm)
            if len(states) != 2:
                raise ValueError(f"{name}: LERP of {len(states)} runs is not an arm")
            state = utils.liti(states[0], states[1], 0.5)
        else:
            state = states[0]
        checkpoints.save_state(state, path)
        checkpoints.atomic_write_text(path.with_suffix(".json"), json.dumps(info))
        return state

    def init_state(name: str) -> dict:
        """The LITI step after merge `name`: (1 - eta) * its init + eta * the merge (Alg. 1, line 11)."""
        path = base / "merges" / f"{name}.init.safetensors"
        if not path.exists():
            m = merges[name]
            around = init_state(m.base) if m.base else sft_state
            checkpoints.save_state(utils.liti(around, merged(name), study.eta), path)
        return checkpoints.load_state_file(path)

    finals = {}
    for run in arms.runs_of(study, seed):
        cfg = warp_config(paths, study, run, base / run.name)
        if prompts is None:
            prompts = warp.training_prompts(cfg, tokenizer)[0]
        init = ""
        if run.init:
            init_state(run.init)
            init = str(base / "merges" / f"{run.init}.init.safetensors")
        spec = runs.RunSpec(str(base / run.name), init, run.seed, run.steps, save_points=run.snapshots)
        finals[run.name] = warp.train_run(cfg, spec, prompts)
        progress.add(run.steps)
    for name in merges:
        merged(name)
    return {name: json.loads((base / "merges" / f"{name}.json").read_text()) for name in merges}


def evaluate(paths: dict, study: arms.Study, seed: int, out: Path, progress: Progress):
    """Every model of one seed on the held-out prompts; returns (per-prompt table, models not evaluated
    because their trajectory had passed `kl_cap`)."""
    import pandas as pd
    import torch
    import transformers

    import offline

    ecfg = eval_config(study)
    base = seed_dir(out, seed)
    sft, tokenizer = utils.load_policy(paths["sft"])
    model, _ = utils.load_policy(paths["sft"])
    reference = transformers.AutoModelForCausalLM.from_pretrained(paths["reference"]).eval()
    reward_model, reward_tokenizer = utils.load_reward_model(paths["reward_model"])
    reward_fn = utils.make_reward_fn(reward_model, reward_tokenizer, tokenizer, 64, 512)
    rows, _, _ = evaluation.eval_prompts(paths["data"], tokenizer, ecfg.n_prompts, ecfg.prompt_tokens)
    sft_state = utils.state_of(sft)
    tables, skipped = {}, []
    for curve in arms.curves_of(study).values():
        beyond = False
        for m in curve:
            if m.name in tables:  # the SFT starts every curve
                continue
            if beyond:  # the trajectory has passed kl_cap: no comparison reads this far
                skipped.append(m.name)
                progress.add(eval_units(study))
                continue
            path = base / "eval" / f"{m.name.replace(' ', '_')}.csv"
            if not path.exists():
                if m.merge:
                    merge = checkpoints.load_state_file(base / "merges" / f"{m.merge}.safetensors")
                    state = utils.liti(sft_state, merge, m.eta)
                elif m.run:
                    state = state_at(base / m.run / f"step{m.step:05d}")
                else:
                    state = sft_state
                utils.load_state(model, state)
                torch.manual_seed(EVAL_SEED + seed)  # the same draws for every model of this seed
                samples = evaluation.sample_and_score(
                    model, sft, tokenizer, reward_fn, rows, samples_per_prompt=ecfg.samples_per_prompt,
                    max_new_tokens=ecfg.max_new_tokens, temperature=ecfg.temperature,
                    batch_size=ecfg.batch_size, reference=reference, gold=offline.lexicon_sentiment,
                )  # fmt: skip
                path.parent.mkdir(parents=True, exist_ok=True)
                checkpoints.atomic_write_text(path, samples.to_csv(index=False))
            samples = pd.read_csv(path, keep_default_na=False)
            tables[m.name] = samples.groupby("prompt")[["score", "kl", "gold", "ref_nll", "length"]].mean()
            progress.add(eval_units(study))
            beyond = bool(m.run) and float(tables[m.name]["kl"].mean()) > study.kl_cap
    table = pd.concat([t.assign(model=name).reset_index() for name, t in tables.items()], ignore_index=True)
    return table[["model", "prompt", "score", "kl", "gold", "ref_nll", "length"]], skipped


def run_seed(paths: dict, study: arms.Study, seed: int, out: str) -> str:
    """Train and evaluate one seed (a no-op when its table exists); returns the table's path."""
    import torch

    out = Path(out)
    target = result_path(out, seed)
    if target.exists():
        return str(target)
    torch.set_num_threads(study.threads)
    progress = Progress(out, seed, study)
    start = time.time()
    diagnostics = train(paths, study, seed, out, progress)
    trained = time.time()
    table, skipped = evaluate(paths, study, seed, out, progress)
    minutes = {"training": (trained - start) / 60, "evaluation": (time.time() - trained) / 60}
    meta = {"seed": seed, "minutes": minutes, "merges": diagnostics, "not_evaluated": skipped,
            "machine": machine(study.threads), "study": arms.describe(study)}  # fmt: skip
    write_result(table, target, meta)
    return str(target)


def limit_parts(study: arms.Study) -> list[range]:
    """The held-out prompts of each part of the limit: two parts per worker, so that the last ones to
    start wait for at most half a part."""
    n = min(2 * study.workers, study.n_prompts)
    bounds = [round(i * study.n_prompts / n) for i in range(n + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def part_timing(out: str | Path, study: arms.Study, part: int) -> Path:
    """A part of the limit's minutes, written when the part is done (so it also marks it done)."""
    return Path(out) / "limit_cache" / f"part{part}-of-{len(limit_parts(study))}.json"


def run_limit_part(paths: dict, study: arms.Study, out: str, part: int):
    """Part `part` of the limit: the SFT's `limit_samples` completions of those prompts, scored
    (`limits.sft_samples`: computed once with the part's own sampling seed, then read from
    `<out>/limit_cache`). Returns (its table, prompts numbered as the seeds', and the minutes it took,
    kept beside the cache so that a resumed study still counts them)."""
    import torch

    import limits

    prompts = limit_parts(study)[part]
    timing = part_timing(out, study, part)
    ecfg = eval_config(study)
    _, tokenizer = utils.load_policy(paths["sft"])
    rows, _, _ = evaluation.eval_prompts(paths["data"], tokenizer, ecfg.n_prompts, ecfg.prompt_tokens)
    torch.set_num_threads(study.threads)
    start = time.time()
    table = limits.sft_samples(
        Path(out) / "limit_cache", paths["sft"], paths["reward_model"], [rows[i] for i in prompts],
        n_samples=study.limit_samples, temperature=ecfg.temperature, max_new_tokens=ecfg.max_new_tokens,
        seed=EVAL_SEED - 1 - part, batch_size=256,
    )  # fmt: skip
    if not timing.exists():
        checkpoints.atomic_write_text(timing, json.dumps({"minutes": (time.time() - start) / 60}))
    return table.assign(prompt=table["prompt"] + prompts.start), json.loads(timing.read_text())["minutes"]


def run_limit(paths: dict, study: arms.Study, out: str) -> str:
    """The limit's table (`<out>/evaluated/limit.csv.gz`) from its parts, each run here if not done yet."""
    import pandas as pd

    target = limit_path(Path(out))
    if not target.exists():
        parts = [run_limit_part(paths, study, out, i) for i in range(len(limit_parts(study)))]
        meta = {"minutes": sum(m for _, m in parts), "machine": machine(study.threads),
                "samples": study.limit_samples, "prompts": study.n_prompts, "parts": len(parts)}  # fmt: skip
        table = pd.concat([t for t, _ in parts], ignore_index=True)
        write_result(table[["prompt", "sample", "score"]], target, meta)
    return str(target)


def machine(threads: int) -> str:
    import torch

    from bench.machine import cpu_model

    return f"{cpu_model()}, torch {torch.__version__}, {threads} thread(s) per process"


# ------------------------------------------------------------------------------------------------------
# All seeds
# ------------------------------------------------------------------------------------------------------


def _job(job):
    kind, paths, study, arg, out = job
    if kind == "limit":
        return run_limit_part(paths, study, out, arg)[1]
    return run_seed(paths, study, arg, out)


def run_all(paths: dict, study: arms.Study, out: Path) -> None:
    """Every seed not finished yet, then the limit's parts not done yet, `study.workers` at a time, with one
    overall bar (units of RL steps, time left from the rate so far); then the limit's table."""
    from tqdm.auto import tqdm

    out = Path(out)
    jobs = [("seed", paths, study, s, str(out)) for s in study.seeds if not result_path(out, s).exists()]
    if not limit_path(out).exists():
        todo = [k for k in range(len(limit_parts(study))) if not part_timing(out, study, k).exists()]
        jobs += [("limit", paths, study, k, str(out)) for k in todo]
    limit_units = study.limit_samples * study.n_prompts / 768 * 16  # scoring only: ~16 steps per 768
    per_seed = seed_units(study)
    units = lambda job: limit_units / len(limit_parts(study)) if job[0] == "limit" else per_seed  # noqa: E731
    total = per_seed * len(study.seeds) + limit_units
    finished = total - sum(units(j) for j in jobs)
    print(f"[study] {arms.describe(study)}", flush=True)
    print(f"[study] {len(jobs)} job(s) to run in {out} ({study.workers} at once)", flush=True)
    bar = tqdm(total=round(total), initial=round(finished), desc="study", unit="step")

    def done_units() -> float:
        done = finished
        for job in jobs:
            kind, arg = job[0], job[3]
            if (part_timing(out, study, arg) if kind == "limit" else result_path(out, arg)).exists():
                done += units(job)
            elif kind == "seed" and (p := out / "progress" / f"seed{arg}.json").exists():
                done += json.loads(p.read_text())["done"]
        return done

    if study.workers == 1:  # in this process; a thread moves the bar
        import threading

        stop = threading.Event()

        def follow():
            while not stop.wait(10):
                bar.update(max(0, round(done_units()) - bar.n))

        threading.Thread(target=follow, daemon=True).start()
        try:
            for job in jobs:
                _job(job)
        finally:
            stop.set()
    else:
        with multiprocessing.get_context("spawn").Pool(study.workers) as pool:
            pending = pool.map_async(_job, jobs, chunksize=1)
            while not pending.ready():
                pending.wait(10)
                bar.update(max(0, round(done_units()) - bar.n))
            pending.get()  # re-raises a worker's error
    run_limit(paths, study, out)  # the parts' tables (cached) joined
    bar.update(round(total) - bar.n)
    bar.close()
