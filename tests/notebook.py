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


def kill_notebook_when(notebook: Path, workdir: Path, parameters: dict, ready, timeout: float) -> None:
    """Start `notebook` under papermill in a process of its own (no HF_TOKEN), wait until `ready()` is true
    (or the run ends, or `timeout` seconds pass), then SIGKILL it and its kernel: a session that dies."""
    import signal
    import subprocess
    import sys

    import psutil

    code = (
        "import papermill, sys; papermill.execute_notebook(sys.argv[1], sys.argv[2], parameters="
        f"{parameters!r}, cwd=sys.argv[3], kernel_name='python3', progress_bar=False)"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    env.pop("HF_TOKEN", None)
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(notebook), str(workdir / "out.ipynb"), str(workdir)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + timeout
    while not ready() and child.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    victims = [psutil.Process(child.pid), *psutil.Process(child.pid).children(recursive=True)]
    for p in victims:  # papermill and its kernel (which jupyter starts in a session of its own)
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=30)
    child.wait()


def notebook_class(
    name: str, class_name: str, imports: str = "import config\nfrom dataclasses import dataclass"
):
    """The class `class_name` as the code cell of `name`.ipynb that defines it builds it (after `imports`),
    so a test can check a notebook's config without running the notebook."""
    cells = json.loads((ROOT / f"{name}.ipynb").read_text())["cells"]
    marker = f"class {class_name}("
    source = next(
        "".join(c["source"]) for c in cells if c["cell_type"] == "code" and marker in "".join(c["source"])
    )
    namespace: dict = {}
    code = compile(f"{imports}\n{source}", f"{name}.ipynb:{class_name}", "exec", dont_inherit=True)
    exec(code, namespace)  # dont_inherit: no `from __future__` of this file, as in the notebook
    return namespace[class_name]
