"""The whole series on the offline preset, end to end through papermill: 01 -> 02 -> 03 -> 04.

02 runs with its offline defaults, so the assertion that WARP beats the SFT is about the real thing;
03 and 04 run with small settings (their full runs are measured by run_series.py, see README).
"""

from __future__ import annotations

import json
import math
import shutil

import pandas as pd
import pytest

from tests.notebook import run_notebook

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """Checkpoints of 01 and 02 on the offline preset, with their wall times. As on Kaggle or Colab, each
    notebook runs in a session of its own: 01 in one folder, 02 in another, joined by a folder store."""
    work = tmp_path_factory.mktemp("series")
    ck, store = work / "checkpoints", str(work / "store")
    times, texts = {}, {}
    texts["01"], times["01"] = run_notebook(
        "01_reward_model", work, PRESET="offline", CHECKPOINTS=str(work / "session01"), STORE=store
    )
    texts["02"], times["02"] = run_notebook(
        "02_warp_training", work, PRESET="offline", CHECKPOINTS=str(ck), STORE=store
    )
    return work, ck, times, texts


def test_warp_beats_sft_on_heldout_prompts(series):
    """After 01 and 02, the WARP policy's mean held-out reward beats the SFT's by a clear margin (at least
    0.5 and beyond the 95% interval of the difference), with KL to the SFT > 0; the SFT's own KL is 0."""
    _, ck, times, _ = series
    summary = json.loads((ck / "warp" / "summary.json").read_text())
    held = summary["heldout"]
    sft, warp = held["SFT"], held["WARP (slerp)"]
    print(
        f"times {times}; held-out: "
        + "; ".join(f"{k}: score {v['score']:.2f} kl {v['kl']:.2f}" for k, v in held.items())
    )
    assert sft["kl"] == pytest.approx(0.0, abs=1e-5)
    assert warp["score"] - sft["score"] > max(0.5, math.hypot(sft["score_ci95"], warp["score_ci95"]))
    assert warp["kl"] > 0.1
    assert held["WARP (liti)"]["score"] > sft["score"]
    assert 0 < summary["angles"][0]["angle/mean"] < 180
    assert (ck / "warp" / "final_slerp" / "config.json").exists()
    assert (ck / "warp" / "training_curves.png").stat().st_size > 0
    card = (ck / "warp" / "final_slerp" / "README.md").read_text()
    assert "# WARP on IMDb: final slerp policy" in card and f"| score | {warp['score']:.4g} |" in card


def test_02_shows_the_algorithm_and_runs_one_micro_batch(series):
    """02 displays the code of each step of Algorithm 1 and the per-row table of one micro-batch."""
    text = series[3]["02"]
    for source in (
        "def policy_loss(",
        "def ema_update(",
        "def train_run(",
        "def slerp(",
        "def liti(",
        "def warp(",
    ):
        assert source in text, source
    for column in ("completion", "r_beta", "advantage", "loss term", "KL to anchor after one step"):
        assert column in text, column
    assert "(the sum of the loss terms)" in text


def small_reference_lm(folder) -> str:
    """A fluency judge for 03 with the offline SFT's vocabulary: random, one layer, 16 wide. What 03 does
    with a judge is tested here; the offline preset's own judge (`offline.build_reference_lm`, 900 steps,
    minutes of CI) is tested in test_offline.py on a small recipe."""
    import torch
    import transformers

    import config

    sft = config.preset_paths("offline")["sft"]
    lm_config = transformers.AutoConfig.from_pretrained(sft)
    lm_config.update(dict(n_layer=1, n_embd=16, n_head=2))
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(lm_config).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(sft).save_pretrained(folder)
    return str(folder)


