"""One-call check of the `imdb` preset at its real shapes, on whatever machine runs it.

Its models and data come from one of two sources, the first that is there (`--source` picks one):

- `shared`: GPT-2 small (12 layers, 768 wide, 50,257 tokens) and a DistilBERT-base-shaped reward encoder,
  built from their configs with random weights, GPT-2's real tokenizer and real IMDb reviews from
  `../shared/data` beside the checkout (no Hub needed; CI and the developers' machines have it);
- `hub`: the imdb preset's own `lvwerra/gpt2-imdb`, `distilbert-base-cased` and `stanfordnlp/imdb`, loaded
  once up front by the series' own loading functions (a Kaggle or Colab session with the internet on).

It runs the four notebooks top to bottom through papermill:

- 01 for a few hundred steps at the imdb settings with `mixed_precision="auto"` (bf16 where the GPU computes
  it natively, else fp16 with a loss scaler) and, on a bf16 GPU, once more in fp16 (a T4's path);
- 02 with I = 2, M = 2, T = 10 at batch 32 x 2 (gradient accumulation 2) through SLERP and LITI, plus the
  REINFORCE baseline (the M runs in parallel when there are 2 or more GPUs);
- 03 and 04 at small sizes;

then prints the GPU, torch and CUDA versions and, per stage: wall time, time per step, generated tokens/s,
peak GPU memory, and the projected time of each notebook at its imdb defaults (from the measured step
times). The table also goes to `<out>/gpu_check.json` and `<out>/gpu_check.md`.

    python bench/gpu_check.py                  # the check, about 8 minutes on one GPU
    python bench/gpu_check.py --smoke          # one step of everything: what the CPU test runs
    python bench/gpu_check.py --disk           # the local disk the series needs with a store (CPU is fine)
    python bench/gpu_check.py --compile        # 02-04 with compile_generation (WarpConfig, EvalConfig)
    python bench/gpu_check.py --rows 64        # 02 and 04 sample 64 rows at once (batch_size 64 x 1)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import checkpoints  # noqa: E402
import config  # noqa: E402
from bench import imdb_shaped, machine  # noqa: E402

# What each stage runs: the check's own sizes, and the smoke test's one step of everything.
CHECK = {
    "01": dict(
        epochs=1, batch_size=16, batches_per_epoch=300, val_pairs=256, eval_batch_size=64, max_length=512
    ),
    "02": dict(iterations=2, runs=2, steps=10, batch_size=32, grad_accum=2, baseline_checkpoints=2),
    "02_eval_prompts": 16,
    "03": dict(n_prompts=16, samples_per_prompt=2, etas=[0.0, 0.5, 1.0]),
    "04": dict(iterations=1, runs=2, steps=5, batch_size=32, grad_accum=2),
    "04_mus": [0.025],
    "04_eval": dict(n_prompts=16, samples_per_prompt=2),
}
SMOKE = {
    "01": dict(epochs=1, batch_size=2, batches_per_epoch=2, val_pairs=4, eval_batch_size=8, max_length=512),
    "02": dict(
        iterations=2,
        runs=2,
        steps=1,
        batch_size=2,
        grad_accum=2,
        max_new_tokens=8,
        reward_batch_size=4,
        baseline_checkpoints=1,
    ),  # fmt: skip
    "02_eval_prompts": 2,
    "03": dict(n_prompts=2, samples_per_prompt=1, max_new_tokens=8, etas=[0.0, 1.0]),
    "04": dict(
        iterations=1, runs=2, steps=1, batch_size=2, grad_accum=1, max_new_tokens=8, reward_batch_size=4
    ),
    "04_mus": [0.025],
    "04_eval": dict(n_prompts=2, samples_per_prompt=1, max_new_tokens=8),
}
# The disk check: one step of everything, but as many states as the imdb defaults keep (I = 2, M = 2, five
# REINFORCE snapshots, three mu values of which 02's is reused) and a folder store, as on Kaggle with STORE.
DISK = {
    **SMOKE,
    "02": dict(SMOKE["02"], steps=2, save_every=1, baseline_checkpoints=5),
    "04": dict(SMOKE["02"], steps=2, save_every=1),
    "04_mus": [0.01, 0.025, 0.05],
}
# The imdb defaults the projections are for (01's RewardConfig, WarpConfig, EvalConfig, 04's MUS).
# 01 trains its "measured" schedule, 4 epochs of 128 steps, and scores its 6,400 held-out pairs 4 + 2 times:
# before training (the untrained head), after each epoch, and once more the model as saved
IMDB_01_STEPS, IMDB_01_VAL_PAIRS, IMDB_01_VALIDATIONS = 4 * 128, 6400, 4 + 2
IMDB_02_STEPS = 2 * 2 * 100 * 2  # I x M x T of WARP, and as many REINFORCE steps
IMDB_03_SEQUENCES = (
    (4 + 11 + 5) * 100 * 4
)  # (models + eta points + REINFORCE checkpoints) x prompts x samples
IMDB_04_STEPS, IMDB_04_SEQUENCES = 3 * 2 * 2 * 100, 4 * 100 * 4


SOURCES = ("shared", "hub")


def choose_source(shared: Path, wanted: str = "auto", hub_reachable=config.hub_reachable) -> str:
    """Where the check's models and data come from: `wanted` if given, else `shared` when `shared` has the
    files, else `hub` when the Hub answers; stops with what is missing and how to provide it."""
    missing = imdb_shaped.missing_shared(shared)
    if wanted == "shared" and missing:
        raise SystemExit(f"--source shared: {missing}")
    if wanted != "auto":
        return wanted
    if missing is None:
        return "shared"
    if hub_reachable():
        return "hub"
    raise SystemExit(
        f"no models or data for the check: {missing} (pass --shared FOLDER), and the Hugging Face Hub "
        f"does not answer for {', '.join(config.IMDB_IDS.values())} (turn the internet on: Kaggle: "
        f"Settings -> Internet -> on; Colab: reconnect the runtime)"
    )


def hub_assets() -> dict[str, str]:
    """The imdb preset's Hub ids, each loaded once here (into the Hub cache the notebooks then read) by the
    series' loading functions, so a missing model or data set stops the check before any stage runs."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import utils

    ids = dict(config.IMDB_IDS)
    utils.load_policy(ids["sft"])
    AutoTokenizer.from_pretrained(ids["reward_base"])  # as 01 loads its base: a fresh one-output head
    AutoModelForSequenceClassification.from_pretrained(ids["reward_base"], num_labels=1)
    utils.load_reviews(ids["data"], "train")
    utils.load_reviews(ids["data"], "test")
    return ids


