"""Evaluation against the truth: KL of a model with itself, and KL on enumerable completions."""

import json
import math

import pandas as pd
import pytest
import torch

import evaluation
import sampling
import utils
from tests import tiny


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny SFT and a policy made different from it (noised weights: peaked, different distributions)."""
    d = tmp_path_factory.mktemp("eval")
    sft, tok = utils.load_policy(tiny.save_tiny_policy(d / "sft"))
    policy, _ = utils.load_policy(str(d / "sft"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return policy.eval(), sft.eval(), tok


def zero_reward(prompt_ids, prompt_mask, completions, mask):
    return torch.zeros(completions.shape[0])


def exact_two_token_kl(policy, sft, prompt: list[int], eos: int, temperature: float) -> float:
    """KL(pi || sft) over all completions of at most 2 tokens (stopping at EOS), by enumeration,
    from plain unpadded forward passes (independent of the code under test)."""
    x = torch.tensor([prompt])
    with torch.no_grad():
        lp1 = (policy(x).logits[0, -1] / temperature).log_softmax(-1)  # (V,)
        lq1 = (sft(x).logits[0, -1] / temperature).log_softmax(-1)
        vocab = lp1.shape[0]
        both = torch.cat([x.repeat(vocab, 1), torch.arange(vocab)[:, None]], dim=1)  # every first token
        lp2 = (policy(both).logits[:, -1] / temperature).log_softmax(-1)  # (V, V)
        lq2 = (sft(both).logits[:, -1] / temperature).log_softmax(-1)
    p1 = lp1.exp()
    kl_second = (lp2.exp() * (lp2 - lq2)).sum(-1)  # KL of the second token given each first token
    kl_second[eos] = 0.0  # the sequence ends at EOS
    return ((p1 * (lp1 - lq1)).sum() + (p1 * kl_second).sum()).item()


def test_kl_of_a_model_with_itself_is_zero(models):
    """Both estimators give exactly 0 when the policy is the SFT."""
    _, sft, tok = models
    rows = [[5, 6, 7], [8, 9]]
    torch.manual_seed(0)
    df = evaluation.sample_and_score(
        sft, sft, tok, zero_reward, rows, samples_per_prompt=4, max_new_tokens=5, temperature=0.9
    )
    assert (df["kl"].abs() < 1e-5).all() and (df["kl_k1"].abs() < 1e-5).all()


def test_compiled_sampling_scores_the_same_samples(models):
    """Evaluation with the compiled decode step samples and scores exactly what the eager loop does (fp32,
    same seed): texts, rewards and both KL estimates."""
    policy, sft, tok = models
    rows = [[5, 6, 7], [8, 9], [4, 12, 30, 2]]
    length_reward = lambda prompt_ids, prompt_mask, completions, mask: mask.sum(1).float()

    def table(compiled):
        torch.manual_seed(3)
        return evaluation.sample_and_score(
            policy, sft, tok, length_reward, rows, samples_per_prompt=2, max_new_tokens=6, temperature=0.9,
            compiled=compiled,
        )  # fmt: skip

    eager, ours = table(False), table(True)
    assert eager["completion"].tolist() == ours["completion"].tolist()
    for col in ("score", "kl", "kl_k1"):
        assert ours[col].tolist() == pytest.approx(eager[col].tolist(), abs=1e-5), col


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_kl_estimates_match_enumeration(models, temperature):
    """On completions of <= 2 tokens, the mean KL estimate per prompt matches the enumerated exact KL
    within its 95% confidence interval (x1.5 slack), for both estimators and padded prompts."""
    policy, sft, tok = models
    rows = [[5, 6, 7, 8], [9, 10]]  # different lengths: the shorter one is left-padded
    torch.manual_seed(1)
    df = evaluation.sample_and_score(
        policy, sft, tok, zero_reward, rows, samples_per_prompt=300, max_new_tokens=2,
        temperature=temperature, batch_size=128,  # the 3rd batch mixes both prompts: one is padded
    )  # fmt: skip
    for p, prompt in enumerate(rows):
        exact = exact_two_token_kl(policy, sft, prompt, tok.eos_token_id, temperature)
        assert exact > 0.05  # the two models really differ
        for col in ("kl", "kl_k1"):
            mean, ci = evaluation.mean_ci(df[df.prompt == p][col].tolist())
            assert abs(mean - exact) <= 1.5 * ci + 1e-4, (p, col, mean, ci, exact)
        # the exact-per-position estimator has lower variance than k1
        assert df[df.prompt == p]["kl"].std() < df[df.prompt == p]["kl_k1"].std()


def test_summarise_splits_and_diversity():
    """summarise averages per prompt first, splits by prompt sentiment and counts distinct n-grams."""
    df = pd.DataFrame(
        dict(
            prompt=[0, 0, 1, 1], sample=[0, 1, 0, 1], text=["x"] * 4,
            completion=["a b", "a b", "c d", "e f"], score=[1.0, 3.0, -1.0, -1.0],
            kl=[0.5, 0.5, 1.0, 1.0], kl_k1=[0.4, 0.6, 1.2, 0.8], length=[2, 2, 2, 2],
        )
    )  # fmt: skip
    s = evaluation.summarise(df, labels=[1, 0])
    assert s["score"] == pytest.approx(0.5)  # mean of the per-prompt means 2 and -1
    assert s["score/positive"] == pytest.approx(2.0) and s["score/negative"] == pytest.approx(-1.0)
    assert s["score_ci95"] == pytest.approx(1.96 * math.sqrt(4.5) / math.sqrt(2))
    assert s["distinct-1"] == pytest.approx(6 / 8) and s["distinct-2"] == pytest.approx(3 / 4)


def test_eval_prompts_are_balanced_and_cut_by_tokens(tmp_path):
    """Test prompts come from the test split, half positive and half negative, each exactly N tokens."""
    import json

    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / "test.jsonl", "w") as f:
        for i, text in enumerate(tiny.corpus(40)):
            f.write(json.dumps({"text": text, "label": i % 2}) + "\n")
    _, tok = utils.load_policy(tiny.save_tiny_policy(tmp_path / "sft"))
    rows, labels, texts = evaluation.eval_prompts(str(tmp_path / "data"), tok, 10, 3)
    assert len(rows) == 10 and sum(labels) == 5
    assert all(len(r) == 3 for r in rows)
    assert all(
        tok(t, add_special_tokens=False)["input_ids"][:3] == r for r, t in zip(rows, texts, strict=True)
    )


def test_trained_from_prefers_what_02_recorded(tmp_path):
    """03 measures KL against the SFT 02 trained from (a Hub id or an existing folder), and falls back to
    the preset's where nothing was recorded or the recorded folder is gone."""
    defaults = {"sft": "preset/sft", "data": "preset/data"}
    assert evaluation.trained_from(tmp_path / "none", defaults) == defaults
    (tmp_path / "config.json").write_text(json.dumps({"sft": "me/my-sft", "data": str(tmp_path)}))
    assert evaluation.trained_from(tmp_path, defaults) == {"sft": "me/my-sft", "data": str(tmp_path)}
    (tmp_path / "config.json").write_text(json.dumps({"sft": str(tmp_path / "gone"), "data": ""}))
    assert evaluation.trained_from(tmp_path, defaults) == defaults


