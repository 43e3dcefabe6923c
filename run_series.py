"""Run the notebook series top to bottom with papermill; executed copies go to `runs/` (git-ignored).

python run_series.py --preset offline                          # the whole series on 2 CPU cores
python run_series.py --preset imdb --store me/warp-imdb        # the real series in one session
python run_series.py --preset imdb --store me/warp-imdb --only 02 03   # some stages
python run_series.py --preset offline --figures docs/offline   # also collect the plots and tables for README
python run_series.py --preset offline --cpu-processes 2     # 02's and 04's runs in 2 processes (as T4 x2)

Each notebook gets PRESET, CHECKPOINTS (the absolute --checkpoints) and STORE (--store) as parameters;
02 and 04 also get OVERRIDES (WarpConfig fields: --overrides as JSON, and --cpu-processes N as
{"cpu_processes": N}); the other parameters keep their defaults. The imdb preset needs --store (a Hub repo
owner/name, with an HF_TOKEN, or an absolute folder): a GPU session's disk is gone when it ends.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

NOTEBOOKS = ["01_reward_model", "02_warp_training", "03_generation_eval", "04_mu_sweep"]
# What the notebooks write that README shows: plots and tables, by checkpoint subfolder.
FIGURES = {
    "warp": ["training_curves.png", "angles.png"],
    "eval": ["results.png", "pareto.png", "results.csv", "pareto.csv", "headline.json"],
    "mu_sweep": ["mu_sweep.png", "mu_sweep.csv", "headline.json"],
}


def collect_figures(checkpoints: Path, dest: Path) -> list[Path]:
    """Copy the plots and tables the notebooks wrote under `checkpoints` into `dest` (prefixing the stage)."""
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for stage, names in FIGURES.items():
        for name in names:
            src = checkpoints / stage / name
            if src.exists():
                copied.append(Path(shutil.copy2(src, dest / f"{stage}_{name}")))
    return copied


def main(argv: list[str] | None = None) -> int:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--preset", default="auto", choices=["auto", "imdb", "offline"])
    parser.add_argument("--checkpoints", default="checkpoints", help="root folder the notebooks share")
    parser.add_argument("--out", default="runs", help="where executed notebooks are written")
    parser.add_argument("--only", nargs="*", default=None, help="notebook numbers to run, e.g. 01 02")
    parser.add_argument("--figures", default=None, help="copy the plots and tables README shows here")
    parser.add_argument(
        "--store", default="", help="STORE of every notebook: Hub repo owner/name or a folder"
    )
    parser.add_argument(
        "--cpu-processes", type=int, default=0,
        help="without a GPU, train 02's and 04's M runs in this many processes (WarpConfig.cpu_processes)",
    )  # fmt: skip
    parser.add_argument("--overrides", default="{}", help='OVERRIDES of 02 and 04 as JSON, e.g. {"steps": 2}')
    args = parser.parse_args(argv)
    import json

    overrides = json.loads(args.overrides) | (
        {"cpu_processes": args.cpu_processes} if args.cpu_processes else {}
    )
    if args.preset == "imdb" and not args.store:
        parser.error(
            "--preset imdb needs --store (a Hub repo owner/name with an HF_TOKEN, or an absolute folder)"
        )
    if args.store:  # checked here, before the first notebook starts
        import config
        import storage

        args.store = storage.resolve_store(args.store, storage.hf_token(), config.platform())[0]

    import papermill

    root = Path(__file__).resolve().parent
    todo = [n for n in NOTEBOOKS if args.only is None or n[:2] in args.only]
    present = [n for n in todo if (root / f"{n}.ipynb").exists()]
    for name in sorted(set(todo) - set(present)):
        print(f"skipping {name}: notebook not written yet")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for name in present:
        start = time.time()
        print(f"running {name} ...", flush=True)
        papermill.execute_notebook(
            str(root / f"{name}.ipynb"),
            str(Path(args.out) / f"{name}.ipynb"),
            parameters={
                "PRESET": args.preset,
                "CHECKPOINTS": str(Path(args.checkpoints).resolve()),
                "STORE": args.store,
                **({"OVERRIDES": overrides} if overrides and name[:2] in ("02", "04") else {}),
            },  # fmt: skip
            cwd=str(root),
            kernel_name="python3",
            progress_bar=False,
        )
        print(f"{name}: {time.time() - start:.0f} s", flush=True)
    if args.figures:
        copied = collect_figures(Path(args.checkpoints), Path(args.figures))
        print(f"copied {len(copied)} plots and tables to {args.figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
