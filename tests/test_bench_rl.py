"""Smoke test of the RL step benchmark (`bench/rl_step.py`): one step of our WARP step and one of TRL's
RLOOTrainer at the offline scale, through the benchmark's own command. It checks that the report is
complete and well-formed (every phase timed and positive, the same work on both sides, finite ratios);
speed itself is never asserted. Skips when TRL (installed from `bench/requirements.txt`) is absent."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("trl")

from bench import rl_step  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_rl")
    argv = ["--smoke", "--scale", "offline", "--out", str(out), "--assets", str(out / "assets")]
    argv += ["--compile"]  # ours samples with the compiled decode step; TRL's side is unchanged
    result = rl_step.run(argv)
    return out, result


def test_report_files_agree(report):
    out, result = report
    assert json.loads((out / "bench_rl.json").read_text()) == json.loads(json.dumps(result))
    markdown = (out / "bench_rl.md").read_text()
    print("\n" + markdown)
    for label in ["**step (median)**", "**non-reward part**", *rl_step.PHASE_LABELS.values()]:
        assert label in markdown, label
    assert "TRL / ours: whole step" in markdown
    assert result["settings"]["compile_generation"] and "compiled decode step" in markdown
    assert result["machine"]["trl"] != "not installed"


def test_every_phase_is_timed_and_positive(report):
    offline = report[1]["scales"]["offline"]
    shared = ["generation", "policy_logprobs", "anchor_logprobs", "reward", "non_reward"]
    for side, own in (("ours", ["ema", "reward_texts"]), ("trl", ["policy_logprobs_nograd"])):
        s = offline[side]
        assert s["steps"] == 1 and s["step_s"] > 0, side
        for phase in shared + own:
            assert s["phases_s"][phase] > 0, (side, phase)
        # the timed phases fit inside the step; what is left is backward + optimizer + the rest
        assert s["phases_s"]["backward_optimizer"] > 0, side
        assert s["samples_per_s"] > 0 and s["generated_tokens_per_s"] > 0
        assert s["peak_memory_bytes"] > 2**20
    assert offline["ours"]["phases_s"]["policy_logprobs_nograd"] == 0  # ours has no second policy pass
    ours = offline["ours"]["phases_s"]
    assert ours["reward_texts"] < ours["reward"]  # a part of the reward phase, not counted twice
    assert offline["merge"]["seconds"] > 0 and offline["merge"]["parameters"] > 0


def test_both_sides_do_the_same_work(report):
    offline = report[1]["scales"]["offline"]
    for side in ("ours", "trl"):
        s = offline[side]
        assert s["completions_per_step"] == [32], side
        assert s["unique_prompts_per_step"] == [16], side
        assert 1 <= s["mean_completion_tokens"] <= rl_step.SMOKE_NEW_TOKENS
    # the same prompts, tokenised back from their text by TRL
    ours_prompt = offline["ours"]["mean_prompt_tokens"]
    assert offline["trl"]["mean_prompt_tokens"] == pytest.approx(ours_prompt, abs=0.5)
    trl = offline["trl"]["settings"]
    assert trl["generation_batch_size"] == 32 and trl["num_generations"] == 2
    assert trl["steps_per_generation"] == 1 and trl["num_iterations"] == 1
    assert trl["beta"] == offline["ours"]["settings"]["beta"] == 0.1
    assert trl["learning_rate"] == offline["ours"]["settings"]["lr"]
    assert trl["temperature"] == offline["ours"]["settings"]["temperature"] == 0.9
    assert trl["top_k"] in (0, None) and trl["top_p"] == 1.0


def test_ratios_are_finite(report):
    ratios = report[1]["scales"]["offline"]["ratios"]
    assert set(ratios) == {"step", "non_reward"}
    assert all(math.isfinite(r) and r > 0 for r in ratios.values())


def test_flops_count_every_pass():
    """Generation 2N, policy 6N, anchor 2N per processed token, reward 2N_r per reward token."""
    params = {"policy": {"non_embedding": 10, "lm_head": 5}, "reward": {"non_embedding": 7}}
    work = {"completions": 4, "prompt_width": 3, "completion_width": 2, "reward_tokens": 11}
    flops = rl_step.step_flops(params, work)
    assert flops["generation"] == 2 * 15 * 20 and flops["policy"] == 6 * 15 * 20
    assert flops["anchor"] == 2 * 15 * 20 and flops["reward"] == 2 * 7 * 11
    assert flops["total"] == 10 * 15 * 20 + 2 * 7 * 11


def test_phase_clock_counts_nested_calls_once():
    clock = rl_step.PhaseClock()
    inner = clock.wrap(lambda: None, lambda: "inner")
    outer = clock.wrap(lambda: inner(), lambda: "outer")
    outer()
    assert set(clock.take()) == {"outer"}
    assert clock.take() == {}
