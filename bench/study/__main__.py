"""One command for the offline study: trains and evaluates every arm of `bench/study/arms.py` for each
training seed, the testbed's limit once, then writes the report. Resumable: a killed run continues where
it stopped (runs from their progress checkpoints, each evaluated model kept), a finished seed is read back.

    python -m bench.study                      # the full study: 6 seeds (docs/offline_study.md: the time)
    python -m bench.study --quick              # 1 seed, 96 prompts: the shape of the study in minutes
    python -m bench.study --seeds 0 1          # some seeds now, the others later into the same --out
    python -m bench.study --report-only        # the report again from <out>/evaluated, in seconds

Outputs in `<out>` (default `runs/study`, `runs/study_quick` with --quick): `evaluated/` (per seed, one
table of per-prompt means of every model, small enough to commit; the limit's SFT scores), `study.md`,
`study.json`, `pareto.png`, `gold.png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import config  # noqa: E402
from bench.study import arms, report, runner  # noqa: E402


def default_paths(out: Path) -> dict:
    """The offline preset's SFT, data and reference LM; the reward model from 01 (run here if missing)."""
    paths = config.preset_paths("offline")
    paths["reference"] = config.reference_lm("offline")
    reward = out / "ck" / "reward_model"
    if not (reward / "metrics.json").exists():  # 01 on the offline preset, as run_series runs it
        import run_series

        run_series.main(
            ["--preset", "offline", "--only", "01", "--checkpoints", str(out / "ck"), "--out", str(out)]
        )
    paths["reward_model"] = str(reward)
    return paths


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m bench.study",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="1 seed, 96 prompts, one regime")
    size.add_argument("--smoke", action="store_true", help="toy size (the test)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds to run")
    parser.add_argument("--workers", type=int, default=None, help="seeds at once, one process each")
    parser.add_argument("--out", default=None, help="working and output folder")
    parser.add_argument("--report-only", action="store_true", help="only the report, from <out>/evaluated")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates")
    for name in ("sft", "data", "reward-model", "reference"):
        parser.add_argument(f"--{name}", default=None, help=f"{name} folder (default: the offline preset's)")
    args = parser.parse_args(argv)
    study = arms.SMOKE if args.smoke else arms.QUICK if args.quick else arms.FULL
    if args.seeds:
        study = dataclasses.replace(study, seeds=tuple(args.seeds))
    if args.workers:
        study = dataclasses.replace(study, workers=args.workers)
    default_out = "study_quick" if args.quick else "study_smoke" if args.smoke else "study"
    out = Path(args.out or ROOT / "runs" / default_out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        given = {"sft": args.sft, "data": args.data, "reward_model": args.reward_model,
                 "reference": args.reference}  # fmt: skip
        paths = (
            given if all(given.values()) else {**default_paths(out), **{k: v for k, v in given.items() if v}}
        )
        runner.run_all(paths, study, out)
    return report.write(out, study, replicates=args.bootstrap)


if __name__ == "__main__":
    main()
