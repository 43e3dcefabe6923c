"""Every push of the notebooks, failed and killed, in a series joined only by a Hub store: nothing is lost.

Each notebook runs in a session of its own (a fresh CHECKPOINTS folder, as a new Kaggle session), joined
to the others only by a Hub repo: the stand-in of the tests (tests/hub_standin.py), in a folder that every
process shares (the notebook's kernel and the training processes it spawns). The offline preset, at tiny
sizes (`PARAMETERS`). An undisturbed series gives the store after each notebook. Then, for each notebook N
and each commit k that N made there, two trials, each starting from the store as the undisturbed series
left it before N: N's k-th commit fails through every retry (the stand-in's 503s), or, separately, N's
kernel is SIGKILLed right after the Hub took that commit (before it heard back); then N runs again in a
fresh folder. A trial passes when the store ends with the files and bytes of the undisturbed store after
N (what changes between runs of the same settings aside: `comparable`), and the disturbed session's
end-of-notebook check said "all that ... is in the store" only when the store held each path it named.

By default 01, 03 and 04 (a notebook run for each of 02's commits takes hours here; bench/store_faults.py
sweeps every commit of 02's training on its functions). Resumable: finished trials are kept.

    python bench/series_faults.py --work /tmp/series_faults                  # 01, 03 and 04
    python bench/series_faults.py --work /tmp/series_faults --notebooks 02   # 02's too, later
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SERIES = ["01_reward_model", "02_warp_training", "03_generation_eval", "04_mu_sweep"]
REPO = "me/warp-imdb"
TRAINING = {"steps": 2, "iterations": 2, "baseline_checkpoints": 2}  # 02 and 04 alike: 04 reuses 02's mu
PARAMETERS = {
    "01_reward_model": {},
    "02_warp_training": {"OVERRIDES": TRAINING, "EVAL_PROMPTS": 4},
    "03_generation_eval": {
        "OVERRIDES": {"n_prompts": 4, "samples_per_prompt": 1, "etas": [0.0, 1.0], "limit_samples": 4},
        "REFERENCE_LM": "",
    },
    "04_mu_sweep": {
        "MUS": [0.01, 0.1],
        "OVERRIDES": TRAINING,
        "EVAL_OVERRIDES": {"n_prompts": 4, "samples_per_prompt": 1, "limit_samples": 0},
    },
}
STORED_LINE = re.compile(r"all that .* is in the store \S+: (.*)")
CHANGING = re.compile(r"minutes|seconds|time|out_dir")  # wall times, and the session's own folder


def run(notebook: str, hub: Path, session: Path) -> str:
    """`notebook` in the fresh folder `session` with the store on the stand-in Hub `hub`; what it printed
    (raises what papermill raises: a cell's error, a dead kernel)."""
    from tests.notebook import run_notebook

    site = str(ROOT / "tests" / "standin_site")
    saved = {k: os.environ.get(k) for k in ("WARP_STANDIN_HUB", "PYTHONPATH")}
    os.environ["WARP_STANDIN_HUB"] = str(hub)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [site, saved["PYTHONPATH"]]))
    session.mkdir(parents=True, exist_ok=True)
    try:
        params = dict(PRESET="offline", CHECKPOINTS=str(session / "ck"), STORE=REPO, **PARAMETERS[notebook])
        return run_notebook(notebook, session, hf_token="hf_x", **params)[0]
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def comparable(path: str, data: bytes):
    """A stored file as two sessions of the same settings must agree on it: JSON records and CSV tables
    without wall times and without the folder the session ran in (`CHANGING`), model cards without the
    lines naming them, the write check's note (it carries its time) as present only; the rest (weights,
    plots) byte for byte."""
    import pandas as pd

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if not CHANGING.search(k)}
        return [strip(v) for v in value] if isinstance(value, list) else value

    if path == ".warp-store":
        return "present"
    if path.endswith(".json"):
        return strip(json.loads(data))
    if path.endswith(".csv"):
        table = pd.read_csv(io.BytesIO(data))
        return table.drop(columns=[c for c in table if CHANGING.search(str(c))]).to_csv(index=False)
    if path.endswith("README.md"):
        return [line for line in data.decode().splitlines() if not CHANGING.search(line)]
    return data


def differences(got: dict[str, bytes], want: dict[str, bytes]) -> list[str]:
    """What a store holds that differs from the one it should equal (empty: the same)."""
    out = [f"missing {p}" for p in sorted(set(want) - set(got))]
    out += [f"extra {p}" for p in sorted(set(got) - set(want))]
    out += [
        f"differs {p}"
        for p in sorted(set(got) & set(want))
        if comparable(p, got[p]) != comparable(p, want[p])
    ]
    return out


