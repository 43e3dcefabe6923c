"""How much the reward of a text with IMDb's `<br />` line breaks moves when it is cleaned, on real reviews.

01 trains its reward model on reviews cleaned by `utils.clean_review` (breaks to spaces, `\\"` to `"`);
the policy, GPT-2 fine-tuned on raw IMDb, writes `<br /><br />` about once per completion, and the RL
reward now cleans the decoded text before scoring it (`utils.make_reward_fn`). This measures what that
changes: a reward model trained by 01 itself (papermill, `bench/reward_budget.py`'s split and session) on
the real reviews of `../shared/data/imdb_train_4k.jsonl` scores held-out reviews twice, with their markup
and cleaned, and the shift d = r(with markup) - r(cleaned) is summarised per case:

- `breaks`: held-out reviews that contain `<br />` (as IMDb has them), their quotes already unescaped, so
  that d is the breaks' effect alone; cut to a completion-like snippet (the first ~`--snippet-chars`
  characters, cut at a word boundary after the first break) and whole.
- `breaks+quotes`: the same snippets exactly as in the file (`<br />` and `\\"`): what the raw reward
  scored where the policy writes both.
- `inserted` (the control, the policy's case): held-out reviews without a break, one `<br /><br />`
  put at a random word boundary; snippet and whole.

Per case: mean and median |d|, mean d with its 95% interval (normal, mean +- 1.96 sd / sqrt(n)), how often
the reward's sign flips (about 0, 01's arbitrary zero, and about the held-out midpoint, the mean of the
positive and negative means), and mean |d| and mean d in units of the held-out gap (mean r(positive) -
mean r(negative) over all held-out reviews, cleaned, whole).

    python bench/markup_shift.py                    # trains once into runs/markup_shift, then reuses it
    python bench/markup_shift.py --mode lora --pairs 1024 --retrain
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import statistics
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import machine  # noqa: E402
from bench.reward_budget import SHARED_DATA, run_session, split_reviews  # noqa: E402

BREAK = re.compile(r"<br\s*/?>", flags=re.IGNORECASE)  # the markup utils.clean_review removes
POLICY_BREAK = "<br /><br />"  # what the policy writes, between two sentences


# --- the texts ----------------------------------------------------------------------------------------


def _tag_spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in BREAK.finditer(text)]


def word_boundaries(text: str) -> list[int]:
    """Positions of the whitespace characters of `text` that lie outside a `<br />` tag."""
    spans = _tag_spans(text)
    return [
        i for i, c in enumerate(text) if c.isspace() and not any(a <= i < b for a, b in spans)
    ]  # fmt: skip


def snippet(text: str, chars: int) -> str:
    """The start of `text`, cut at the first word boundary at or past `chars` characters and past the end
    of its first break (so a snippet of a review with a break has one, with text after it); the whole
    text when there is no such boundary."""
    first = BREAK.search(text)
    target = max(chars, first.end() + 1 if first else 0)
    cut = next((i for i in word_boundaries(text) if i >= target), len(text))
    return text[:cut]


def insert_break(text: str, rng: random.Random) -> str:
    """`text` with the whitespace at a random word boundary replaced by `<br /><br />`, as the policy
    writes it ("end.<br /><br />Next"): cleaning gives the text back (single-spaced text)."""
    spaces = word_boundaries(text)
    i = rng.choice(spaces)
    return text[:i] + POLICY_BREAK + text[i + 1 :]


def unescape_quotes(text: str) -> str:
    """IMDb's `\\"` as `"`, the other half of `utils.clean_review`: a review so changed differs from its
    cleaned text by its breaks (and whitespace) alone."""
    return text.replace('\\"', '"')


def markup_cases(rows: list[dict], snippet_chars: int, seed: int = 0) -> dict[str, list[str]]:
    """The texts with markup of each case (see the module's docstring) from raw held-out `rows`."""
    import utils

    with_breaks = [unescape_quotes(r["text"]) for r in rows if BREAK.search(r["text"])]
    raw = [r["text"] for r in rows if BREAK.search(r["text"])]
    without = [utils.clean_review(r["text"]) for r in rows if not BREAK.search(r["text"])]
    rng = random.Random(seed)
    return {
        "breaks, snippet": [snippet(t, snippet_chars) for t in with_breaks],
        "breaks, whole": with_breaks,
        "breaks+quotes, snippet": [snippet(t, snippet_chars) for t in raw],
        "inserted, snippet": [insert_break(snippet(t, snippet_chars), rng) for t in without],
        "inserted, whole": [insert_break(t, rng) for t in without],
    }


# --- the figures --------------------------------------------------------------------------------------


def shift_stats(r_markup, r_clean, gap: float, midpoint: float) -> dict:
    """Summary of d = r_markup - r_clean (two equal-length sequences of floats)."""
    d = [float(a) - float(b) for a, b in zip(r_markup, r_clean, strict=True)]
    n = len(d)
    mean = statistics.fmean(d)
    half = 1.96 * statistics.stdev(d) / math.sqrt(n) if n > 1 else float("nan")
    pairs = list(zip(r_markup, r_clean, strict=True))
    flips = lambda c: sum((float(a) > c) != (float(b) > c) for a, b in pairs) / n
    mean_abs = statistics.fmean(abs(x) for x in d)
    return {
        "n": n,
        "mean_abs": mean_abs,
        "median_abs": statistics.median(abs(x) for x in d),
        "mean": mean,
        "ci95": [mean - half, mean + half],
        "sign_flips": flips(0.0),
        "midpoint_flips": flips(midpoint),
        "mean_abs_over_gap": mean_abs / gap,
        "mean_over_gap": mean / gap,
        "max_abs": max(abs(x) for x in d),
    }


def measure(model, tokenizer, rows: list[dict], snippet_chars: int, batch_size: int, max_length: int) -> dict:
    """Score every case's texts with markup and cleaned (`utils.clean_review`); the held-out gap and
    midpoint from all `rows` cleaned; the figures per case."""
    import utils

    score = lambda texts: utils.score_texts(model, tokenizer, texts, batch_size, max_length).tolist()
    clean = [utils.clean_review(r["text"]) for r in rows]
    r_all = score(clean)
    pos = [r for r, row in zip(r_all, rows, strict=True) if row["label"] == 1]
    neg = [r for r, row in zip(r_all, rows, strict=True) if row["label"] == 0]
    gap = statistics.fmean(pos) - statistics.fmean(neg)
    midpoint = (statistics.fmean(pos) + statistics.fmean(neg)) / 2
    cases = {}
    for name, texts in markup_cases(rows, snippet_chars).items():
        r_markup = score(texts)
        r_clean = score([utils.clean_review(t) for t in texts])
        cases[name] = shift_stats(r_markup, r_clean, gap, midpoint)
    return {
        "heldout": {"reviews": len(rows), "gap": gap, "midpoint": midpoint, "sd": statistics.stdev(r_all)},
        "cases": cases,
    }


def table(report: dict) -> str:
    """The figures per case as a markdown table."""
    lines = [
        "| case | n | mean \\|d\\| | median \\|d\\| | mean d [95% CI] | sign flips | midpoint flips | "
        "mean \\|d\\| / gap | mean d / gap |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in report["cases"].items():
        lines.append(
            f"| {name} | {s['n']} | {s['mean_abs']:.3f} | {s['median_abs']:.3f} | {s['mean']:+.3f} "
            f"[{s['ci95'][0]:+.3f}, {s['ci95'][1]:+.3f}] | {s['sign_flips']:.1%} | "
            f"{s['midpoint_flips']:.1%} | "
            f"{s['mean_abs_over_gap']:.3f} | {s['mean_over_gap']:+.3f} |"
        )
    return "\n".join(lines)


# --- the reward model ---------------------------------------------------------------------------------


def train_reward_model(args, out: Path) -> Path:
    """01 run once (papermill) in `out`: `args.pairs` training pairs in one epoch; returns the saved
    model's folder. A finished model already there (its metrics.json) is reused unless `args.retrain`."""
    import shutil

    import config

    model_dir = out / "ck" / "reward_model"
    wanted = {"mode": args.mode, "pairs": args.pairs, "max_length": args.max_length, "heldout": args.heldout}
    stamp = out / "trained.json"  # what the model in this folder was trained with
    if not args.retrain and (model_dir / "metrics.json").exists() and stamp.exists():
        if json.loads(stamp.read_text()) == wanted:
            print(f"reusing the reward model in {model_dir} ({wanted})", flush=True)
            return model_dir
        print(f"the model in {model_dir} was trained otherwise: training again", flush=True)
    shutil.rmtree(out / "ck", ignore_errors=True)
    overrides = {
        "reward_base": config.minilm_dir(),
        "data": str(out / "data"),
        "mode": args.mode,
        "batch_size": args.batch_size,
        "batches_per_epoch": args.pairs // args.batch_size,
        "epochs": 1,
        "val_pairs": 16,  # the notebook's own check; this script scores all held-out reviews itself
        "max_length": args.max_length,
        "eval_batch_size": 16,
        "show_reviews": 0,
        "mixed_precision": args.precision,
    }
    print(f"training 01 ({args.mode}, {args.pairs} pairs, {args.threads} thread(s)) in {out}", flush=True)
    seconds = run_session(out, overrides, args.threads)
    stamp.write_text(json.dumps(wanted))
    print(f"trained in {seconds / 60:.1f} min", flush=True)
    return model_dir


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(SHARED_DATA), help="reviews in IMDb's format (.jsonl)")
    parser.add_argument("--heldout", type=int, default=400, help="held-out reviews (half positive)")
    parser.add_argument("--mode", choices=["lora", "last_layer"], default="last_layer", help="01's mode")
    parser.add_argument("--pairs", type=int, default=1024, help="training pairs of the reward model")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per step (01's imdb batch_size)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per review (01's imdb)")
    parser.add_argument("--precision", choices=["no", "bf16"], default="bf16", help="01's mixed_precision")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (training and scoring)")
    parser.add_argument("--snippet-chars", type=int, default=400, help="completion-like length of a snippet")
    parser.add_argument("--model", default="", help="score with this saved reward model; train none")
    parser.add_argument("--retrain", action="store_true", help="train even if --out holds a model")
    parser.add_argument("--out", default="runs/markup_shift", help="working folder (split, checkpoints)")
    parser.add_argument("--docs", default="docs", help="where markup_shift.{md,json} go")
    args = parser.parse_args(argv)
    data = Path(args.data)
    if not data.exists():
        print(f"skipped: {data} not found (the 4,000 real reviews of ../shared/data)")
        return {}
    import torch

    import utils

    torch.set_num_threads(args.threads)
    start = time.time()
    out = Path(args.out).resolve()
    counts = split_reviews(data, out / "data", args.heldout)  # reward_budget's split (seed 0)
    model_dir = Path(args.model) if args.model else train_reward_model(args, out)
    rows = [json.loads(line) for line in (out / "data" / "test.jsonl").read_text().splitlines()]

    model, tokenizer = utils.load_reward_model(str(model_dir))
    scoring = time.time()
    report = measure(model, tokenizer, rows, args.snippet_chars, 16, args.max_length)
    metrics_file = model_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    result = {
        "command": " ".join(["python bench/markup_shift.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": date.today().isoformat(),
        "machine": machine.line(machine.describe(), args.threads),
        "reviews": counts,
        "reward_model": {
            "path": str(model_dir),
            "mode": metrics.get("mode", args.mode),
            "pairs": metrics.get("pairs"),
            "max_length": args.max_length,
            "pairwise_accuracy_01": metrics.get("pairwise_accuracy"),
            "train_minutes": round(metrics.get("train_seconds", 0.0) / 60, 1),
        },
        "snippet_chars": args.snippet_chars,
        "scoring_minutes": round((time.time() - scoring) / 60, 1),
        "minutes": round((time.time() - start) / 60, 1),
        **report,
    }
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "markup_shift.json").write_text(json.dumps(result, indent=2) + "\n")
    (docs / "markup_shift.md").write_text(page(result))
    print(table(report))
    h = report["heldout"]
    print(f"held-out gap {h['gap']:.3f} (midpoint {h['midpoint']:+.3f}); {result['minutes']} min in all")
    return result


def page(result: dict) -> str:
    """docs/markup_shift.md."""
    rm, h = result["reward_model"], result["heldout"]
    return f"""# How much cleaning `<br />` moves the reward (real IMDb reviews)

`{result["command"]}`, {result["date"]}. {result["machine"]}.

Reward model: 01 ({rm["mode"]}, {rm["pairs"]} training pairs, max_length {rm["max_length"]}, MiniLM), trained
on {result["reviews"]["train"]} real reviews in {rm["train_minutes"]} min; scored on {h["reviews"]} held-out
reviews: gap mean r(positive) - mean r(negative) = {h["gap"]:.3f}, midpoint {h["midpoint"]:+.3f}, sd of
the rewards {h["sd"]:.3f}. Snippets: the first ~{result["snippet_chars"]} characters, cut at a word
boundary after the first break.

d = r(text with markup) - r(`utils.clean_review(text)`). `breaks`: held-out reviews with IMDb's breaks
(quotes unescaped, so d is the breaks' alone); `breaks+quotes`: as in the file; `inserted`: reviews without
a break, one `<br /><br />` put at a random word boundary (the policy's case). Flips: the sign of the
reward changes about 0 (01's arbitrary zero) or about the held-out midpoint.

{table(result)}
"""


if __name__ == "__main__":
    main()
