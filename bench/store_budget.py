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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", required=True, help="the folder store of a run of the series")
    parser.add_argument(
        "--out", default=str(ROOT / "docs" / "store_budget"), help="writes OUT.md and OUT.json"
    )
    args = parser.parse_args(argv)
    import storage
    from bench.machine import describe

    ledger = [json.loads(line) for line in (Path(args.store) / storage.LEDGER).read_text().splitlines()]
    with tempfile.TemporaryDirectory() as work:
        sizes = imdb_sizes(Path(work))
    rows = {"offline": replay(ledger, None), "imdb": replay(ledger, sizes)}
    names = NOTEBOOKS[: len(rows["imdb"])]
    report = {
        "store": args.store,
        "machine": describe(),
        "notebooks": names,
        "imdb_file_sizes": sizes,
        **rows,
    }
    Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=2))
    lines = [
        "# What the store receives: commits, uploads and size per notebook\n",
        "Counted on a folder store's ledger from a run of the whole series on the offline preset, whose",
        "commits are those of the imdb defaults; the imdb columns count each model file at the size the",
        "imdb preset writes (GPT-2 small, a DistilBERT-base reward model). The write check and the squash",
        "are counted as the Hub commits they are. The series ran as `python run_series.py --preset offline",
        f"--store {args.store}`; this page was written by",
        f"`python bench/store_budget.py --store {args.store}` on {report['machine']['cpu']} (sizes do not",
        "depend on the machine).\n",
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
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
