"""Properties of sampling and log-probs: pure temperature sampling, masks, padding, the chain rule."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import sampling
import utils

TEMPERATURE = 0.8


def peaked_gpt2(make_gpt2, seed: int = 3, scale: float = 0.3):
    """An untied tiny GPT-2 whose output layer is large enough for a far-from-uniform next-token law."""
    model = make_gpt2(seed=seed, tie=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.lm_head.weight.copy_(scale * torch.randn(model.lm_head.weight.shape, generator=g))
    return model


@torch.no_grad()
def next_token_probs(model, prompt: list[int], temperature: float) -> torch.Tensor:
    """(V,) float64 softmax(logits / T) of the token after an unpadded prompt."""
    logits = model(torch.tensor([prompt])).logits[0, -1].double()
    return torch.softmax(logits / temperature, -1)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


# ------------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------------


def test_sampling_config_is_pure_temperature_sampling():
    """sampling_config asks for ancestral sampling at T with no top-k, top-p, penalty or minimum length."""
    gen = sampling.sampling_config(7, 0.9, eos_token_id=1, pad_token_id=1)
    assert gen.do_sample is True and gen.temperature == 0.9 and gen.max_new_tokens == 7
    assert gen.top_k in (0, None) and gen.top_p in (1.0, None)
    assert gen.repetition_penalty in (1.0, None) and gen.min_new_tokens in (0, None)
    assert gen.num_beams in (1, None)


def test_sample_completions_draws_from_the_plain_temperature_softmax(make_gpt2):
    """One-token samples follow softmax(logits / T) over the whole vocabulary, whatever the model's own
    generation_config says (greedy, top_k, top_p, repetition_penalty, min_new_tokens, another T)."""
    model = peaked_gpt2(make_gpt2)
    prompt = [3, 7, 9, 11, 7]
    p = next_token_probs(model, prompt, TEMPERATURE)
    eos = int(p.argmax())  # the likeliest token is EOS: min_new_tokens would suppress it
    gc = model.generation_config
    gc.do_sample, gc.top_k, gc.top_p, gc.temperature = False, 5, 0.5, 3.0
    gc.repetition_penalty, gc.min_new_tokens, gc.eos_token_id = 5.0, 2, eos
    saved = gc

    n = 8000
    ids = torch.tensor([prompt] * n)
    torch.manual_seed(0)
    comps, mask = sampling.sample_completions(
        model, ids, torch.ones_like(ids), max_new_tokens=1, temperature=TEMPERATURE, eos_token_id=eos
    )
    assert comps.shape == (n, 1) and mask.all()
    freq = torch.bincount(comps[:, 0], minlength=p.numel()).double() / n

    # sampling noise: E[TV] ~ 0.5 sum sqrt(2 p (1 - p) / (pi n)); allow three times that
    noise = 0.5 * float(torch.sqrt(2 * p * (1 - p) / (math.pi * n)).sum())
    assert total_variation(freq, p) < 3 * noise
    # tokens outside the top 5 are drawn, as often as their mass says
    outside = p.argsort(descending=True)[5:]
    assert freq[outside].sum().item() == pytest.approx(p[outside].sum().item(), abs=0.03)
    assert (freq[outside] > 0).sum() >= 5
    # power check: each distortion would move the law far beyond the noise allowance
    topk = torch.where(p >= p.sort(descending=True).values[4], p, 0.0)
    no_eos = p.clone()
    no_eos[eos] = 0
    untempered = next_token_probs(model, prompt, 1.0)
    for distorted in (topk / topk.sum(), no_eos / no_eos.sum(), untempered):
        assert total_variation(distorted, p) > 6 * noise
    # the model's own generation_config and mode are restored afterwards
    assert model.generation_config is saved and model.generation_config.top_k == 5
    assert not model.training


def test_left_padded_prompts_sample_from_their_unpadded_distribution(make_gpt2):
    """A short prompt left-padded beside a long one is sampled from its own unpadded next-token law."""
    model = peaked_gpt2(make_gpt2, seed=9)
    short, long = [12, 4, 30], [5, 6, 7, 8, 9, 10, 11, 13]
    p = next_token_probs(model, short, TEMPERATURE)
    n = 3000
    ids, pmask = utils.left_pad([short, long] * n, pad_id=EOS)
    torch.manual_seed(2)
    comps, _ = sampling.sample_completions(
        model, ids, pmask, max_new_tokens=1, temperature=TEMPERATURE, eos_token_id=EOS
    )
    freq = torch.bincount(comps[0::2, 0], minlength=p.numel()).double() / n
    noise = 0.5 * float(torch.sqrt(2 * p * (1 - p) / (math.pi * n)).sum())
    assert total_variation(freq, p) < 3 * noise
    # power check: positions counted from the padding (not the first real token) give another law
    with torch.no_grad():
        shifted_ids = torch.arange(ids.shape[1]).unsqueeze(0)
        shifted = model(ids[:1], attention_mask=pmask[:1], position_ids=shifted_ids).logits[0, -1].double()
    assert total_variation(torch.softmax(shifted / TEMPERATURE, -1), p) > 6 * noise


def test_sample_completions_restores_training_mode_and_masks_after_eos(make_gpt2):
    """A policy in train mode stays in train mode; the mask keeps tokens up to the first EOS only."""
    model = peaked_gpt2(make_gpt2, seed=4)
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    ids, pmask = utils.left_pad(prompts, pad_id=1)
    eos = int(next_token_probs(model, prompts[0], 1.0).argsort(descending=True)[1])  # frequent EOS
    model.train()
    torch.manual_seed(1)
    comps, mask = sampling.sample_completions(
        model, ids.repeat(20, 1), pmask.repeat(20, 1), max_new_tokens=6, temperature=1.0, eos_token_id=eos
    )
    assert model.training
    assert comps.shape[0] == 60 and comps.shape[1] <= 6 and mask.dtype == torch.bool
    assert torch.equal(mask, sampling.completion_mask(comps, eos))
    hit = (comps == eos).any(1)
    assert 0 < hit.sum() < 60  # some rows end early, some run to the cap
    for row, m in zip(comps, mask, strict=True):
        k = int(m.sum())
        if (row == eos).any():
            first = int((row == eos).nonzero()[0])
            assert k == first + 1 and (row[first:] == eos).all()  # generate pads finished rows with EOS
        else:
            assert k == comps.shape[1]


def test_sample_categorical_draws_the_softmax_law_and_never_a_zero_probability_token():
    """Inverse-CDF sampling gives softmax(logits) row by row: frequencies within sampling noise of the law,
    no token of probability 0 ever, each row its own law."""
    g = torch.Generator().manual_seed(0)
    logits = 2.0 * torch.randn(2, 40, generator=g)
    logits[0, ::3] = -math.inf  # a third of the vocabulary impossible in row 0
    n = 20000
    torch.manual_seed(5)
    draws = sampling.sample_categorical(logits.repeat(n, 1)).view(n, 2)
    for row in range(2):
        p = logits[row].double().softmax(-1)
        freq = torch.bincount(draws[:, row], minlength=40).double() / n
        noise = 0.5 * float(torch.sqrt(2 * p * (1 - p) / (math.pi * n)).sum())
        assert total_variation(freq, p) < 3 * noise, row
        other = logits[1 - row].double().softmax(-1)
        assert total_variation(other, p) > 6 * noise  # power: the other row's law is far outside the noise
    assert not draws[:, 0][(draws[:, 0] % 3) == 0].numel(), "a token of probability 0 was drawn"


def test_sample_categorical_gives_every_token_of_a_gpt2_sized_vocabulary_its_share(monkeypatch):
    """On GPT-2's 50,257 tokens with Zipf-like logits at T = 0.9, the uniform draws that give token k fill
    an interval of width p_k, its softmax probability (to 1e-3 of p_k): at both ends of that interval the
    sampler draws k. This holds for the thousands of tokens below half an ulp of a float32 running sum
    too (2.7e-4 of the mass here), which an inverse CDF accumulated in float32 can never draw."""
    vocab, n = 50257, 64
    g = torch.Generator().manual_seed(0)
    rank = torch.randperm(vocab, generator=g).double() + 1  # Zipf over a shuffled vocabulary, with noise
    logits = ((-1.5 * rank.log() + 0.5 * torch.randn(vocab, generator=g, dtype=torch.float64)) / 0.9).float()
    batch = logits.expand(4 * n, vocab)
    p = batch.softmax(-1)[0].double()  # the float32 softmax the sampler computes, (V,)
    exact = logits.double().softmax(-1)
    assert total_variation(p / p.sum(), exact) < 1e-6  # renormalised, the softmax up to float32 rounding
    upper = p.cumsum(0)  # token k is drawn for u * upper[-1] in [upper[k] - p[k], upper[k])
    # the premise: tokens that a float32 running sum skips (their step of its CDF is flat)
    cdf32 = batch.softmax(-1)[0].cumsum(0)
    tiny = torch.nonzero(torch.diff(cdf32, prepend=cdf32.new_zeros(1)) == 0).squeeze(1)
    assert len(tiny) > 10_000 and exact[tiny].sum() > 2e-4 and exact[tiny].max() < 1e-7
    # n of those and n tokens of any probability, each at both ends of its interval
    pick = torch.cat(
        [tiny[torch.randperm(len(tiny), generator=g)[:n]], torch.randperm(vocab, generator=g)[:n]]
    )
    ends = [upper[pick] - p[pick] * (1 - 1e-3), upper[pick] - p[pick] * 1e-3]
    u = torch.cat(ends) / upper[-1]

    def rand(*shape, dtype=None, device=None, **_):  # these uniforms, in the dtype the sampler asks for
        return u.to(dtype or torch.get_default_dtype()).view(*shape)

    monkeypatch.setattr(torch, "rand", rand)
    drawn = sampling.sample_categorical(batch)
    assert torch.equal(drawn, pick.repeat(2)), f"{int((drawn != pick.repeat(2)).sum())} of {4 * n} missed"


def test_the_kv_cache_loop_continues_like_generate(make_gpt2):
    """At a temperature so low that sampling is the argmax, the lean KV-cache loop writes exactly what
    `generate` writes greedily: same cache, positions of left-padded rows, EOS padding and early stop."""
    model = peaked_gpt2(make_gpt2, seed=6)
    prompts = [[5, 6, 7, 8, 9, 10], [12, 4], [30, 31, 32, 33], [7], [44, 3, 9]]
    ids, pmask = utils.left_pad(prompts, pad_id=1)
    with torch.no_grad():
        greedy = model.generate(
            input_ids=ids, attention_mask=pmask, do_sample=False, max_new_tokens=24, eos_token_id=2,
            pad_token_id=1,
        )[:, ids.shape[1] :]  # fmt: skip
    eos = int(torch.mode(greedy[:, 3]).values)  # a token some rows write early: they stop there
    with torch.no_grad():
        greedy = model.generate(
            input_ids=ids, attention_mask=pmask, do_sample=False, max_new_tokens=24, eos_token_id=eos,
            pad_token_id=1,
        )[:, ids.shape[1] :]  # fmt: skip
    ours, mask = sampling.sample_completions(
        model, ids, pmask, max_new_tokens=24, temperature=1e-6, eos_token_id=eos, pad_token_id=1
    )
    assert torch.equal(ours, greedy)
    assert (ours == eos).any(1).sum() > 0 and mask.sum() < mask.numel()  # some rows finished early


def test_the_compiled_loop_draws_what_the_eager_loop_draws(make_gpt2):
    """`compiled=True` (a fixed-size cache, one compiled step) draws the eager loop's tokens from the same
    seed: left padding, EOS padding and the early stop included; a second call of the same shape reuses
    the kept cache without compiling again, and sees none of the first call's keys."""
    from torch._dynamo.utils import counters

    model = peaked_gpt2(make_gpt2, seed=6)
    prompts = [[5, 6, 7, 8, 9, 10], [12, 4], [30, 31, 32, 33], [7], [44, 3, 9], [8, 8]]
    ids, pmask = utils.left_pad(prompts, pad_id=1)
    eos = int(next_token_probs(model, prompts[0], 1.0).argsort(descending=True)[2])  # some rows stop early

    def draw(ids, compiled):
        torch.manual_seed(11)
        return sampling.sample_completions(
            model, ids, pmask, max_new_tokens=20, temperature=1.0, eos_token_id=eos, compiled=compiled
        )

    eager, eager_mask = draw(ids, compiled=False)
    ours, mask = draw(ids, compiled=True)
    assert torch.equal(ours, eager) and torch.equal(mask, eager_mask)
    assert 0 < (ours == eos).any(1).sum() < len(prompts)  # some rows finished early, some ran on
    graphs = counters["stats"]["unique_graphs"]
    other, _ = utils.left_pad([[t + 3 for t in p] for p in prompts], pad_id=1)  # new prompts, same mask
    again, _ = draw(other, compiled=True)
    assert torch.equal(again, draw(other, compiled=False)[0])
    assert counters["stats"]["unique_graphs"] == graphs  # the same shape: no new compilation


