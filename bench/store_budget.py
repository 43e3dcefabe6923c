"""What the checkpoint store receives and holds over the series, notebook by notebook, at the imdb defaults.

A folder store keeps a ledger of its commits (`storage.LEDGER`: each commit's session, the files it added
with their sizes, the files it deleted). This script reads the ledger of a run of the whole series on the
offline preset, whose notebooks make the same commits as at the imdb defaults (02: I = 2, M = 2 and the
REINFORCE baseline with 5 snapshots; 04: three mus, the one 02 trained reused; what is stored does not
depend on the models' size, and no progress checkpoint is stored by runs shorter than
`store_progress_minutes`, as a T = 100 run on a GPU is), and replays it twice: with the sizes written, and
with each file's size replaced by the size of the file the imdb preset writes at that place (GPT-2 small
and a DistilBERT-base reward model, built from their configs by `bench/imdb_shaped.py` and saved by the
series' own functions). Files of no model (JSON, plots) keep their measured size.

    python run_series.py --preset offline --store /tmp/store --checkpoints /tmp/ck   # the series, ~10 min
    python bench/store_budget.py --store /tmp/store           # writes docs/store_budget.md and .json
    python bench/store_budget.py --store /tmp/store --store2 /tmp/store2   # and a run in 2 processes
    (python run_series.py --preset offline --cpu-processes 2 --store /tmp/store2 --checkpoints /tmp/ck2)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NOTEBOOKS = ["01_reward_model", "02_warp_training", "03_generation_eval", "04_mu_sweep"]
STATE_FILES = ("final.safetensors", "slerp.safetensors", "init.safetensors")


def imdb_sizes(work: Path) -> dict[str, dict[str, int]]:
    """Bytes of each file the imdb preset writes, by kind: a policy state (`checkpoints.save_state` of GPT-2
    small), a policy folder and the reward model folder (`save_pretrained`, by file name)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    import checkpoints
    import utils
    from bench.imdb_shaped import read_reviews, save_distilbert_base, save_gpt2_small

    policy, tokenizer = utils.load_policy(save_gpt2_small(work / "sft"))
    checkpoints.save_state(utils.state_of(policy), work / "state.safetensors")
    checkpoints.save_pretrained_atomic(policy, tokenizer, work / "policy", extra={"kind": "slerp"})
    texts = [r["text"] for r in read_reviews()[:2000]]
    base = save_distilbert_base(work / "distilbert", texts)
    torch.manual_seed(0)
    reward = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    from transformers import AutoTokenizer

    checkpoints.save_pretrained_atomic(reward, AutoTokenizer.from_pretrained(base), work / "reward_model")
    by_name = lambda folder: {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    state = (work / "state.safetensors").stat().st_size
    return {"state": {"*": state}, "progress": {"*": 4 * state}, "policy": by_name(work / "policy"),
            "reward_model": by_name(work / "reward_model")}  # fmt: skip


def kind(path: str) -> str | None:
    """Which imdb-sized file `path` (relative to the store) is: None for files of no model."""
    name, parts = path.rsplit("/", 1)[-1], path.split("/")
    if name in STATE_FILES:
        return "state"
    if name.startswith("progress") and name.endswith(".pt"):
        return "progress"
    if parts[0] == "reward_model":
        return "reward_model"
    if any(p.startswith(("final_", "step")) for p in parts[:-1]):
        return "policy"
    return None


def replay(ledger: list[dict], sizes: dict | None) -> list[dict]:
    """Per session (a notebook), in order: commits, files added, bytes uploaded, the store's bytes at its
    end; with `sizes`, each model file counted at its imdb size."""
    held, out = {}, []
    for session in dict.fromkeys(e["session"] for e in ledger):
        commits = [e for e in ledger if e["session"] == session]
        sent = 0
        for e in commits:
            for f, n in zip(e["added"], e["sizes"], strict=True):
                k = kind(f) if sizes else None
                n = sizes[k].get(f.rsplit("/", 1)[-1], sizes[k].get("*", n)) if k else n
                held[f], sent = n, sent + n
            for gone in e["deleted"]:
                for f in [f for f in held if f == gone or f.startswith(gone + "/")]:
                    del held[f]
        added = [f for e in commits for f in e["added"]]
        row = {"commits": len(commits), "files": len(added), "uploaded": sent, "held": sum(held.values())}
        out.append({**row, "progress": sum(f.rsplit("/", 1)[-1].startswith("progress") for f in added)})
    return out


README = {"commits": 29, "uploaded_gb": 13.3, "after_02_gb": 3.8, "after_04_gb": 5.8}  # README's numbers


def readme_check(imdb: list[dict]) -> dict:
    """README's numbers beside those replayed at the imdb sizes: the same commits, and GB that README's one
    decimal rounds to (within 0.05)."""
    measured = {
        "commits": sum(r["commits"] for r in imdb),
        "uploaded_gb": sum(r["uploaded"] for r in imdb) / 1e9,
        "after_02_gb": imdb[1]["held"] / 1e9 if len(imdb) > 1 else None,
        "after_04_gb": imdb[-1]["held"] / 1e9 if len(imdb) > 3 else None,
    }
    same = lambda k, v: (
        v == README[k] if k == "commits" else v is not None and abs(v - README[k]) <= 0.05 + 1e-9
    )
    return {
        k: {
            "readme": README[k],
            "measured": v if k == "commits" or v is None else round(v, 2),
            "same": same(k, v),
        }
        for k, v in measured.items()
    }


def table(names: list[str], rows: dict) -> list[str]:
    lines = [
        "| notebook | commits | files uploaded | GB uploaded (imdb) | store at its end, GB (imdb) "
        "| progress checkpoints stored | GB uploaded (offline) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, imdb, off in zip(names, rows["imdb"], rows["offline"], strict=True):
        up, held = imdb["uploaded"] / 1e9, imdb["held"] / 1e9
        lines.append(f"| {name} | {imdb['commits']} | {imdb['files']} | {up:.2f} | {held:.2f} "
                     f"| {imdb['progress']} | {off['uploaded'] / 1e9:.3f} |")  # fmt: skip
    total = sum(r["uploaded"] for r in rows["imdb"])
    commits, end = sum(r["commits"] for r in rows["imdb"]), rows["imdb"][-1]["held"]
    lines.append(
        f"\nIn all: {commits} commits, {total / 1e9:.2f} GB uploaded; the store ends at {end / 1e9:.2f} GB."
    )
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", required=True, help="the folder store of a run of the series")
    parser.add_argument(
        "--store2", default="", help="the folder store of a run whose 02 and 04 trained in 2 processes"
    )
    parser.add_argument("--ran", default="", help="how the series ran (the commands), for the page")
    parser.add_argument(
        "--out", default=str(ROOT / "docs" / "store_budget"), help="writes OUT.md and OUT.json"
    )
    args = parser.parse_args(argv)
    import storage
    from bench.machine import describe

    with tempfile.TemporaryDirectory() as work:
        sizes = imdb_sizes(Path(work))
    runs = {"one process": args.store, **({"two processes": args.store2} if args.store2 else {})}
    report = {"machine": describe(), "imdb_file_sizes": sizes, "runs": {}}
    for label, store in runs.items():
        ledger = [json.loads(line) for line in (Path(store) / storage.LEDGER).read_text().splitlines()]
        rows = {"offline": replay(ledger, None), "imdb": replay(ledger, sizes)}
        names = NOTEBOOKS[: len(rows["imdb"])]
        report["runs"][label] = {
            "store": store,
            "notebooks": names,
            **rows,
            "readme": readme_check(rows["imdb"]),
        }
    Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=2))
    ran = args.ran or f"`python run_series.py --preset offline --store {args.store}`"
    lines = [
        "# What the store receives: commits, uploads and size per notebook\n",
        "Counted on a folder store's ledger from a run of the whole series on the offline preset, whose",
        "commits are those of the imdb defaults; the imdb columns count each model file at the size the",
        "imdb preset writes (GPT-2 small, a DistilBERT-base reward model). The write check and the squash",
        "are counted as the Hub commits they are; the commits of 02's and 04's training processes are in",
        "the ledger of the notebook that spawned them.",
        f"The series ran as {ran}; this page was written by `python bench/store_budget.py "
        + " ".join(f"--{k} {v}" for k, v in (("store", args.store), ("store2", args.store2)) if v)
        + f"` on {report['machine']['cpu']} (sizes do not depend on the machine).",
    ]
    for label, run in report["runs"].items():
        lines += [f"\n## {label.capitalize()}\n", *table(run["notebooks"], run)]
        check = run["readme"]
        said = "; ".join(f"{k} {v['measured']} (README {v['readme']})" for k, v in check.items())
        same = all(v["same"] for v in check.values())
        lines.append(f"\nAgainst README: {said}: {'the same' if same else 'NOT the same'}.")
    if len(report["runs"]) == 2:
        a, b = (report["runs"][k]["imdb"] for k in runs)
        # bytes to the MB: the JSON records' wall times differ in their digits from run to run
        key = lambda r: (r["commits"], r["files"], round(r["uploaded"] / 1e6), round(r["held"] / 1e6))
        same = [key(r) for r in a] == [key(r) for r in b]
        lines.append(
            "\nTwo processes against one: "
            + (
                "the same commits, files, uploads and sizes, notebook by notebook."
                if same
                else "they DIFFER."
            )
        )
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
