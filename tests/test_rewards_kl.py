"""Properties of the reward scoring and the sequence-level KL estimators."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

import sampling
import utils

# ------------------------------------------------------------------------------------------------------
# KL on a vocabulary small enough to enumerate every completion
# ------------------------------------------------------------------------------------------------------

V, EOS, L, T = 6, 1, 2, 0.9
PROMPT = [2, 3, 4, 5]


def small_policy(make_gpt2, seed: int):
    """Untied tiny GPT-2 over V tokens with an output layer big enough for distinct distributions."""
    model = make_gpt2(seed=seed, vocab_size=V, tie=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.lm_head.weight.copy_(0.4 * torch.randn(model.lm_head.weight.shape, generator=g))
    return model


def all_completions() -> torch.Tensor:
    """Every completion of at most L tokens: [EOS] (then padding) or L tokens whose first is not EOS."""
    rows = [[EOS] + [EOS] * (L - 1)]
    rows += [list(y) for y in itertools.product(range(V), repeat=L) if y[0] != EOS]
    return torch.tensor(rows)


@torch.no_grad()
def loop_seq_logprob(model, prompt: list[int], completion: list[int]) -> float:
    """log p(y|x) at temperature T by a plain per-step loop, stopping after the first EOS."""
    total = 0.0
    for t, tok in enumerate(completion):
        logits = model(torch.tensor([prompt + completion[:t]])).logits[0, -1].double()
        total += float(torch.log_softmax(logits / T, -1)[tok])
        if tok == EOS:
            break
    return total


@pytest.fixture
def enumerated(make_gpt2):
    """Policy and reference logits/log-probs for every completion of the prompt, plus p(y) by a loop."""
    policy, ref = small_policy(make_gpt2, 11), small_policy(make_gpt2, 12)
    comps = all_completions()
    n = comps.shape[0]
    ids = torch.tensor([PROMPT] * n)
    pmask = torch.ones_like(ids)
    with torch.no_grad():
        logits = utils.completion_logits(policy, ids, pmask, comps, T)
        ref_logits = utils.completion_logits(ref, ids, pmask, comps, T)
    mask = sampling.completion_mask(comps, EOS)
    lp, ref_lp = utils.token_logprobs(logits, comps), utils.token_logprobs(ref_logits, comps)
    loop_p = torch.tensor([loop_seq_logprob(policy, PROMPT, c.tolist()) for c in comps], dtype=torch.float64)
    loop_q = torch.tensor([loop_seq_logprob(ref, PROMPT, c.tolist()) for c in comps], dtype=torch.float64)
    return dict(
        comps=comps,
        mask=mask,
        logits=logits,
        ref_logits=ref_logits,
        lp=lp,
        ref_lp=ref_lp,
        p=loop_p.exp(),
        loop_logratio=loop_p - loop_q,
        loop_kl=(loop_p.exp() * (loop_p - loop_q)).sum().item(),
    )


def test_enumeration_covers_all_probability(enumerated):
    """Sanity of the set-up: p(y) over all enumerated completions sums to 1, and the KL is clearly > 0."""
    assert enumerated["p"].sum().item() == pytest.approx(1.0, abs=1e-6)
    assert enumerated["loop_kl"] > 0.01


def test_kl_estimators_have_the_exact_sequence_kl_as_expectation(enumerated):
    """Sum_y p(y) k1(y) and sum_y p(y) kl_exact(y) both equal sum_y p(y) log p(y)/q(y) (chain rule)."""
    e = enumerated
    p, exact = e["p"], e["loop_kl"]
    k1 = utils.kl_k1(e["lp"], e["ref_lp"], e["mask"]).double()
    kx = utils.kl_exact(e["logits"], e["ref_logits"], e["mask"]).double()
    assert k1.shape == kx.shape == (e["comps"].shape[0],)
    assert (p * k1).sum().item() == pytest.approx(exact, rel=1e-4, abs=1e-6)
    assert (p * kx).sum().item() == pytest.approx(exact, rel=1e-4, abs=1e-6)
    # k1 is the log-ratio of the whole sequence: it matches the loop's log p - log q sequence by sequence
    torch.testing.assert_close(k1, e["loop_logratio"], rtol=0, atol=1e-4)


def test_kl_power_checks_misaligned_or_unrelated_positions_give_another_number(enumerated):
    """The enumeration test can fail: KL over shifted positions or against another generation is wrong."""
    e = enumerated
    p, exact, mask = e["p"], e["loop_kl"], e["mask"]
    shifted = torch.roll(e["ref_logits"], shifts=1, dims=1)  # reference logits one position off
    bad1 = (p * utils.kl_exact(e["logits"], shifted, mask).double()).sum().item()
    other_gen = torch.roll(e["ref_lp"], shifts=1, dims=0)  # ref log-probs of a different completion
    bad2 = (p * utils.kl_k1(e["lp"], other_gen, mask).double()).sum().item()
    no_mask = (p * utils.kl_exact(e["logits"], e["ref_logits"], torch.ones_like(mask)).double()).sum().item()
    for bad in (bad1, bad2, no_mask):
        assert abs(bad - exact) > 1e-3


def test_kl_exact_is_nonnegative_per_sequence_and_k1_need_not_be(enumerated):
    """kl_exact >= 0 on every sequence; k1 (a single-sample log-ratio) is negative on some."""
    e = enumerated
    assert (utils.kl_exact(e["logits"], e["ref_logits"], e["mask"]) >= -1e-6).all()
    assert (utils.kl_k1(e["lp"], e["ref_lp"], e["mask"]) < 0).any()


def test_kl_ignores_positions_after_the_first_eos(enumerated):
    """Changing logits at masked (post-EOS) positions changes neither KL estimate."""
    e = enumerated
    masked_out = ~e["mask"]
    assert masked_out.any()
    noisy = e["ref_logits"] + 5.0 * torch.randn_like(e["ref_logits"]) * masked_out.unsqueeze(-1)
    noisy_lp = e["ref_lp"] + 5.0 * masked_out
    torch.testing.assert_close(
        utils.kl_exact(e["logits"], noisy, e["mask"]), utils.kl_exact(e["logits"], e["ref_logits"], e["mask"])
    )
    torch.testing.assert_close(
        utils.kl_k1(e["lp"], noisy_lp, e["mask"]), utils.kl_k1(e["lp"], e["ref_lp"], e["mask"])
    )


def test_kl_is_zero_for_identical_models(make_gpt2):
    """KL(pi || pi) = 0 for both estimators, on a padded batch of sampled completions."""
    policy = small_policy(make_gpt2, 13)
    ids, pmask = utils.left_pad([[2, 3], [4, 5, 2, 3]], pad_id=EOS)
    torch.manual_seed(0)
    comps, mask = sampling.sample_completions(
        policy, ids, pmask, max_new_tokens=5, temperature=T, eos_token_id=EOS
    )
    with torch.no_grad():
        a = utils.completion_logits(policy, ids, pmask, comps, T)
        b = utils.completion_logits(small_policy(make_gpt2, 13), ids, pmask, comps, T)
    lp_a, lp_b = utils.token_logprobs(a, comps), utils.token_logprobs(b, comps)
    assert torch.equal(utils.kl_k1(lp_a, lp_b, mask), torch.zeros(2))
    assert utils.kl_exact(a, b, mask).abs().max() < 1e-6


# ------------------------------------------------------------------------------------------------------
# Rewards
# ------------------------------------------------------------------------------------------------------

LONG = "a brilliant film with a moving story and superb acting."
TEXTS = [
    LONG,
    "dull.",
    LONG + " " + "the plot was clever, the cast charming.",
    "",
    'she said "lovely"',
    "lovely film",
]


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_score_texts_is_padding_invariant_and_float32(kind, bert_tokenizer, make_reward_model):
    """score_texts gives (N,) float32 scores that do not depend on the batch size (padding)."""
    rm = make_reward_model(kind, vocab_size=len(bert_tokenizer), seed=1)
    one_by_one = torch.cat([utils.score_texts(rm, bert_tokenizer, [t]) for t in TEXTS])
    assert one_by_one.shape == (len(TEXTS),) and one_by_one.dtype == torch.float32
    assert one_by_one.std() > 0  # the scores really depend on the text
    for bs in (1, 2, 4, 64):
        got = utils.score_texts(rm, bert_tokenizer, TEXTS, batch_size=bs)
        assert got.shape == (len(TEXTS),) and got.dtype == torch.float32
        torch.testing.assert_close(got, one_by_one, rtol=1e-5, atol=1e-5)


def test_score_texts_pads_each_batch_of_similar_lengths_only_to_its_longest(
    bert_tokenizer, make_reward_model
):
    """Texts are scored in length order, so a short text never waits on a 512-token one: each batch is as
    wide as its own longest text, and the total padding is the least any split into batches gives."""
    rm = make_reward_model("bert", vocab_size=len(bert_tokenizer), seed=1)
    texts = [" ".join([LONG] * 3), "dull.", " ".join([LONG] * 2), "fine film.", LONG, "bad."]
    lengths = [len(ids) for ids in bert_tokenizer(texts, truncation=True, max_length=128)["input_ids"]]
    widths, forward = [], rm.forward
    rm.forward = lambda input_ids, **kw: widths.append(input_ids.shape) or forward(input_ids=input_ids, **kw)
    utils.score_texts(rm, bert_tokenizer, texts, batch_size=2, max_length=128)
    by_length = sorted(lengths)
    assert widths == [(2, max(by_length[i : i + 2])) for i in range(0, 6, 2)]
    assert sum(2 * w for _, w in widths) < 6 * max(lengths)  # far less than padding all to the longest


def test_score_texts_truncates_and_handles_empty_input(bert_tokenizer, make_reward_model):
    """Texts longer than the encoder's positions are truncated to max_length; no text gives an empty (0,)."""
    rm = make_reward_model("bert", vocab_size=len(bert_tokenizer))
    long_text = " ".join([LONG] * 40)  # ~480 word pieces > 128 positions
    got = utils.score_texts(rm, bert_tokenizer, [long_text, "dull."], max_length=32)
    assert got.shape == (2,) and torch.isfinite(got).all()
    empty = utils.score_texts(rm, bert_tokenizer, [])
    assert empty.shape == (0,) and empty.dtype == torch.float32


