"""Every push point of 02's training, failed and killed: nothing is lost.

For each commit k that an undisturbed session of 02's training makes (`tests/test_store_faults.session_02`:
the write check, WARP's I x M runs and merges, REINFORCE and its snapshots, progress checkpoints, the
squash; tiny settings, against the Hub stand-in), two trials: the k-th commit fails through every retry
(the stand-in's 503s), and, separately, the process is SIGKILLed right after the Hub took the k-th commit.
Each session is then rerun on a fresh disk (a new Kaggle session); the trial passes when the store ends
with the undisturbed store's files and bytes (`same_store`) and no push said stored for what the store
lacked. CI runs a fixed sample of these (tests/test_store_faults.py); this is the whole sweep.

    python bench/store_faults.py --work /tmp/store_faults      # resumable: finished trials are kept
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def trial(assets: dict, work: Path, k: int, mode: str, reference: dict) -> str:
    """One fault point: '' when nothing was lost, else what went wrong."""
    import pytest

    import store_backends
    from tests.hub_standin import StandInHub
    from tests.test_store_faults import CHILD, honest_pushes, same_store, session_02

    shutil.rmtree(work, ignore_errors=True)
    hub = StandInHub(work / "hub")
    try:
        with pytest.MonkeyPatch.context() as mp:
            if mode == "fail":
                hub.install(mp)
                honest_pushes(mp)
                hub.fail("create_commit", nth=k, status=503, times=store_backends.BACKOFF.tries)
                try:
                    session_02(assets, work / "session1", "me/warp")
                except ConnectionError:  # the write check failed: the notebook stops before any work
                    pass
                hub.clear_faults()
            else:
                hub.fail("create_commit", nth=k, kill=True)
                env = {**os.environ, "WARP_STANDIN_HUB": str(hub.folder)}
                site = str(ROOT / "tests" / "standin_site")
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, env.get("PYTHONPATH")]))
                code = CHILD.format(root=str(ROOT), assets=json.dumps(assets), ck=str(work / "session1"))
                child = subprocess.run(
                    [sys.executable, "-c", code], env=env, capture_output=True, timeout=900
                )
                if child.returncode != -9:
                    return f"not killed (exit {child.returncode})"
                hub.install(mp)
                honest_pushes(mp)
            shutil.rmtree(work / "session1", ignore_errors=True)  # a new session: nothing local
            session_02(assets, work / "session2", "me/warp")
            same_store(hub.files("me/warp"), reference)
    except Exception:
        return traceback.format_exc(limit=3)[-1500:]
    return ""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", default="/tmp/store_faults", help="scratch folder; results.jsonl there")
    parser.add_argument("--modes", nargs="*", default=["fail", "kill"])
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import pytest

    from bench.machine import describe
    from tests import tiny
    from tests.hub_standin import StandInHub
    from tests.test_store_faults import session_02

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    assets = tiny.save_tiny_assets(work / "assets", n_train=40)
    hub = StandInHub(work / "undisturbed" / "hub")
    if not hub.calls("create_commit"):
        with pytest.MonkeyPatch.context() as mp:
            hub.install(mp)
            session_02(assets, work / "undisturbed" / "ck", "me/warp")
    reference, points = hub.files("me/warp"), len(hub.calls("create_commit"))
    results_file = work / "results.jsonl"
    done = {(r["k"], r["mode"]) for r in map(json.loads, results_file.read_text().splitlines())} if (
        results_file.exists()
    ) else set()  # fmt: skip
    for k in range(1, points + 1):
        for mode in args.modes:
            if (k, mode) in done:
                continue
            start = time.time()
            error = trial(assets, work / "trial", k, mode, reference)
            row = {"k": k, "mode": mode, "ok": not error, "error": error, "seconds": time.time() - start}
            with open(results_file, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"commit {k}/{points} {mode}: {'ok' if not error else 'LOST: ' + error}", flush=True)
    rows = [json.loads(line) for line in results_file.read_text().splitlines()]
    report = {"machine": describe(), "commits": points, "trials": len(rows), "ok": sum(r["ok"] for r in rows)}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
