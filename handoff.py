"""What each notebook hands the later ones through the store, checked at its end: the lists of what each
notebook takes from the store (`TAKES`, which the notebooks' pulls name: tests/test_storage.py checks it),
`check`, which pushes what the store lacks of this disk's copies and names what is still missing with its
fix, and, on Colab, the wait for Google Drive's uploads (`flush_drive`)."""

from __future__ import annotations

import json
from pathlib import Path

import storage
from checkpoints import looks_local, previous
from store_backends import describe

SERIES = ("01_reward_model", "02_warp_training", "03_generation_eval", "04_mu_sweep")
MAKERS = dict(zip(("reward_model", "warp", "eval", "mu_sweep"), SERIES, strict=True))  # by top folder
# What each notebook takes from the store, under CHECKPOINTS ({last}: 02's last iteration), with what it
# is: the paths its pulls name (tests/test_storage.py checks that they do) and that the notebooks before it
# check at their end (`check`). 04 takes 02's results to reuse 02's run of the mu that 02 trained.
TAKES = {
    "02_warp_training": {"reward_model": "01's reward model"},
    "03_generation_eval": {
        "reward_model": "01's reward model",
        "warp/config.json": "02's settings (the SFT and data of its KL)",
        "warp/final_slerp": "02's SLERP policy",
        "warp/final_liti": "02's LITI policy",
        "warp/reinforce": "02's REINFORCE snapshots and metrics",
    },
    "04_mu_sweep": {
        "reward_model": "01's reward model",
        "warp/config.json": "02's settings (04 reuses 02's run of a mu trained with the same)",
        "warp/final_slerp": "02's SLERP policy (reused by 04)",
        "warp/final_liti": "02's LITI policy (reused by 04)",
        "warp/iter{last}/merge.json": "02's last merge (its angles, in 04's table)",
    },
}


def check(store: storage.Store, notebook: str, where: str, own=()) -> tuple[bool, str]:
    """At the end of `notebook`: make sure the store holds what the later notebooks take from it (`TAKES`)
    of what this notebook and the ones before it made, and `own` (paths a rerun of this one needs). What
    the store lacks and is here, a file or a folder's files, is pushed (one commit, which carries what
    earlier pushes left unstored); then the store is asked (`Store.holds`, in one listing). Returns whether
    all is there, and what to print: that all is there, or each missing path, what it is and what to do.
    02's recorded settings (CHECKPOINTS/warp/config.json) say its last iteration, and whether it trained
    the REINFORCE baseline (else 03 takes none). Without a store, how to pass the results on instead."""
    later = SERIES[SERIES.index(notebook) + 1 :]
    numbers = [n[:2] for n in later]
    whom = ", ".join(numbers[:-1]) + " and " + numbers[-1] if len(numbers) > 1 else "".join(numbers)
    whom = whom or f"a rerun of {notebook[:2]}"
    whom += " need" if len(later) > 1 else " needs"
    if not store:
        return False, f"no store: what {whom} is on this disk only. {storage.no_store_hint(where)}"
    made = SERIES[: SERIES.index(notebook) + 1]
    recorded = store.root / "warp" / "config.json"
    warp = json.loads(recorded.read_text()) if recorded.exists() else {}
    needed = {}
    for taken in [TAKES[n] for n in later]:
        for rel, what in taken.items():
            if MAKERS[rel.split("/")[0]] not in made or ("{last}" in rel and "iterations" not in warp):
                continue
            if rel == "warp/reinforce" and not warp.get("train_reinforce_baseline", True):
                continue
            needed.setdefault(rel.format(last=warp.get("iterations", 1) - 1), what)
    for rel in filter(None, map(store._rel, own)):
        needed.setdefault(rel, f"{notebook[:2]}'s result")
    waiting = store._log.unstored()[1]  # not results: what the store is to delete (a run's progress)
    discarded = {store.root / r for r in waiting} | {previous(store.root / r) for r in waiting}

    def local_files(rel: str) -> list[str]:
        path = store.root / rel
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        keep = lambda f: f.exists() and f not in discarded
        rels = [store._rel(f) for f in files if keep(f)]
        return [r for r in rels if not any(part.startswith(".") for part in r.split("/"))]  # temporaries

    def missing() -> dict[str, list[str]]:
        """Each needed path the store holds nothing of, or not every local file of: those files."""
        files = {rel: local_files(rel) for rel in needed}
        held = set(store.backend.held([*needed, *(f for fs in files.values() for f in fs)], fresh=True))
        has = lambda r: any(h == r or h.startswith(r + "/") for h in held)
        lacking = {r: [f for f in fs if not has(f)] for r, fs in files.items()}
        return {r: fs for r, fs in lacking.items() if fs or not has(r)}

    try:
        lacking = missing()
        if any(lacking.values()):
            store.push(*(store.root / f for fs in lacking.values() for f in fs))  # warns if it fails
            lacking = missing()
    except Exception as e:  # the store could not be read: nothing is confirmed
        return False, f"could not ask {store.location} what it holds ({describe(e)}): rerun this cell"
    if not lacking:
        return True, f"all that {whom} is in the store {store.location}: " + ", ".join(needed)
    lines = [f"NOT all that {whom} is in the store {store.location}; missing:"]
    for rel, files in lacking.items():
        maker = MAKERS[rel.split("/")[0]]
        if files:
            fix = "its push failed (the warning above says why): rerun this cell, it pushes them from here"
        elif maker == notebook:
            fix = "it is not on this disk either: rerun this notebook with this STORE, which makes it again"
        else:
            fix = f"it is not on this disk either: run {maker}.ipynb to its end with this STORE"
        lines.append(f"  {rel} ({needed[rel]}): {fix}")
    return False, "\n".join(lines)


def flush_drive(store: storage.Store, where: str, complete: bool) -> str | None:
    """On Colab with a store on Google Drive, the notebook's last call: Drive uploads a cell's writes after
    the cell returns, so wait for them (`google.colab.drive.flush_and_unmount`, which also unmounts) when
    the store holds everything (`complete`: no rerun has to write to it); else say to. A line, or None off
    Colab or without a Drive store."""
    folder = Path(store.location) if store and looks_local(store.location) else None
    if where != "colab" or folder is None or not (folder == storage.DRIVE or storage.DRIVE in folder.parents):
        return None
    if not complete:
        return (
            "Drive: NOT flushed, as a rerun of this cell must write to it; once it says all is in the store, "
            "run `from google.colab import drive; drive.flush_and_unmount()` before you close the session"
        )
    from google.colab import drive

    drive.flush_and_unmount()
    return (
        f"Drive flushed: every write is in Google Drive, you may close the session (Drive is unmounted: "
        f"to run more cells here, drive.mount('{storage.DRIVE}') first)"
    )
