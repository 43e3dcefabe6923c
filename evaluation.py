"""Evaluation shared by 03 and 04 (and 02's quick check): held-out prompts, reward with 95% intervals,
KL(pi || pi_sft) on the policy's own samples (exact per-position and k1), distinct-n, and the points of
WARP's Pareto front. Every model is sampled with the same prompts and seed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from config import EvalConfig
from utils import (
    completion_logits,
    decode_texts,
    kl_exact,
    kl_k1,
    left_pad,
    liti,
    load_reviews,
    load_state,
    model_device,
    sample_completions,
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


@torch.no_grad()
def sample_and_score(
    policy: nn.Module,
    sft: nn.Module,
    tokenizer,
    reward_fn,
    prompt_rows: list[list[int]],
    *,
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float,
    batch_size: int = 64,
):
    """Completions of each prompt sampled from `policy`, with reward and KL(policy || sft) per sample.

    KL is estimated on the policy's own samples, at the sampling temperature, two ways: `kl` is the
    exact per-position KL over the vocabulary summed along the sequence (low variance, >= 0), `kl_k1`
    the sum of log-ratios of the sampled tokens. Returns a pandas DataFrame, one row per sample.
    """
    import pandas as pd

    device = model_device(policy)
    jobs = [(p, s) for p in range(len(prompt_rows)) for s in range(samples_per_prompt)]
    records = []
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i : i + batch_size]
        prompt_ids, prompt_mask = left_pad([prompt_rows[p] for p, _ in chunk], tokenizer.pad_token_id)
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        completions, mask = sample_completions(
            policy, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, temperature=temperature,
            eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        logits = completion_logits(policy, prompt_ids, prompt_mask, completions, temperature)
        ref_logits = completion_logits(
            sft, prompt_ids, prompt_mask, completions.to(model_device(sft)), temperature
        )
        ref_logits = ref_logits.to(device)
        kl = kl_exact(logits, ref_logits, mask)
        k1 = kl_k1(token_logprobs(logits, completions), token_logprobs(ref_logits, completions), mask)
        scores = reward_fn(prompt_ids, prompt_mask, completions, mask)
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
                    kl=kl[j].item(),
                    kl_k1=k1[j].item(),
                    length=int(mask[j].sum()),
                )  # fmt: skip
            )
    return pd.DataFrame.from_records(records)


def summarise(samples, labels: Sequence[int]) -> dict[str, float]:
    """Headline figures of `sample_and_score`'s table: reward and KL with 95% CIs over prompts, by prompt
    sentiment too, and distinct-1/2 of the completions."""
    df = samples.assign(label=[labels[p] for p in samples["prompt"]])
    out: dict[str, float] = {}
    for name, part in (("all", df), ("positive", df[df.label == 1]), ("negative", df[df.label == 0])):
        per_prompt = part.groupby("prompt")[["score", "kl", "kl_k1"]].mean()  # samples of a prompt correlate
        for col in ("score", "kl", "kl_k1"):
            mean, ci = mean_ci(per_prompt[col].tolist())
            suffix = "" if name == "all" else f"/{name}"
            out[f"{col}{suffix}"], out[f"{col}_ci95{suffix}"] = mean, ci
    out["distinct-1"] = distinct_n(df["completion"].tolist(), 1)
    out["distinct-2"] = distinct_n(df["completion"].tolist(), 2)
    out["length"] = float(df["length"].mean())
    return out


def evaluate(model, sft, tokenizer, reward_fn, rows, labels, cfg: EvalConfig):
    """Sample `cfg.samples_per_prompt` completions per prompt from `model` with a fixed seed; return
    (headline dict from `summarise`, per-sample DataFrame). Same seed for every model compared."""
    torch.manual_seed(cfg.seed)
    samples = sample_and_score(
        model, sft, tokenizer, reward_fn, rows, samples_per_prompt=cfg.samples_per_prompt,
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, batch_size=cfg.batch_size,
    )  # fmt: skip
    return summarise(samples, labels), samples


def interpolate_policy(model: nn.Module, sft_state: dict[str, Tensor], target: dict[str, Tensor], eta: float):
    """Load (1 - eta) * theta_sft + eta * theta_target into `model` (a point of WARP's Pareto front)."""
    load_state(model, liti(sft_state, target, eta))
    return model