def test_generation_eval_notebook(series):
    """03 evaluates every checkpoint 02 wrote, writes its tables, and its front starts at the SFT (eta 0:
    KL 0) and ends at the SLERP policy (eta 1)."""
    work, ck, _, _ = series
    text, _ = run_notebook(
        "03_generation_eval", work, PRESET="offline", CHECKPOINTS=str(ck), STORE=str(work / "store"),
        OVERRIDES={"n_prompts": 16, "etas": [0.0, 0.5, 1.0], "limit_samples": 16},
        REFERENCE_LM=small_reference_lm(work / "reference_lm"),
    )  # fmt: skip
    results = pd.read_csv(ck / "eval" / "results.csv", index_col=0)
    assert set(results.index) == {"SFT", "WARP (slerp)", "WARP (liti)", "REINFORCE"}
    pareto = pd.read_csv(ck / "eval" / "pareto.csv")
    front = pareto[pareto["curve"].str.startswith("WARP")].set_index("eta")
    assert front.loc[0.0, "kl"] == pytest.approx(0.0, abs=1e-5)
    assert front.loc[1.0, "kl"] == pytest.approx(results.loc["WARP (slerp)", "kl"], rel=1e-4)
    reinforce = pareto[pareto["curve"] == "REINFORCE checkpoints"].set_index("step")
    assert len(reinforce) >= 3 and reinforce.loc[0, "kl"] == pytest.approx(0.0, abs=1e-5)  # starts at the SFT
    assert all((ck / "eval" / f).stat().st_size > 0 for f in ("results.png", "pareto.png"))
    assert json.loads((ck / "eval" / "headline.json").read_text())["models"]["SFT"]["kl"] == pytest.approx(
        0, abs=1e-5
    )
    # coherence under the offline reference LM, and paired differences: a model minus the SFT, paired by
    # prompt, has the difference of their means as its mean (both average over the same prompts)
    assert (results["ref_ppl"] > 1).all()
    paired = pd.read_csv(ck / "eval" / "paired.csv").set_index(["difference", "column"])
    for name in ("WARP (slerp)", "WARP (liti)", "REINFORCE"):
        diff = results.loc[name, "score"] - results.loc["SFT", "score"]
        assert paired.loc[(f"{name} - SFT", "score"), "mean"] == pytest.approx(diff, abs=1e-6)
        assert (f"{name} - SFT", "ref_nll") in paired.index
    assert ("WARP front - REINFORCE, at REINFORCE's KL", "score") in paired.index
    # the testbed's limit: the optimum's curve starts at the SFT (beta large: KL ~0, the SFT's own reward)
    limit = pd.read_csv(ck / "eval" / "limit.csv")
    optimum = limit[limit["curve"] == "optimum"].sort_values("kl")
    assert optimum["kl"].iloc[0] < 0.05 and (limit["kl"] <= math.log(16) + 1e-9).all()
    assert "gap_to_limit" in results  # NaN where the limit of 16 samples is not reliable (most KLs here)
    assert results["gold"].notna().all() and ("WARP (slerp) - SFT", "gold") in paired.index  # the lexicon
    assert (results["gap_to_limit"].dropna() < 0.5).all()  # no model far above the best any policy can do
    # its last cell asked the store for what 04 takes (01's model, 02's run of its mu) and 03's results
    assert f"all that 04 needs is in the store {work / 'store'}: reward_model, warp/config.json" in text
    assert "warp/iter1/merge.json" in text.split("all that 04 needs")[1] and "NOT all" not in text


def test_mu_sweep_notebook_reuses_training_and_skips_finished(series):
    """04 trains one WARP per mu with 02's code, writes its CSV, and a restart skips finished values."""
    work, ck, _, _ = series
    params = dict(
        PRESET="offline", CHECKPOINTS=str(ck), STORE=str(work / "store"), MUS=[0.01, 0.1],
        OVERRIDES={"steps": 3, "iterations": 1},
        EVAL_OVERRIDES={"n_prompts": 8, "samples_per_prompt": 1, "limit_samples": 8},
    )  # fmt: skip
    text, _ = run_notebook("04_mu_sweep", work, **params)
    said = f"all that a rerun of 04 needs is in the store {work / 'store'}: mu_sweep/mu_sweep.csv"
    assert said in text and "mu_sweep/mu=0.1/final_liti" in text and "NOT all" not in text
    table = pd.read_csv(ck / "mu_sweep" / "mu_sweep.csv", index_col=0)
    assert list(table.index) == ["SFT", "mu=0.01", "mu=0.1"] and "gap_to_limit" in table and "gold" in table
    assert (ck / "mu_sweep" / "mu_sweep.png").stat().st_size > 0
    finals = [ck / "mu_sweep" / f"mu={mu}" / "final_slerp" / "model.safetensors" for mu in (0.01, 0.1)]
    stamps = [f.stat().st_mtime_ns for f in finals]
    run_notebook("04_mu_sweep", work, **params)
    assert [f.stat().st_mtime_ns for f in finals] == stamps  # nothing retrained