def test_score_texts_half_precision_model_returns_float32(bert_tokenizer, make_reward_model):
    """A bf16 reward model still yields float32 scores."""
    rm = make_reward_model("bert", vocab_size=len(bert_tokenizer)).to(torch.bfloat16)
    assert utils.score_texts(rm, bert_tokenizer, TEXTS[:3]).dtype == torch.float32


def test_load_reward_model_is_a_frozen_single_logit_classifier(tmp_path, bert_tokenizer, make_reward_model):
    """load_reward_model gives an eval-mode, frozen, one-output classifier that scores like the saved one."""
    rm = make_reward_model("distilbert", vocab_size=len(bert_tokenizer), seed=2)
    rm.save_pretrained(tmp_path / "rm")
    bert_tokenizer.save_pretrained(tmp_path / "rm")
    loaded, tok = utils.load_reward_model(str(tmp_path / "rm"))
    assert not loaded.training and loaded.config.num_labels == 1
    assert not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(
        utils.score_texts(loaded, tok, TEXTS), utils.score_texts(rm, bert_tokenizer, TEXTS)
    )


def test_decode_texts_drops_left_padding_the_eos_and_what_follows(bpe_tokenizer):
    """decode_texts returns prompt + completion text: no left padding, no EOS, nothing after the EOS."""
    tok = bpe_tokenizer
    eos = tok.eos_token_id
    prompts = [tok.encode("A brilliant film"), tok.encode("Dull, clumsy and forgettable. Avoid")]
    ids, pmask = utils.left_pad(prompts, pad_id=eos)
    tail = tok.encode(" hated it")
    after = tok.encode(" lovely music")
    width = len(tail) + 1 + len(after)
    comp0 = tail + [eos] + after  # junk after the EOS must go
    comp1 = (after + tail + [eos] * width)[:width]
    comps = torch.tensor([comp0, comp1])
    mask = sampling.completion_mask(comps, eos)
    texts = utils.decode_texts(tok, ids, pmask, comps, mask)
    assert texts[0] == "A brilliant film hated it"
    assert texts[1] == tok.decode(prompts[1] + [t for t in comp1 if t != eos])
    assert all("<|endoftext|>" not in t for t in texts)