def native_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


class PeakDisk:
    """Samples the size of a folder in a background thread; `peak` is the largest seen (bytes)."""

    def __init__(self, folder: Path, every: float = 0.2):
        import threading

        self.folder, self.every, self.peak, self.stage_peak = folder, every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _size(self) -> int:
        return checkpoints.folder_bytes(self.folder)

    def _watch(self) -> None:
        while not self._stop.wait(self.every):
            size = self._size()
            self.peak, self.stage_peak = max(self.peak, size), max(self.stage_peak, size)

    def stage(self) -> dict[str, float]:
        """Disk since the last call: the peak (GB) and the size now (GB); starts the next stage."""
        now = self._size()
        row = {"peak disk GB": max(self.stage_peak, now) / 1e9, "disk GB": now / 1e9}
        self.stage_peak = now
        return row

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._size())


def run_notebook(name: str, work: Path, **parameters) -> float:
    """Execute `name`.ipynb on the imdb preset with papermill; return its wall seconds."""
    import os

    import papermill

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    start = time.time()
    papermill.execute_notebook(
        str(ROOT / f"{name}.ipynb"), str(work / f"{name}.out.ipynb"), cwd=str(work), kernel_name="python3",
        progress_bar=False,
        parameters={"PRESET": "imdb", "CHECKPOINTS": str(work / "ck"), "STORE": STORE, **parameters},
    )  # fmt: skip
    return time.time() - start


STORE = ""  # the checkpoint store the notebooks get (`--disk` sets a folder beside the checkpoints)
RL_OVERRIDES: dict = {}  # WarpConfig fields for 02 and 04 (`--compile`, `--rows`)
EVAL_OVERRIDES: dict = {}  # EvalConfig fields for 03 and 04 (`--compile`)


def rl_speed(run_dirs: list[Path], rows_per_step: int) -> dict[str, float]:
    """Median seconds per RL step, generated tokens/s and peak GPU memory over the runs' metrics."""
    steps = [h for d in run_dirs for h in json.loads((d / "metrics.json").read_text())]
    seconds = statistics.median(h["time/step_seconds"] for h in steps)
    tokens = statistics.mean(h["policy/completion_length"] for h in steps) * rows_per_step
    peak = max((h.get("memory/peak_gib", 0.0) for h in steps), default=0.0)
    return {"s/step": seconds, "tokens/s": tokens / seconds, "peak GiB": peak or None, "steps": len(steps)}