def test_mu_sweep_reuses_02s_run_for_its_mu(series):
    """A mu that 02 trained with the same settings is read from 02's folder, not trained a second time, and
    04 writes its tables although no mu of its own made its folder (run as the first 04 of a series)."""
    import runs

    work, ck, _, _ = series
    sweep = ck / "mu_sweep"
    earlier = sweep.with_name("mu_sweep.earlier")  # another test's sweep, put back after
    if sweep.exists():
        sweep.rename(earlier)
    params = dict(
        PRESET="offline",
        CHECKPOINTS=str(ck),
        STORE=str(work / "store"),
        MUS=[0.01],
        EVAL_OVERRIDES={"n_prompts": 4, "limit_samples": 0},
    )
    try:
        text, _ = run_notebook("04_mu_sweep", work, **params)
        assert "mu=0.01: 02 trained it with these settings; reusing" in text
        assert not (sweep / "mu=0.01").exists()  # nothing trained or written for it
        table = pd.read_csv(sweep / "mu_sweep.csv", index_col=0)
        assert table.loc["mu=0.01", "train_minutes"] == pytest.approx(runs.stage_minutes(ck / "warp")["warp"])
    finally:
        if earlier.exists():
            shutil.rmtree(sweep, ignore_errors=True)
            earlier.rename(sweep)


def test_the_store_gets_what_is_costly_to_recompute_in_few_commits(series):
    """01 and 02 in sessions of their own, joined by a folder store (its ledger counts the commits): 02 got
    01's model from the store; each notebook made at most 30 commits; every run's final state and every
    merge went to the store and, once the next merge was stored, left it; no progress checkpoint was
    stored (the runs are far shorter than store_progress_minutes); 01 and 02 said "stored" after it."""
    import storage

    work, ck, _, texts = series
    ledger = [json.loads(line) for line in (work / "store" / storage.LEDGER).read_text().splitlines()]
    sessions = list(dict.fromkeys(e["session"] for e in ledger))
    by_notebook = dict(
        zip(["01", "02"], ([e for e in ledger if e["session"] == s] for s in sessions), strict=False)
    )
    assert all(0 < len(commits) <= 30 for commits in by_notebook.values()), {
        k: len(v) for k, v in by_notebook.items()
    }
    added = [f for e in by_notebook["02"] for f in e["added"]]
    for i in range(2):
        assert all(f"warp/iter{i}/run{m}/final.safetensors" in added for m in range(2)), "every run's final"
    assert "warp/iter1/init.safetensors" in added and "warp/final_slerp/model.safetensors" in added, "merges"
    assert "warp/iter0/slerp.safetensors" not in added  # only the next start is needed, not the SLERP state
    assert not any(f.endswith("progress.pt") for e in ledger for f in e["added"]), "no progress stored"
    held = {p.relative_to(work / "store").as_posix() for p in (work / "store").rglob("*") if p.is_file()}
    assert not any(f.endswith(("final.safetensors", "init.safetensors", "slerp.safetensors")) for f in held)
    assert {"warp/final_slerp/model.safetensors", "warp/final_liti/model.safetensors"} <= held
    assert (
        "reward_model/model.safetensors" in held
        and sum("reinforce/step" in f and f.endswith("model.safetensors") for f in held) == 5
    )
    assert "is stored in" in texts["01"] and f"stored in {work / 'store'}" in texts["02"]
    # each asked the store itself for all that the later notebooks take from it
    assert f"all that 02, 03 and 04 need is in the store {work / 'store'}: reward_model\n" in texts["01"]
    said = f"all that 03 and 04 need is in the store {work / 'store'}: reward_model, warp/config.json, "
    assert said + "warp/final_slerp, warp/final_liti, warp/reinforce, warp/iter1/merge.json" in texts["02"]
    assert (ck / "reward_model" / "metrics.json").exists()  # 02 pulled 01's model from the store


def test_collect_figures_copies_what_readme_shows(tmp_path):
    """run_series --figures copies each stage's plots and tables with a stage prefix, skipping absent ones."""
    from run_series import collect_figures

    ck = tmp_path / "ck"
    (ck / "eval").mkdir(parents=True)
    (ck / "eval" / "pareto.png").write_bytes(b"png")
    (ck / "eval" / "unrelated.pt").write_bytes(b"x")
    copied = collect_figures(ck, tmp_path / "docs")
    assert [p.name for p in copied] == ["eval_pareto.png"]
    assert (tmp_path / "docs" / "eval_pareto.png").read_bytes() == b"png"