REAL_REVIEWS = Path(__file__).resolve().parents[2] / "shared" / "data" / "imdb_sample.jsonl"


@pytest.mark.skipif(not REAL_REVIEWS.exists(), reason=f"real IMDb reviews not found at {REAL_REVIEWS}")
def test_the_reward_scores_the_text_01_trained_on_not_the_raw_markup(monkeypatch):
    """Real IMDb reviews with `<br /><br />`, tokenised by GPT-2's real tokenizer as the policy writes them:
    r(x, y) hands the reward model exactly what 01 trained on (`load_reviews`' cleaning), no markup."""
    from bench.imdb_shaped import SHARED, gpt2_tokenizer, missing_shared

    if missing_shared(SHARED):
        pytest.skip(missing_shared(SHARED))
    rows = [json.loads(line) for line in REAL_REVIEWS.read_text().splitlines()]
    raw = [r["text"][:600] for r in rows if "<br />" in r["text"][:600]][:8]
    assert len(raw) == 8
    tok = gpt2_tokenizer(SHARED / "gpt2_tokenizer")
    ids = [tok(t)["input_ids"] for t in raw]
    prompt_ids, prompt_mask = utils.left_pad([i[:10] for i in ids], tok.eos_token_id)
    tails = [i[10:] for i in ids]
    completions = torch.full((len(tails), max(map(len, tails))), tok.eos_token_id)  # right-padded, as sampled
    mask = torch.zeros_like(completions, dtype=torch.bool)
    for row, tail in enumerate(tails):
        completions[row, : len(tail)], mask[row, : len(tail)] = torch.tensor(tail), True
    scored = []
    monkeypatch.setattr(
        utils, "score_texts", lambda model, rtok, texts, *a: scored.extend(texts) or torch.zeros(len(texts))
    )
    utils.make_reward_fn(None, None, tok, 8, 512)(prompt_ids, prompt_mask, completions, mask)
    assert scored == [utils.clean_review(t) for t in raw]
    assert not any("<br" in t for t in scored)
