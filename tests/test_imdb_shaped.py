"""The imdb preset's code path at its real shapes, without the Hub: GPT-2 small and a DistilBERT-base-shaped
encoder with random weights, GPT-2's real tokenizer (no pad token, as on the Hub) and real IMDb reviews from
`../shared/data`. All four notebooks run top to bottom on the CPU with tiny step counts, through the smoke
mode of `bench/gpu_check.py` (the GPU check's own code path). What this exercises is shapes, padding,
truncation at 512 reward tokens, dtypes and the GPU check's bookkeeping; the numbers themselves are noise
(random weights). Skips when `../shared/data` is absent."""

from __future__ import annotations

import json
import math
import shutil

import pandas as pd
import pytest
import torch

import checkpoints
import config
import utils
import warp
from bench import gpu_check, imdb_shaped
from evaluation import eval_prompts

MISSING = imdb_shaped.missing_shared()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    """The GPU check's smoke run on this machine: (its working folder, its measurements)."""
    out = tmp_path_factory.mktemp("gpu_check")
    result = gpu_check.main(["--smoke", "--out", str(out)])
    yield out, result
    shutil.rmtree(out, ignore_errors=True)  # a few GB of GPT-2 states


def test_gpu_check_reports_every_stage(check):
    out, result = check
    print("\n" + (out / "gpu_check.md").read_text())
    assert result["machine"]["torch"] == torch.__version__
    assert {"01 (no)", "02", "03", "04"} <= set(result["stages"])
    for stage, row in result["stages"].items():
        assert row["wall s"] > 0 and row["projected imdb min"] > 0, stage
    for stage in ("02", "04"):
        assert result["stages"][stage]["s/step"] > 0 and result["stages"][stage]["tokens/s"] > 0
    assert result["stages"]["02"]["steps"] == 2 * 2 * 1 + 4  # WARP's I x M x T, and REINFORCE's 4
    assert json.loads((out / "gpu_check.json").read_text())["stages"].keys() == result["stages"].keys()


def test_reward_model_truncates_long_reviews_at_512(check):
    """A real review longer than 512 encoder tokens is cut to exactly 512 ([CLS] ... [SEP]), and the
    512-position reward model 01 trained scores it."""
    out, _ = check
    model, tokenizer = utils.load_reward_model(str(out / "ck" / "reward_model"))
    assert (model.config.n_layers, model.config.dim, model.config.max_position_embeddings) == (6, 768, 512)
    reviews = utils.load_reviews(str(out / "assets" / "imdb"), "train")["text"][:300]
    lengths = [len(ids) for ids in tokenizer(list(reviews))["input_ids"]]
    long = max(range(len(lengths)), key=lengths.__getitem__)
    assert lengths[long] > 512, "no review of the sample is longer than 512 tokens"
    enc = tokenizer([reviews[long], reviews[0]], padding=True, truncation=True, max_length=512)
    assert [len(ids) for ids in enc["input_ids"]] == [512, 512]  # padded to the longest, which is cut
    assert (
        enc["input_ids"][0][0] == tokenizer.cls_token_id and enc["input_ids"][0][-1] == tokenizer.sep_token_id
    )
    scores = utils.score_texts(model, tokenizer, [reviews[long], reviews[0]], batch_size=2, max_length=512)
    assert scores.shape == (2,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    m = json.loads((out / "ck" / "reward_model" / "metrics.json").read_text())
    assert math.isfinite(m["pairwise_accuracy"]) and m["reload_max_abs_diff"] < 1e-4
    assert m["model"]["lora_targets"] == ["q_lin", "v_lin"]


def test_policy_prompts_are_15_gpt2_tokens_left_padded_with_eos(check):
    """GPT-2's tokenizer has no pad token: the policy pads with EOS on the left; training and evaluation
    prompts are exactly 15 tokens, cut from reviews whose <br /> breaks were cleaned."""
    out, _ = check
    from transformers import AutoTokenizer

    sft, data = str(out / "assets" / "gpt2"), str(out / "assets" / "imdb")
    assert AutoTokenizer.from_pretrained(sft).pad_token is None  # as the Hub's gpt2 / lvwerra/gpt2-imdb
    model, tokenizer = utils.load_policy(sft)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 50256 and tokenizer.padding_side == "left"
    assert model.get_input_embeddings().weight.shape == (50257, 768) and len(model.transformer.h) == 12
    cfg = config.WarpConfig.for_preset("imdb", sft=sft, data=data)
    prompts, dropped = warp.training_prompts(cfg, tokenizer)
    assert cfg.prompt_tokens == 15 and len(prompts) + dropped == 3000 and {len(p) for p in prompts} == {15}
    assert not any("<br" in tokenizer.decode(p) for p in prompts)
    rows, labels, _ = eval_prompts(data, tokenizer, 8, cfg.prompt_tokens)
    assert {len(r) for r in rows} == {15} and sorted(labels) == [0] * 4 + [1] * 4
    ids, mask = utils.left_pad([prompts[0], prompts[1][:10]], tokenizer.pad_token_id)
    assert ids.shape == (2, 15) and ids[1, :5].tolist() == [50256] * 5 and mask[1].sum() == 10


def test_warp_policies_are_gpt2_small_after_slerp_and_liti(check):
    out, _ = check
    from transformers import AutoConfig, AutoTokenizer

    warp_dir = out / "ck" / "warp"
    summary = json.loads((warp_dir / "summary.json").read_text())
    assert set(summary["heldout"]) == {"SFT", "WARP (slerp)", "WARP (liti)", "REINFORCE"}
    assert all(math.isfinite(v["score"]) and math.isfinite(v["kl"]) for v in summary["heldout"].values())
    assert summary["heldout"]["SFT"]["kl"] == pytest.approx(0.0, abs=1e-4)
    for name in ("final_slerp", "final_liti", "reinforce/step00004"):
        cfg = AutoConfig.from_pretrained(warp_dir / name)
        assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.n_positions) == (12, 768, 50257, 1024), name
        tok = AutoTokenizer.from_pretrained(warp_dir / name)
        assert len(tok) == 50257 and tok.eos_token_id == 50256, name
    state = checkpoints.load_state_file(warp_dir / "iter1" / "init.safetensors")
    assert state["transformer.wte.weight"].shape == (50257, 768)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in state.values())
    history = json.loads((warp_dir / "iter0" / "run0" / "metrics.json").read_text())
    assert len(history) == 1 and 1 <= history[0]["policy/completion_length"] <= 8


def test_03_and_04_evaluate_at_real_shapes(check):
    out, _ = check
    results = pd.read_csv(out / "ck" / "eval" / "results.csv", index_col=0)
    assert set(results.index) == {"SFT", "WARP (slerp)", "WARP (liti)", "REINFORCE"}
    assert results[["score", "kl"]].notna().all().all()
    pareto = pd.read_csv(out / "ck" / "eval" / "pareto.csv")
    front = pareto[pareto["curve"].str.startswith("WARP")].set_index("eta")
    assert list(front.index) == [0.0, 1.0] and front.loc[0.0, "kl"] == pytest.approx(0.0, abs=1e-4)
    table = pd.read_csv(out / "ck" / "mu_sweep" / "mu_sweep.csv", index_col=0)
    assert list(table.index) == ["SFT", "mu=0.025"] and table[["score", "kl"]].notna().all().all()
