"""Test-only: with this folder on PYTHONPATH and WARP_STANDIN_HUB naming a stand-in Hub's folder, every Python
process that starts (a papermill kernel, the training processes it spawns, a script a test kills) reaches
that stand-in (`tests/hub_standin.py`) instead of the Hub, and the store's retries wait only briefly."""

import os

if os.environ.get("WARP_STANDIN_HUB"):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: tests.hub_standin, ...

    class _Setter:
        """The `monkeypatch.setattr` that `StandInHub.install` calls, for the whole life of the process."""

        setattr = staticmethod(setattr)

    import time

    import store_backends
    from tests.hub_standin import StandInHub

    StandInHub(os.environ["WARP_STANDIN_HUB"]).install(_Setter())
    store_backends.BACKOFF = store_backends.Backoff(first=0.05, total=10.0, sleep=time.sleep)
