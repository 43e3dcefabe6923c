"""Run a notebook of the series with papermill, the way README's command does."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_notebook(name: str, workdir: Path, hf_token: str | None = None, **parameters) -> tuple[str, float]:
    """Execute `name`.ipynb with `parameters` in `workdir` (relative paths land there); return the text
    it printed or displayed (as plain text) and its wall time. The kernel imports our modules from the
    repo root via PYTHONPATH and inherits WARP_CACHE and the Hub-offline variables; it sees an HF_TOKEN
    only when `hf_token` is given (the Hub is unreachable in tests, so nothing can be pushed)."""
    import papermill

    out = workdir / f"{name}.out.ipynb"
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "HF_TOKEN")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), saved["PYTHONPATH"]]))
    os.environ.pop("HF_TOKEN", None)  # never push from a test
    if hf_token is not None:
        os.environ["HF_TOKEN"] = hf_token
    start = time.time()
    try:
        papermill.execute_notebook(
            str(ROOT / f"{name}.ipynb"), str(out), parameters=parameters, cwd=str(workdir),
            kernel_name="python3", progress_bar=False,
        )  # fmt: skip
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    seconds = time.time() - start
    cells = json.loads(out.read_text())["cells"]
    outputs = [o for c in cells if c["cell_type"] == "code" for o in c.get("outputs", [])]
    # printed text, and the plain-text form of displayed objects (tables, code shown with `show`)
    text = "".join(
        "".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", "")) for o in outputs
    )
    return text, seconds