def test_reference_perplexity_is_the_reference_lms_own_nll(models):
    """`ref_nll` is the completion's mean NLL per token (up to and including EOS) under the reference LM
    at temperature 1, given the prompt, from a plain unpadded forward pass; `ref_ppl` is exp of the
    token-weighted mean. A reference that is the sampling policy itself scores lower than another LM."""
    policy, sft, tok = models
    rows = [[5, 6, 7, 8], [9, 10]]  # the second is left-padded in the batch
    for ref, temperature in ((sft, 0.9), (policy, 1.0)):
        torch.manual_seed(3)
        df = evaluation.sample_and_score(
            policy, sft, tok, zero_reward, rows, samples_per_prompt=3, max_new_tokens=6,
            temperature=temperature, reference=ref,
        )  # fmt: skip
        torch.manual_seed(3)  # the same draws again, to get the completion tokens themselves
        jobs = [p for p in range(len(rows)) for _ in range(3)]
        ids, pmask = utils.left_pad([rows[p] for p in jobs], tok.pad_token_id)
        comps, mask = sampling.sample_completions(
            policy, ids, pmask, max_new_tokens=6, temperature=temperature, eos_token_id=tok.eos_token_id
        )
        for j, r in df.iterrows():
            n = int(mask[j].sum())
            seq = rows[jobs[j]] + comps[j, :n].tolist()
            with torch.no_grad():
                logp = ref(torch.tensor([seq])).logits[0, :-1].double().log_softmax(-1)
            target = torch.tensor(seq[1:])
            nll = -logp[torch.arange(len(target)), target][-n:].mean().item()
            assert r.length == n and r.ref_nll == pytest.approx(nll, abs=1e-4)
        s = evaluation.summarise(df, labels=[1, 0])
        assert s["ref_ppl"] == pytest.approx(math.exp((df.ref_nll * df.length).sum() / df.length.sum()))
        if ref is policy:
            own = s["ref_ppl"]
        else:
            other = s["ref_ppl"]
    assert own < other  # samples of a model are likelier under that model than under another


