"""01's held-out accuracy against its training budget, on real IMDb reviews, on the CPU.

Trains 01's own recipe (the notebook itself, run with papermill: LoRA on query/value + head, or the
last layer + head; its lr and batch size; max_length 512) with the offline preset's pretrained MiniLM
encoder on `../shared/data/imdb_train_4k.jsonl`, split once into training reviews and held-out reviews
(half positive, half negative). The learning rate is constant, so one long run scored at doubling budgets
equals separate runs of each budget: session k of the notebook trains one epoch that brings the pairs
seen to `start x 2^k` (a near-zero `time_budget_minutes` ends a session after one epoch, and
`batches_per_epoch`, a field a run may resume with, sizes it), and the held-out reviews are scored after
it. Held-out pairwise accuracy counts all (positive, negative) pairs of held-out reviews with
r(positive) > r(negative); the notebook's fixed pairs (each review in one pair) are reported beside it.

The rule (issue #12): the chosen budget is the smallest one past which a doubling gains less than `--tol`
(0.005) held-out accuracy; a mode stops there, at `--max-budget`, or when its `--minutes` would run out.

    python bench/reward_budget.py                       # LoRA, then last_layer; writes docs/reward_budget.*
    python bench/reward_budget.py --modes lora --max-budget 32768 --minutes 300 --threads 4 --resume

With `--resume`, the outputs also list the curves of other modes already in `--out`, untouched.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.machine import cpu_model  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data" / "imdb_train_4k.jsonl"
NOTEBOOK = ROOT / "01_reward_model.ipynb"
MODES = ("lora", "last_layer")  # 01's ways to train the reward model


def split_reviews(source: Path, folder: Path, heldout: int, seed: int = 0) -> dict[str, int]:
    """Write `folder/train.jsonl` and `folder/test.jsonl` (IMDb's format, what `utils.load_reviews` reads
    from a folder): `heldout` reviews, half positive and half negative, chosen by a seeded shuffle; the
    rest train. Returns the counts."""
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(seed).shuffle(rows)
    by_label = {label: [r for r in rows if r["label"] == label] for label in (0, 1)}
    test = by_label[1][: heldout // 2] + by_label[0][: heldout // 2]
    train = by_label[1][heldout // 2 :] + by_label[0][heldout // 2 :]
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("test", test)):
        text = "".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in part)
        (folder / f"{name}.jsonl").write_text(text, encoding="utf-8")
    return {"train": len(train), "heldout": len(test)}


def all_pairs_accuracy(r_pos, r_neg) -> float:
    """Share of all (positive, negative) held-out pairs with r(positive) > r(negative) (a tie is wrong)."""
    return (r_pos[:, None] > r_neg[None, :]).float().mean().item()


def run_session(work: Path, overrides: dict, threads: int) -> float:
    """One session of 01 in `work` (papermill, a fresh kernel); returns its wall seconds."""
    import papermill

    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits them
    parameters = {"PRESET": "imdb", "CHECKPOINTS": str(work / "ck"), "OVERRIDES": overrides}
    start = time.time()
    try:
        papermill.execute_notebook(
            str(NOTEBOOK), str(work / "01.out.ipynb"), cwd=str(work), kernel_name="python3",
            progress_bar=False, parameters=parameters,
        )  # fmt: skip
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return time.time() - start


def chosen_budget(rows: list[dict], tol: float) -> int | None:
    """The rule: the smallest budget whose doubling gained less than `tol` held-out accuracy, if any."""
    trained = [r for r in rows if r["pairs"] > 0]
    for before, after in zip(trained, trained[1:], strict=False):
        if after["heldout_accuracy"] - before["heldout_accuracy"] < tol:
            return before["pairs"]
    return None


def read_progress(path: Path) -> dict:
    """01's progress file, its tensors on the CPU whatever device wrote them (a session on a GPU)."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def budget_curve(mode: str, args, data: Path, deadline: float) -> tuple[list[dict], int | None, dict]:
    """Train `mode` session by session to doubling budgets; the curve's rows, the chosen budget (None
    when the rule did not stop within the budgets or the time) and the notebook's saved config. With
    `args.resume`, a curve this folder holds is continued (same --start, --heldout and settings)."""

    work = Path(args.out).resolve() / mode
    progress_file = work / "ck" / "reward_model_progress" / "progress.pt"
    curve_file = work / "curve.json"  # the rows so far, written after every session
    rows = []
    if args.resume and curve_file.exists() and progress_file.exists():
        rows = json.loads(curve_file.read_text())
        assert read_progress(progress_file)["history"][-1]["pairs"] == rows[-1]["pairs"]
        print(f"{mode}: continuing the curve in {work} after {rows[-1]['pairs']} pairs")
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    budgets = [args.start * 2**k for k in range(64) if args.start * 2**k <= args.max_budget]
    previous = rows[-1]["pairs"] if rows else 0
    for budget in [b for b in budgets if b > previous]:
        if chosen_budget(rows, args.tol) is not None:
            break
        # the next session trains as many pairs as all before it: about as long as they took
        if rows and time.time() + 60 * rows[-1]["wall_minutes"] > deadline:
            print(f"{mode}: stopping at {previous} pairs, the next doubling would pass --minutes")
            break
        overrides = {
            "reward_base": args.reward_base,
            "data": str(data),
            "mode": mode,
            "batch_size": args.batch_size,
            "batches_per_epoch": (budget - previous) // args.batch_size,  # this epoch's pairs
            "epochs": len(budgets) + 1,  # never the last epoch: the session stops, its progress stays
            "time_budget_minutes": 1e-9,  # one epoch per session
            "val_pairs": args.heldout // 2,  # each held-out review in one fixed pair, scored every epoch
            "max_length": args.max_length,
            "eval_batch_size": args.eval_batch_size,
            "show_reviews": 0,
            "mixed_precision": args.precision,
        }
        seconds = run_session(work, overrides, args.threads)
        progress = read_progress(progress_file)
        last = progress["history"][-1]
        assert last["pairs"] == budget, (last["pairs"], budget)
        if not rows:  # the untrained head (epoch 0), for reference
            first = progress["history"][0]
            rows.append(dict(mode=mode, pairs=0, heldout_accuracy=None, **_figs(first), train_minutes=0.0))
            rows[-1]["wall_minutes"] = 0.0
        r_pos, r_neg = progress["val_scores"]
        rows.append(
            dict(
                mode=mode,
                pairs=budget,
                heldout_accuracy=round(all_pairs_accuracy(r_pos, r_neg), 4),
                **_figs(last),
                train_minutes=round((progress["train_seconds"] - progress["val_seconds"]) / 60, 2),
                wall_minutes=round(rows[-1]["wall_minutes"] + seconds / 60, 2),
            )
        )
        curve_file.write_text(json.dumps(rows, indent=1))
        print(
            f"{mode} {budget:>6} pairs: held-out accuracy {rows[-1]['heldout_accuracy']:.4f} (all pairs), "
            f"{rows[-1]['fixed_pairs_accuracy']:.4f} (fixed pairs); {rows[-1]['train_minutes']:.1f} min "
            f"training, {rows[-1]['wall_minutes']:.1f} min in all",
            flush=True,
        )
        previous = budget
    return rows, chosen_budget(rows, args.tol), saved_config(work)