def honest(text: str, held: dict[str, bytes]) -> list[str]:
    """The paths an end-of-notebook check said are in the store that the store does not hold."""
    said = [p.strip() for m in STORED_LINE.finditer(text) for p in m.group(1).split(",")]
    return [p for p in said if not any(h == p or h.startswith(p + "/") for h in held)]


def undisturbed(work: Path, notebooks: list[str]) -> dict[str, int]:
    """The series without faults: after each notebook the stand-in Hub's folder is kept (`hub_after_<N>`);
    returns the number of commits each notebook made."""
    from tests.hub_standin import StandInHub

    record = work / "undisturbed.json"
    if record.exists():
        return json.loads(record.read_text())
    hub_dir, commits = work / "undisturbed" / "hub", {}
    shutil.rmtree(work / "undisturbed", ignore_errors=True)
    hub = StandInHub(hub_dir)
    for notebook in SERIES[: max(map(SERIES.index, notebooks)) + 1]:
        before = len(hub.calls("create_commit"))
        start = time.time()
        run(notebook, hub_dir, work / "undisturbed" / notebook)
        commits[notebook] = len(hub.calls("create_commit")) - before
        shutil.copytree(hub_dir, work / f"hub_after_{notebook}")
        print(f"undisturbed {notebook}: {commits[notebook]} commits, {time.time() - start:.0f} s", flush=True)
    record.write_text(json.dumps(commits))
    return commits


def trial(work: Path, notebook: str, k: int, mode: str) -> str:
    """One fault point: '' when nothing was lost, else what was."""
    import store_backends
    from tests.hub_standin import StandInHub

    here = work / "trial"
    shutil.rmtree(here, ignore_errors=True)
    earlier = SERIES[SERIES.index(notebook) - 1] if notebook != SERIES[0] else None
    if earlier:
        shutil.copytree(work / f"hub_after_{earlier}", here / "hub")
    hub = StandInHub(here / "hub")
    want = StandInHub(work / f"hub_after_{notebook}").files(REPO)
    if mode == "fail":
        hub.fail("create_commit", nth=k, status=503, times=store_backends.BACKOFF.tries)
    else:
        hub.fail("create_commit", nth=k, kill=True)
    try:
        text = run(notebook, here / "hub", here / "session1")
    except Exception as e:  # the notebook stopped (a failed write check) or its kernel was killed
        text = str(e)
        if mode == "kill" and "kernel died" not in text.lower() and "dead" not in text.lower():
            return f"the kernel was not killed: {text[-500:]}"
    try:
        lies = honest(text, hub.files(REPO))
    except KeyError:  # the repo was never made: 01's write check failed, so nothing was said stored
        lies = []
    hub.clear_faults()
    shutil.rmtree(here / "session1")  # a new session: nothing local
    try:
        run(notebook, here / "hub", here / "session2")
    except Exception:
        return "the rerun failed: " + traceback.format_exc(limit=2)[-1500:]
    lost = differences(hub.files(REPO), want)
    return "; ".join([f"said stored, not held: {', '.join(lies)}"] * bool(lies) + lost)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", default="/tmp/series_faults", help="scratch folder; results.jsonl there")
    parser.add_argument("--notebooks", nargs="*", default=["01", "03", "04"], help="whose commits to sweep")
    parser.add_argument("--modes", nargs="*", default=["fail", "kill"])
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bench.machine import describe

    notebooks = [n for n in SERIES if n[:2] in args.notebooks]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    commits = undisturbed(work, notebooks)
    results = work / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    done = {(r["notebook"], r["k"], r["mode"]) for r in rows}
    for notebook in notebooks:
        for k in range(1, commits[notebook] + 1):
            for mode in args.modes:
                if (notebook, k, mode) in done:
                    continue
                start = time.time()
                error = trial(work, notebook, k, mode)
                row = {"notebook": notebook, "k": k, "mode": mode, "ok": not error, "error": error}
                row["seconds"] = time.time() - start
                with open(results, "a") as f:
                    f.write(json.dumps(row) + "\n")
                rows.append(row)
                said = "ok" if not error else "LOST: " + error
                print(f"{notebook} commit {k}/{commits[notebook]} {mode}: {said}", flush=True)
    report = {
        "machine": describe(),
        "commits": commits,
        "trials": len(rows),
        "ok": sum(r["ok"] for r in rows),
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