def paired_tables(prompt_effect, shift, noise=0.0, seed=0):
    """Two sample tables over the same prompts: b = a + shift (per prompt) + noise."""
    g = torch.Generator().manual_seed(seed)
    n = len(prompt_effect)
    a = pd.DataFrame({"prompt": list(range(n)) * 2, "score": list(prompt_effect) * 2})
    a["score"] += torch.randn(2 * n, generator=g, dtype=torch.float64).numpy()
    b = a.copy()
    b["score"] = (
        a["score"] + list(shift) * 2 + noise * torch.randn(2 * n, generator=g, dtype=torch.float64).numpy()
    )
    return a, b


def test_paired_difference_cancels_what_prompts_share():
    """A constant shift is found exactly with a zero interval, however much the prompts differ; with
    noise, the paired interval is much narrower than the two models' own intervals; other prompts fail."""
    effect = torch.linspace(-5, 5, 40).tolist()
    a, b = paired_tables(effect, [0.3] * 40)
    mean, ci = evaluation.paired_diff(a, b)
    assert mean == pytest.approx(0.3) and ci == pytest.approx(0.0, abs=1e-9)
    a, b = paired_tables(effect, [0.3] * 40, noise=0.2)
    mean, ci = evaluation.paired_diff(a, b)
    _, ci_a = evaluation.mean_ci(a.groupby("prompt").score.mean().tolist())
    assert abs(mean - 0.3) < 2 * ci and ci < ci_a / 5
    with pytest.raises(ValueError, match="same prompts"):
        evaluation.paired_diff(a, b[b.prompt < 39])


def test_matched_kl_difference_interpolates_the_front_per_prompt():
    """Against a front whose points have KL 0, 1, 2 and per-prompt scores 0, 1, 2 (+ prompt effect), a model
    at KL 1.5 scoring 2 + effect beats the front by exactly 0.5 there; beyond the front's range: NaN."""
    effect = torch.linspace(-3, 3, 10).tolist()

    def table(kl, score):
        return pd.DataFrame({"prompt": range(10), "kl": kl, "score": [score + e for e in effect]})

    front = [table(0.0, 0.0), table(1.0, 1.0), table(2.0, 2.0)]
    mean, ci, where = evaluation.matched_kl_diff(front, table(1.5, 2.0))
    assert mean == pytest.approx(0.5) and ci == pytest.approx(0.0, abs=1e-9) and where == pytest.approx(1.5)
    assert math.isnan(evaluation.matched_kl_diff(front, table(2.5, 2.0))[0])
    with pytest.raises(ValueError, match="sorted by KL"):
        evaluation.matched_kl_diff(front[::-1], table(1.5, 2.0))


def test_a_gold_reward_is_scored_on_the_same_text_and_summarised_like_the_reward(models):
    """With `gold` (text -> float), each sample's `gold` is the judge's score of the very text the reward
    model scored (prompt + completion), and `summarise` reports it per prompt then over prompts, by
    prompt sentiment too, as it does the reward."""
    import offline

    policy, sft, tok = models
    seen = []
    judge = lambda text: seen.append(text) or offline.lexicon_sentiment(text) + len(text)
    torch.manual_seed(0)
    df = evaluation.sample_and_score(
        policy, sft, tok, zero_reward, [[5, 6, 7], [8, 9]], samples_per_prompt=3, max_new_tokens=5,
        temperature=0.9, gold=judge,
    )  # fmt: skip
    assert seen == df["text"].tolist()
    assert df["gold"].tolist() == [offline.lexicon_sentiment(t) + len(t) for t in df["text"]]
    s = evaluation.summarise(df, labels=[1, 0])
    per_prompt = df.groupby("prompt")["gold"].mean()
    assert s["gold"] == pytest.approx(per_prompt.mean()) and s["gold/positive"] == pytest.approx(
        per_prompt[0]
    )
    assert "gold" not in evaluation.summarise(df.drop(columns="gold"), labels=[1, 0])