def saved_config(work: Path) -> dict:
    """The config a mode's notebook saved in its working folder."""
    return json.loads((work / "ck" / "reward_model_progress" / "config.json").read_text())


def _figs(entry: dict) -> dict:
    """The notebook's own held-out figures of one history entry."""
    return {
        "fixed_pairs_accuracy": round(entry["pairwise_accuracy"], 4),
        "reward_gap": round(entry["reward_gap"], 3),
        "val_loss": round(entry["val_loss"], 4),
    }


def machine_text(threads: int) -> str:
    """The CPU model, its core count and the threads used."""
    return f"{cpu_model()}, {os.cpu_count()} cores (nproc), {threads} thread(s) used"


def plot(rows: list[dict], chosen: dict, path: Path, title: str) -> None:
    """Held-out accuracy against training pairs (log scale), one line per mode, the chosen budgets marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        pts = [r for r in rows if r["mode"] == mode and r["pairs"] > 0]
        line = ax.plot(
            [r["pairs"] for r in pts], [r["heldout_accuracy"] for r in pts], marker="o", label=mode
        )
        if chosen.get(mode):
            acc = next(r["heldout_accuracy"] for r in pts if r["pairs"] == chosen[mode])
            ax.plot([chosen[mode]], [acc], marker="*", ms=16, color=line[0].get_color(), ls="none")
            ax.annotate(
                f"chosen: {chosen[mode]}", (chosen[mode], acc), textcoords="offset points", xytext=(6, -14)
            )
    ax.set_xscale("log", base=2)
    ax.set(xlabel="training pairs (log scale)", ylabel="held-out pairwise accuracy (all pairs)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    """The curve as a markdown table."""
    lines = [
        "| mode | training pairs | held-out accuracy (all pairs) | fixed pairs | reward gap | "
        "training min | min in all |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["pairs"] == 0:
            continue
        lines.append(
            f"| {r['mode']} | {r['pairs']} | {r['heldout_accuracy']:.4f} | {r['fixed_pairs_accuracy']:.4f} | "
            f"{r['reward_gap']:.2f} | {r['train_minutes']:.1f} | {r['wall_minutes']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(SHARED_DATA), help="reviews in IMDb's format (.jsonl)")
    parser.add_argument("--heldout", type=int, default=1000, help="held-out reviews (half positive)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="the modes to train")
    parser.add_argument("--start", type=int, default=64, help="the first budget, in training pairs")
    parser.add_argument("--max-budget", type=int, default=8192, help="the largest budget tried")
    parser.add_argument("--tol", type=float, default=0.005, help="the rule: a doubling gains less than this")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per step (01's imdb batch_size)")
    parser.add_argument(
        "--max-length", type=int, default=512, help="tokens per review (01's imdb max_length)"
    )
    parser.add_argument("--eval-batch-size", type=int, default=16, help="held-out reviews per forward pass")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the notebook's kernel")
    parser.add_argument(
        "--precision", choices=["no", "bf16"], default="no",
        help="01's mixed_precision: bf16 autocast on a CPU with native bf16 (avx512_bf16) is faster",
    )  # fmt: skip
    parser.add_argument(
        "--minutes", type=float, nargs="+", default=[40.0, 15.0], help="wall time per mode (the last repeats)"
    )
    parser.add_argument("--resume", action="store_true", help="continue the curves already in --out")
    parser.add_argument(
        "--out", default="runs/reward_budget", help="working folder (data split, checkpoints)"
    )
    parser.add_argument("--docs", default="docs", help="where reward_budget.{csv,json,md,png} go")
    args = parser.parse_args(argv)
    if args.start % args.batch_size:
        parser.error(f"--start {args.start} must be a multiple of --batch-size {args.batch_size}")
    import config

    args.reward_base = config.minilm_dir()
    data = Path(args.data)
    if not data.exists():
        raise SystemExit(f"{data}: no such file (the 4,000 real reviews of ../shared/data)")
    out = Path(args.out).resolve()  # the notebook runs in a folder of its own
    counts = split_reviews(data, out / "data", args.heldout)  # the same split every time: --resume reuses it
    print(
        f"{counts['train']} training reviews, {counts['heldout']} held-out; {machine_text(args.threads)}",
        flush=True,
    )

    start = time.time()
    curves = {}  # mode -> (rows, chosen budget, saved config)
    for i, mode in enumerate(args.modes):
        deadline = time.time() + 60 * args.minutes[min(i, len(args.minutes) - 1)]
        curves[mode] = budget_curve(mode, args, out / "data", deadline)
    for mode in MODES:  # with --resume the outputs list the other modes' curves in --out too, untouched
        if mode not in curves and args.resume and (out / mode / "curve.json").exists():
            mode_rows = json.loads((out / mode / "curve.json").read_text())
            curves[mode] = (mode_rows, chosen_budget(mode_rows, args.tol), saved_config(out / mode))
            print(f"{mode}: its curve in {out / mode} (to {mode_rows[-1]['pairs']} pairs), not trained now")
    rows, chosen, settings = [], {}, {}
    keys = ("lr", "batch_size", "max_length", "lora_r", "weight_decay", "mixed_precision")
    for mode, (mode_rows, chosen[mode], saved) in curves.items():
        rows += mode_rows
        settings[mode] = {k: saved[k] for k in keys}

    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    csv = [",".join(columns)] + [
        ",".join("" if r.get(c) is None else str(r[c]) for c in columns) for r in rows
    ]
    (docs / "reward_budget.csv").write_text("\n".join(csv) + "\n")
    result = {
        "command": "python bench/reward_budget.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_text(args.threads),
        "torch": __import__("torch").__version__,
        "reviews": counts,
        "rule": f"smallest budget past which a doubling gains < {args.tol} held-out accuracy (all pairs)",
        "chosen_pairs": chosen,
        "settings": settings,
        "minutes": round((time.time() - start) / 60, 1),
        "curve": rows,
    }
    (docs / "reward_budget.json").write_text(json.dumps(result, indent=2) + "\n")
    text = table(rows)
    (docs / "reward_budget.md").write_text(text + "\n")
    title = f"01 on {counts['train']} real IMDb reviews, MiniLM, {counts['heldout']} held out"
    plot(rows, chosen, docs / "reward_budget.png", title)
    print(text)
    for mode, pairs in chosen.items():
        if pairs is None:
            print(f"{mode}: the rule did not stop within the budgets tried (raise --max-budget or --minutes)")
        else:
            acc = next(r["heldout_accuracy"] for r in rows if r["mode"] == mode and r["pairs"] == pairs)
            print(f"{mode}: chosen budget {pairs} training pairs, held-out accuracy {acc:.4f}")
    print(f"{result['minutes']} min in all; outputs in {docs}/reward_budget.*")
    return result


if __name__ == "__main__":
    main()