def test_completion_mask_up_to_and_including_first_eos():
    """completion_mask is True up to and including the first EOS and False after it."""
    eos = 2
    comps = torch.tensor([[5, eos, 7, eos], [eos, 4, 4, 4], [3, 4, 5, 6], [3, 4, 5, eos]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(sampling.completion_mask(comps, eos), expected)


# ------------------------------------------------------------------------------------------------------
# Log-probs
# ------------------------------------------------------------------------------------------------------

EOS = 1
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
# completions as generate returns them (EOS, then padding = EOS), plus one with junk after its EOS
COMPLETIONS = torch.tensor([[20, 21, EOS, EOS, EOS], [22, 23, 24, 25, 26], [EOS, 30, 31, 32, 33]])


@torch.no_grad()
def loop_logprob(model, prompt: list[int], completion: list[int], temperature: float) -> float:
    """log pi(y | x) by the chain rule: one unpadded forward pass per token, up to the first EOS."""
    total = 0.0
    for t, tok in enumerate(completion):
        logits = model(torch.tensor([prompt + completion[:t]])).logits[0, -1].double()
        total += float(torch.log_softmax(logits / temperature, -1)[tok])
        if tok == EOS:
            break
    return total


def batch_logprob(model, temperature: float) -> torch.Tensor:
    ids, pmask = utils.left_pad(PROMPTS, pad_id=EOS)
    logits = utils.completion_logits(model, ids, pmask, COMPLETIONS, temperature)
    mask = sampling.completion_mask(COMPLETIONS, EOS)
    return utils.masked_sum(utils.token_logprobs(logits, COMPLETIONS), mask)


def test_sequence_logprob_is_the_chain_rule_at_the_same_temperature(make_gpt2):
    """Masked sum of token log-probs = log pi(y|x) by a per-step loop; prompt tokens and post-EOS excluded."""
    model = make_gpt2(seed=5)
    got = batch_logprob(model, TEMPERATURE)
    assert got.shape == (len(PROMPTS),) and got.dtype == torch.float32
    for i, prompt in enumerate(PROMPTS):
        expected = loop_logprob(model, prompt, COMPLETIONS[i].tolist(), TEMPERATURE)
        assert got[i].item() == pytest.approx(expected, abs=1e-4)
    # another temperature is another distribution: the numbers must move
    other = batch_logprob(model, 1.0)
    assert (other - got).abs().min() > 1e-3


def test_completion_logits_shape_and_alignment(make_gpt2):
    """completion_logits returns (B, L, V) at temperature T: row t predicts completion token t."""
    model = make_gpt2(seed=6)
    prompt, comp = [4, 5, 6], torch.tensor([[7, 8, 9]])
    logits = utils.completion_logits(
        model, torch.tensor([prompt]), torch.ones(1, 3, dtype=torch.long), comp, 0.5
    )
    assert logits.shape == (1, 3, model.config.vocab_size) and logits.dtype == torch.float32
    with torch.no_grad():
        full = model(torch.tensor([prompt + [7, 8, 9]])).logits[0]  # (P+L, V)
    torch.testing.assert_close(logits[0], full[2:5] / 0.5, rtol=1e-5, atol=1e-5)


def test_left_padded_batch_gives_the_numbers_of_each_row_alone(make_gpt2):
    """Logits and token log-probs of a left-padded batch equal those of each row run alone, unpadded."""
    model = make_gpt2(seed=7)
    ids, pmask = utils.left_pad(PROMPTS, pad_id=EOS)
    batch = utils.completion_logits(model, ids, pmask, COMPLETIONS, TEMPERATURE)
    batch_lp = utils.token_logprobs(batch, COMPLETIONS)
    for i, prompt in enumerate(PROMPTS):
        alone_ids = torch.tensor([prompt])
        alone = utils.completion_logits(
            model, alone_ids, torch.ones_like(alone_ids), COMPLETIONS[i : i + 1], TEMPERATURE
        )
        torch.testing.assert_close(batch[i], alone[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            batch_lp[i], utils.token_logprobs(alone, COMPLETIONS[i : i + 1])[0], atol=1e-5, rtol=0
        )


def test_token_logprobs_are_gathered_log_softmax():
    """token_logprobs picks log softmax(logits)[token] at each position; they exponentiate to <= 1."""
    torch.manual_seed(8)
    logits = torch.randn(2, 3, 7)
    tokens = torch.randint(0, 7, (2, 3))
    lp = utils.token_logprobs(logits, tokens)
    for b in range(2):
        for t in range(3):
            assert lp[b, t].item() == pytest.approx(
                torch.log_softmax(logits[b, t], -1)[tokens[b, t]].item(), abs=1e-6
            )
    assert (lp <= 0).all()


def test_masked_sum_mean_and_entropy():
    """masked_sum/mean ignore masked positions; entropy is log V for uniform logits and ~0 for one-hot."""
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert utils.masked_sum(x, mask).tolist() == [3.0, 3.0]
    assert utils.masked_mean(x, mask).item() == pytest.approx(2.0)
    assert utils.masked_mean(x, torch.zeros_like(mask)).item() == 0.0  # no NaN on an empty mask
    logits = torch.stack([torch.zeros(5), torch.tensor([100.0, 0, 0, 0, 0])])[None]  # (1, 2, 5)
    ent = utils.token_logprobs_and_entropy(logits, torch.zeros(1, 2, dtype=torch.long))[1][0]
    assert ent[0].item() == pytest.approx(math.log(5)) and ent[1].item() == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------------------------------
# Mixed precision: the log-probs the loss uses are those of the law that sampled
# ------------------------------------------------------------------------------------------------------


def gpt2_logit_scale(model, offset: float = -64.0):
    """An untied tiny GPT-2 with every logit shifted by `offset`, as GPT-2's own sit around -55 to -75: one
    hidden unit is the constant 8 after the final layer norm and every token's output embedding is
    offset / 8 there. Softmax ignores the shift; bf16 rounds logits of that size to 0.25-0.5."""
    with torch.no_grad():
        model.transformer.ln_f.weight[-1] = 0.0
        model.transformer.ln_f.bias[-1] = 8.0
        model.lm_head.weight[:, :-1] *= 10  # a peaked next-token law, as a trained LM has
        model.lm_head.weight[:, -1] = offset / 8.0
    return model


BF16_PROMPTS = [[5, 6, 7, 8, 9], [12, 4], [30, 31, 32], [7, 3, 3, 9, 2]] * 4


@pytest.mark.parametrize("compiled", [False, True])
def test_under_bf16_the_scorer_gives_the_samplers_log_prob_of_each_drawn_token(
    make_gpt2, monkeypatch, compiled
):
    """Under bf16 autocast (the default on Ampere and newer) the sampler's log-prob of each token it drew
    and the log-prob pass's (the loss, the KL) agree up to the rounding of the bf16 body, whose cached and
    full passes differ by ~0.002 nats here: the LM head and the log-softmax run in float32 in both. A bf16
    head rounds GPT-2-sized logits by 0.25-0.5 and the two passes differ by ~0.27 nats here."""
    model = gpt2_logit_scale(make_gpt2(seed=5, tie=False))
    seen = []
    draw = sampling.sample_categorical
    monkeypatch.setattr(sampling, "sample_categorical", lambda logits: seen.append(logits) or draw(logits))
    ids, pmask = utils.left_pad(BF16_PROMPTS, pad_id=1)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        completions, mask = sampling.sample_completions(
            model, ids, pmask, max_new_tokens=12, temperature=0.9, eos_token_id=1, compiled=compiled
        )
        scored = utils.token_logprobs(
            utils.completion_logits(model, ids, pmask, completions, 0.9), completions
        )
    sampled = torch.stack([s.log_softmax(-1) for s in seen], 1).gather(2, completions[..., None])[..., 0]
    assert all(s.dtype == torch.float32 for s in seen) and scored.dtype == torch.float32
    assert ((sampled - scored) * mask).abs().max().item() < 0.01


def test_under_bf16_log_probs_and_the_kl_to_a_near_anchor_keep_their_float32_values(make_gpt2):
    """At GPT-2's logit scale a bf16 LM head moves log-probs by up to 0.3 nats and turns the KL to an anchor
    whose logits differ by ~0.01 into noise of the wrong sign; with the head and the log-softmax in
    float32 only the body's bf16 rounding is left: log-probs within 0.02 of float32's, the KL within 5%."""
    model = gpt2_logit_scale(make_gpt2(seed=5, tie=False))
    anchor = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a nearby anchor: logit gaps of about 0.01
        anchor.lm_head.weight[:, :-1] += 0.002 * torch.randn(anchor.lm_head.weight[:, :-1].shape, generator=g)
    ids, pmask = utils.left_pad(BF16_PROMPTS * 2, pad_id=1)
    torch.manual_seed(2)  # the k1 estimate of a KL of ~1e-3 on 32 rows takes either sign: these draws' is > 0
    y, mask = sampling.sample_completions(
        model, ids, pmask, max_new_tokens=12, temperature=0.9, eos_token_id=1
    )

    def logprobs_and_kl(bf16: bool):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logp = utils.token_logprobs(utils.completion_logits(model, ids, pmask, y, 0.9), y)
            ref = utils.token_logprobs(utils.completion_logits(anchor, ids, pmask, y, 0.9), y)
        return logp, utils.kl_k1(logp, ref, mask).mean().item()

    (logp32, kl32), (logp16, kl16) = logprobs_and_kl(False), logprobs_and_kl(True)
    assert ((logp16 - logp32) * mask).abs().max().item() < 0.02
    assert kl16 == pytest.approx(kl32, rel=0.05) and kl32 > 0


def test_the_logits_the_sampler_returns_are_those_that_drew_each_token(make_gpt2):
    """`return_logits=True` gives the (B, L, V) logits / T that drew each token: the sampler's softmax, and in
    float32 the numbers of `utils.completion_logits`' full pass wherever the mask counts, so that the
    evaluation's KL can use them instead of a second pass of the policy."""
    model = peaked_gpt2(make_gpt2)
    seen = []
    draw = sampling.sample_categorical
    ids, pmask = utils.left_pad(BF16_PROMPTS, pad_id=1)
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sampling, "sample_categorical", lambda logits: seen.append(logits) or draw(logits))
        completions, mask, logits = sampling.sample_completions(
            model, ids, pmask, max_new_tokens=12, temperature=0.9, eos_token_id=1, return_logits=True
        )
    torch.manual_seed(0)
    again, _ = sampling.sample_completions(
        model, ids, pmask, max_new_tokens=12, temperature=0.9, eos_token_id=1
    )
    assert torch.equal(again, completions)  # keeping the logits changes no draw
    assert logits.shape == (*completions.shape, model.config.vocab_size) and logits.dtype == torch.float32
    assert torch.equal(logits, torch.stack(seen, 1))
    full = utils.completion_logits(model, ids, pmask, completions, 0.9)
    assert mask.sum() < mask.numel()  # some rows ended early: their padding is not compared
    assert ((logits - full).abs().amax(-1) * mask).max().item() < 1e-4
