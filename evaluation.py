"""Evaluation shared by 03 and 04 (and 02's quick check): held-out prompts, reward with 95% intervals,
KL(pi || pi_sft) on the policy's own samples (exact per-position and k1), distinct-n, perplexity under a
reference LM that RL never touched, and the points of WARP's Pareto front. Every model is sampled with the
same prompts and seed, so two models' differences are paired by prompt (`paired_diff`, `matched_kl_diff`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from config import EvalConfig
from sampling import sample_completions
from utils import (
    completion_logits,
    decode_texts,
    kl_exact,
    kl_k1,
    left_pad,
    liti,
    load_reviews,
    load_state,
    masked_sum,
    model_device,
    token_logprobs,
)


def trained_from(warp_dir: str | Path, defaults: dict[str, str]) -> dict[str, str]:
    """`sft` and `data` that a WARP output was trained from (its config.json), so that KL is measured
    against the policy it started from; `defaults` (the preset's) where unrecorded or where a recorded
    local folder no longer exists (e.g. trained on another machine)."""
    path = Path(warp_dir) / "config.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    out = {}
    for key in ("sft", "data"):
        value = saved.get(key) or defaults[key]
        out[key] = defaults[key] if Path(value).is_absolute() and not Path(value).exists() else value
    return out


def eval_prompts(data: str, tokenizer, n_prompts: int, prompt_tokens: int, seed: int = 0):
    """A fixed set of test prompts: `n_prompts` test reviews (seeded, balanced by label) cut to N tokens.

    Returns (token lists, labels, full review texts).
    """
    ds = load_reviews(data, "test").shuffle(seed=seed)
    rows, labels, texts = [], [], []
    per_label = {0: (n_prompts + 1) // 2, 1: n_prompts // 2}
    for text, label in zip(ds["text"], ds["label"], strict=True):
        if per_label.get(label, 0) == 0:
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= prompt_tokens:
            rows.append(ids[:prompt_tokens])
            labels.append(label)
            texts.append(text)
            per_label[label] -= 1
        if not any(per_label.values()):
            break
    return rows, labels, texts


def mean_ci(values: Sequence[float], z: float = 1.96) -> tuple[float, float]:
    """Mean and half-width of its normal-approximation 95% confidence interval."""
    t = torch.tensor(list(values), dtype=torch.float64)
    if len(t) < 2:
        return float(t.mean()) if len(t) else float("nan"), float("nan")
    return t.mean().item(), z * t.std(unbiased=True).item() / math.sqrt(len(t))


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n: unique word n-grams / all word n-grams over a set of texts (1 = no repetition)."""
    grams = [tuple(w[i : i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def paired_diff(a, b, col: str = "score") -> tuple[float, float]:
    """Mean over prompts of b - a in `col` and the half-width of its paired 95% interval.

    `a` and `b` are `sample_and_score` tables of two models on the same prompts with the same sampling
    seed: each prompt's mean difference is one paired observation, so what the prompts share (how easy a
    prompt is) cancels, and the interval is that of the difference, not of either model.
    """
    pa, pb = a.groupby("prompt")[col].mean(), b.groupby("prompt")[col].mean()
    if not pa.index.equals(pb.index):
        raise ValueError("paired_diff needs both models evaluated on the same prompts")
    return mean_ci((pb - pa).tolist())


def matched_kl_diff(front: Sequence, other, col: str = "score") -> tuple[float, float, float]:
    """`other` minus a front at `other`'s mean KL, paired by prompt: (difference, 95% half-width, eta).

    `front` is a list of `sample_and_score` tables along a curve of increasing KL (e.g. WARP's
    (1 - eta) * theta_sft + eta * theta_slerp). The front's value at `other`'s KL is the per-prompt linear
    interpolation between the two points whose mean KLs bracket it; outside the front's range the
    difference is NaN (no extrapolation). The third value is where on the front (in list index units) the
    match fell.
    """
    kls = [float(t["kl"].mean()) for t in front]
    if any(b < a for a, b in zip(kls, kls[1:], strict=False)):
        raise ValueError(f"front must be sorted by KL, got {[round(k, 3) for k in kls]}")
    target = float(other["kl"].mean())
    for i in range(len(front) - 1):
        if kls[i] <= target <= kls[i + 1]:
            w = (target - kls[i]) / (kls[i + 1] - kls[i]) if kls[i + 1] > kls[i] else 0.0
            lo, hi = front[i].groupby("prompt")[col].mean(), front[i + 1].groupby("prompt")[col].mean()
            mine = other.groupby("prompt")[col].mean()
            if not (lo.index.equals(mine.index) and hi.index.equals(mine.index)):
                raise ValueError("matched_kl_diff needs every model evaluated on the same prompts")
            mean, ci = mean_ci((mine - ((1 - w) * lo + w * hi)).tolist())
            return mean, ci, i + w
    return float("nan"), float("nan"), float("nan")


@torch.no_grad()
def sample_and_score(
    policy: nn.Module,
    sft: nn.Module | None,
    tokenizer,
    reward_fn,
    prompt_rows: list[list[int]],
    *,
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float,
    batch_size: int = 64,
    reference: nn.Module | None = None,
    compiled: bool = False,
    gold=None,
):
    """Completions of each prompt sampled from `policy`, with reward and KL(policy || sft) per sample
    (`sft=None`: no KL, and no pass of the SFT).

    KL is estimated on the policy's own samples, at the sampling temperature, from the logits that drew
    them (kept by the sampler) and one pass of the SFT, two ways: `kl` is the exact per-position KL over
    the vocabulary summed along the sequence (low variance, >= 0), `kl_k1` the sum of log-ratios of the
    sampled tokens. With a `reference` LM (same tokenizer, never trained by
    RL), `ref_nll` is the completion's mean negative log-likelihood per token under it at temperature 1:
    fluency, so that reward bought with broken text shows. With `gold` (text -> float, a judge the reward
    model never learnt from, e.g. the offline corpus's lexicon), `gold` is its score of the text, so that
    reward-model over-optimisation shows (reward up, gold flat or down). `compiled`: sample with the
    compiled decode step (`sampling.sample_completions`). Returns a pandas DataFrame, one row per sample.
    """
    import pandas as pd

    device = model_device(policy)
    jobs = [(p, s) for p in range(len(prompt_rows)) for s in range(samples_per_prompt)]
    records = []
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i : i + batch_size]
        prompt_ids, prompt_mask = left_pad([prompt_rows[p] for p, _ in chunk], tokenizer.pad_token_id)
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        completions, mask, *drew = sample_completions(
            policy, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, temperature=temperature,
            eos_token_id=tokenizer.eos_token_id, compiled=compiled, return_logits=sft is not None,
        )  # fmt: skip
        kl = k1 = None
        if sft is not None:  # KL(pi || pi_sft): the logits that drew each token, and one pass of the SFT
            logits = drew[0]
            ref_logits = completion_logits(
                sft, prompt_ids, prompt_mask, completions.to(model_device(sft)), temperature
            )
            ref_logits = ref_logits.to(device)
            kl = kl_exact(logits, ref_logits, mask)
            k1 = kl_k1(token_logprobs(logits, completions), token_logprobs(ref_logits, completions), mask)
        scores = reward_fn(prompt_ids, prompt_mask, completions, mask)
        ref_nll = None
        if reference is not None:  # mean NLL per completion token, at temperature 1
            on = model_device(reference)
            ids, pmask, comps, m = (t.to(on) for t in (prompt_ids, prompt_mask, completions, mask))
            logp = token_logprobs(completion_logits(reference, ids, pmask, comps, 1.0), comps)
            ref_nll = (-masked_sum(logp, m) / m.sum(1).clamp(min=1)).cpu()
        texts = decode_texts(tokenizer, prompt_ids, prompt_mask, completions, mask)
        empty = torch.zeros_like(prompt_ids)
        only_completion = decode_texts(tokenizer, empty, torch.zeros_like(prompt_mask), completions, mask)
        for j, (p, s) in enumerate(chunk):
            records.append(
                dict(
                    prompt=p,
                    sample=s,
                    text=texts[j],
                    completion=only_completion[j],
                    score=scores[j].item(),
                    **({} if kl is None else {"kl": kl[j].item(), "kl_k1": k1[j].item()}),
                    length=int(mask[j].sum()),
                    **({} if ref_nll is None else {"ref_nll": ref_nll[j].item()}),
                    **({} if gold is None else {"gold": gold(texts[j])}),
                )  # fmt: skip
            )
    return pd.DataFrame.from_records(records)


def summarise(samples, labels: Sequence[int]) -> dict[str, float]:
    """Headline figures of `sample_and_score`'s table: reward and KL with 95% CIs over prompts, by prompt
    sentiment too, and distinct-1/2 of the completions."""
    df = samples.assign(label=[labels[p] for p in samples["prompt"]])
    out: dict[str, float] = {}
    for name, part in (("all", df), ("positive", df[df.label == 1]), ("negative", df[df.label == 0])):
        cols = ["score", "kl", "kl_k1"] + ["gold"] * ("gold" in df)
        per_prompt = part.groupby("prompt")[cols].mean()  # samples of a prompt correlate
        for col in cols:
            mean, ci = mean_ci(per_prompt[col].tolist())
            suffix = "" if name == "all" else f"/{name}"
            out[f"{col}{suffix}"], out[f"{col}_ci95{suffix}"] = mean, ci
    if "ref_nll" in df:  # perplexity per token under the reference LM, over all completion tokens
        out["ref_ppl"] = math.exp(float((df["ref_nll"] * df["length"]).sum() / df["length"].sum()))
    out["distinct-1"] = distinct_n(df["completion"].tolist(), 1)
    out["distinct-2"] = distinct_n(df["completion"].tolist(), 2)
    out["length"] = float(df["length"].mean())
    return out


def evaluate(model, sft, tokenizer, reward_fn, rows, labels, cfg: EvalConfig, reference=None, gold=None):
    """Sample `cfg.samples_per_prompt` completions per prompt from `model` with a fixed seed; return
    (headline dict from `summarise`, per-sample DataFrame). Same seed for every model compared; with a
    `reference` LM the completions' perplexity under it too, with `gold` a gold reward beside the score."""
    torch.manual_seed(cfg.seed)
    samples = sample_and_score(
        model, sft, tokenizer, reward_fn, rows, samples_per_prompt=cfg.samples_per_prompt,
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, batch_size=cfg.batch_size,
        reference=reference, compiled=cfg.compile_generation, gold=gold,
    )  # fmt: skip
    return summarise(samples, labels), samples


def interpolate_policy(model: nn.Module, sft_state: dict[str, Tensor], target: dict[str, Tensor], eta: float):
    """Load (1 - eta) * theta_sft + eta * theta_target into `model` (a point of WARP's Pareto front)."""
    load_state(model, liti(sft_state, target, eta))
    return model