def run_check(out: Path, sizes: dict, shared: Path | None = None, source: str = "shared") -> dict:
    """Build the imdb-shaped assets in `out` (`source` shared) or fetch the imdb preset's (hub), run the
    four notebooks on them, return the measurements."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if source == "hub":
        assets = hub_assets()
    else:
        assets = imdb_shaped.build_assets(out / "assets", shared or imdb_shaped.SHARED)
    result = {"machine": machine.describe(), "assets_seconds": time.time() - start, "stages": {}}
    result["source"] = source
    stages = result["stages"]
    ck = out / "ck"

    def report() -> None:  # after each stage, so that a run cut short still leaves its measurements
        result["total_seconds"] = time.time() - start
        now = checkpoints.folder_bytes(ck)
        result["disk_gb"], result["disk_peak_gb"] = now / 1e9, max(disk.peak, now) / 1e9
        result["store"] = STORE or None
        result["rl_overrides"], result["eval_overrides"] = RL_OVERRIDES, EVAL_OVERRIDES
        save(result, out)

    with PeakDisk(ck) as disk:
        run_stages(out, ck, assets, sizes, stages, disk, report)
    report()
    return result


def save(result: dict, out: Path) -> None:
    """Write the measurements so far to `<out>/gpu_check.json` and `<out>/gpu_check.md`."""
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    (out / "gpu_check.md").write_text(table(result) + "\n")


def run_stages(out, ck, assets, sizes, stages: dict, disk: PeakDisk, report=lambda: None) -> None:
    """The four notebooks at `sizes`, each stage's measurements (and its local disk) added to `stages`;
    `report()` is called after each stage."""

    # 01: the default ("auto": bf16 where native, fp16 elsewhere, none on the CPU), and fp16 on a bf16 GPU
    reward = dict(reward_base=assets["reward_base"], data=assets["data"], **sizes["01"])
    precisions = ["auto"] + (["fp16"] if native_bf16() else [])
    for precision in precisions:
        folder = "reward_model" if precision == "auto" else f"reward_model_{precision}"
        overrides = {**reward, "mixed_precision": precision, "out_dir": str(ck / folder)}
        wall = run_notebook("01_reward_model", out, OVERRIDES=overrides)
        m = json.loads((ck / folder / "metrics.json").read_text())
        step = (m["train_seconds"] - m["val_seconds"]) / m["steps"]
        val_per_pair = m["val_seconds"] / (m["epochs"] * m["val_pairs"])  # validated after each epoch
        projected = step * IMDB_01_STEPS + val_per_pair * IMDB_01_VAL_PAIRS * IMDB_01_VALIDATIONS
        stages[f"01 ({m['mixed_precision']})"] = {
            "wall s": wall, "s/step": step, "peak GiB": m["peak_gpu_memory_gib"], "steps": m["steps"],
            "held-out ms/pair": 1e3 * val_per_pair,
            "projected imdb min": projected / 60, **disk.stage(),
        }  # fmt: skip
        report()

    # 02: WARP and the REINFORCE baseline
    warp_cfg = dict(sft=assets["sft"], data=assets["data"], **{**sizes["02"], **RL_OVERRIDES})
    wall = run_notebook("02_warp_training", out, OVERRIDES=warp_cfg, EVAL_PROMPTS=sizes["02_eval_prompts"])
    rows = warp_cfg["batch_size"] * warp_cfg["grad_accum"]
    runs_02 = sorted((ck / "warp").glob("iter*/run*")) + [ck / "warp" / "reinforce"]
    speed = rl_speed(runs_02, rows)
    stages["02"] = {"wall s": wall, **speed, "projected imdb min": speed["s/step"] * IMDB_02_STEPS / 60}
    stages["02"].update(disk.stage())
    report()

    # 03: evaluation of everything 02 wrote
    # the reference LM of the perplexity column: imdb's gpt2-medium needs the Hub; GPT-2 small's shapes
    # (random weights) stand in for it in the check (gpt2-medium's pass costs about 3x more), none in smoke
    reference = "" if sizes is not CHECK else assets["sft"]
    evaluation = {**sizes["03"], **EVAL_OVERRIDES}
    wall = run_notebook("03_generation_eval", out, OVERRIDES=evaluation, REFERENCE_LM=reference)
    n_eval = len(json.loads((ck / "eval" / "headline.json").read_text())["pareto"]) + 4
    sequences = n_eval * sizes["03"]["n_prompts"] * sizes["03"]["samples_per_prompt"]
    stages["03"] = {"wall s": wall, "projected imdb min": wall / sequences * IMDB_03_SEQUENCES / 60}
    stages["03"].update(disk.stage())
    report()

    # 04: the mu sweep, small
    sweep = dict(sft=assets["sft"], data=assets["data"], **{**sizes["04"], **RL_OVERRIDES})
    wall = run_notebook(
        "04_mu_sweep",
        out,
        MUS=sizes["04_mus"],
        OVERRIDES=sweep,
        EVAL_OVERRIDES={**sizes["04_eval"], **EVAL_OVERRIDES},
    )
    speed = rl_speed(
        sorted((ck / "mu_sweep").glob("mu=*/iter*/run*")), sweep["batch_size"] * sweep["grad_accum"]
    )
    stages["04"] = {"wall s": wall, **speed, "projected imdb min": speed["s/step"] * IMDB_04_STEPS / 60}
    stages["04"].update(disk.stage())


def table(result: dict) -> str:
    """The measurements as a markdown table, with the machine on top."""
    m = result["machine"]
    cols = ["wall s", "s/step", "held-out ms/pair", "tokens/s", "peak GiB", "projected imdb min"]
    cols += ["peak disk GB", "disk GB"]
    fmt = lambda v: "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = [
        f"GPU: {m['gpu']} (x{m['gpus']}), torch {m['torch']}, CUDA {m['cuda']}; "
        f"models and data: {result.get('source', 'shared')}; "
        f"total {result['total_seconds'] / 60:.1f} min; local checkpoints {result['disk_gb']:.1f} GB at the "
        f"end, {result['disk_peak_gb']:.1f} GB at the peak (store: {result['store'] or 'none'})"
        + (f"; 02 and 04 train with {result['rl_overrides']}" if result.get("rl_overrides") else "")
        + (f"; 03 and 04 evaluate with {result['eval_overrides']}" if result.get("eval_overrides") else ""),
        "",
        "| stage | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for stage, row in result["stages"].items():
        lines.append(f"| {stage} | " + " | ".join(fmt(row.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default="runs/gpu_check", help="working folder (assets, checkpoints, results)"
    )
    parser.add_argument("--smoke", action="store_true", help="one step of every stage (the CPU test)")
    parser.add_argument(
        "--disk", action="store_true",
        help="one step of everything with the imdb defaults' number of states and a folder store: the local "
        "disk the series needs on Kaggle/Colab (peak and end)",
    )  # fmt: skip
    parser.add_argument("--shared", default=None, help="folder with gpt2_tokenizer/ and imdb_train_4k.jsonl")
    parser.add_argument(
        "--source", default="auto", choices=["auto", *SOURCES],
        help="models and data: random-weight shapes from --shared, or the imdb preset's from the Hub; "
        "auto: shared when its files are there, else the Hub",
    )  # fmt: skip
    parser.add_argument(
        "--compile", action="store_true", help="02, 03 and 04 sample with the compiled decode step"
    )
    parser.add_argument(
        "--rows", type=int, default=None, choices=[16, 32, 64],
        help="02 and 04 sample this many rows at once (batch_size), 64 a step as the preset (grad_accum)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    shared = Path(args.shared) if args.shared else None
    source = choose_source(shared or imdb_shaped.SHARED, args.source)
    print(f"models and data: {source}", "(random weights, real tokenizer and reviews)" * (source == "shared"))
    out = Path(args.out)
    global STORE, RL_OVERRIDES, EVAL_OVERRIDES
    STORE = str((out / "store").resolve()) if args.disk else ""
    RL_OVERRIDES = {"compile_generation": True} if args.compile else {}
    EVAL_OVERRIDES = {"compile_generation": True} if args.compile else {}
    if args.rows:
        RL_OVERRIDES.update(batch_size=args.rows, grad_accum=64 // args.rows)
    result = run_check(out, DISK if args.disk else SMOKE if args.smoke else CHECK, shared, source)
    print(table(result))
    return result


if __name__ == "__main__":
    main()
