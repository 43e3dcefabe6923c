"""Sampling completions from a causal LM with a KV cache: Alg. 1, line 6 (y ~ pi_theta(.|x)).

Plain ancestral sampling from softmax(logits / T) over the whole vocabulary, with no top-k, top-p,
penalty or minimum length. Two decode loops give the same law: the default one grows a dynamic KV cache
and calls the model from Python for each token; `compiled=True` decodes with a fixed-size cache and a
`torch.compile`d step of one shape, which on a GPU replays one CUDA graph per token instead of launching
hundreds of small kernels (GPT-2 small at 32 rows is bound by those launches, not by the GPU).
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from utils import lm_logits

_CACHE_ROUND = 32  # the compiled loop's cache length is rounded up to this: few shapes, few compilations
_COMPILED: dict[str, object] = {}  # the compiled decode step, one per device type


def sampling_config(max_new_tokens: int, temperature: float, eos_token_id: int, pad_token_id: int):
    """The `generate` settings that match `sample_completions`: ancestral sampling at `temperature` with no
    top-k, top-p, penalty or minimum length (for calling `generate` yourself, e.g. to compare)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )  # fmt: skip


def sample_categorical(logits: Tensor) -> Tensor:
    """(B,) one draw from softmax(logits) per row of (B, V) logits, by inverting the cumulative
    distribution at a uniform draw; on the CPU 20-40x faster than `torch.multinomial`.

    Exact in this sense: token k is drawn with the probability p_k that the (float32) softmax gives it, up
    to the float64 rounding of the running sum (~1e-16 per token); p_k is softmax(logits)_k up to float32
    rounding (relative ~1e-6). The running sum and the uniform draw are float64 because in float32 a token
    below half an ulp of the sum before it (3e-8 near 1) could never be drawn: on GPT-2's 50,257 tokens
    that is up to 3e-4 of the mass, and every other token's share is rounded (3-5e-4 in total variation).
    A token of zero probability is never drawn (`right=True` skips a flat step of the CDF)."""
    cdf = logits.softmax(-1).double().cumsum_(-1)  # (B, V) float64; only the sum and the search cost more
    u = torch.rand(logits.shape[0], 1, device=logits.device, dtype=torch.float64) * cdf[:, -1:]  # cdf[-1] ~ 1
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=logits.shape[1] - 1)


@torch.no_grad()
def sample_completions(
    policy: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int, temperature: float,
    eos_token_id: int, pad_token_id: int | None = None, compiled: bool = False, return_logits: bool = False,
) -> tuple[Tensor, ...]:  # fmt: skip
    """Sample completions of left-padded prompts; return (B, L) completion ids and (B, L) mask, and with
    `return_logits` the (B, L, V) float32 logits / T that drew each token (what `utils.completion_logits`
    computes in a second pass, so that KL on the policy's own samples needs no extra pass).

    Plain ancestral sampling from softmax(logits / T) over the whole vocabulary with a KV cache, whatever
    the model's own generation_config says; it stops as soon as every row has produced EOS. Finished rows
    are padded (with EOS unless `pad_token_id`), and the mask keeps tokens up to and including the first
    EOS: padding was never sampled, so it must not count in log-probs, KL or the loss. It samples from
    the law of `generate(**sampling_config(...))` without its per-token machinery (logits processors,
    stopping criteria, `torch.multinomial`), which dominates the time of small models.

    `compiled=True` runs each decode step as one compiled graph over a fixed-size cache (kept on the
    policy and reused by the next call of the same shape): the same draws up to the compiler's rounding,
    after a one-off compilation (tens of seconds) per batch shape.
    """
    pad = eos_token_id if pad_token_id is None else pad_token_id
    n_rows, n_prompt = prompt_ids.shape
    length = n_prompt + max_new_tokens
    if compiled:
        length = -(-length // _CACHE_ROUND) * _CACHE_ROUND
    # the attention mask of every position the loop can reach: the prompts', then ones; the positions
    # count from each row's first real token, as `generate` does, so a padded row samples as it would alone
    ones = prompt_mask.new_ones(n_rows, length - n_prompt, dtype=torch.long)
    mask = torch.cat([prompt_mask.long(), ones], 1)
    position = (mask.cumsum(1) - 1).clamp(min=0)
    slots = torch.arange(length, device=prompt_ids.device)  # where each position's keys go in the cache
    cache = _static_cache(policy, n_rows, length, prompt_ids.device.type) if compiled else _dynamic_cache()
    # the KV cache argument is `cache` from transformers 5.x on, `past_key_values` before
    body = inspect.signature(policy.base_model.forward).parameters
    cache = {"cache" if "cache" in body else "past_key_values": cache}
    step = _compiled_step(prompt_ids.device.type) if compiled else _next_logits
    was_training = policy.training
    policy.eval()  # no dropout while sampling
    try:
        logits = _next_logits(
            policy, prompt_ids, mask[:, :n_prompt], position[:, :n_prompt], slots[:n_prompt], cache
        )
        finished = torch.zeros(n_rows, dtype=torch.bool, device=prompt_ids.device)
        tokens, drew = [], None
        if return_logits:
            drew = logits.new_empty(n_rows, max_new_tokens, logits.shape[-1], dtype=torch.float32)
        for t in range(n_prompt, n_prompt + max_new_tokens):
            scaled = logits.float() / temperature
            token = sample_categorical(scaled).masked_fill(finished, pad)
            if drew is not None:
                drew[:, len(tokens)] = scaled
            tokens.append(token)
            finished |= token == eos_token_id
            if t == n_prompt + max_new_tokens - 1 or bool(finished.all()):
                break
            # the static cache attends over its whole (fixed) length: causality hides the unwritten part
            seen = mask if compiled else mask[:, : t + 1]
            logits = step(policy, token[:, None], seen, position[:, t : t + 1], slots[t : t + 1], cache)
    finally:
        policy.train(was_training)
    completions = torch.stack(tokens, 1)
    mask = completion_mask(completions, eos_token_id)
    return (completions, mask) if drew is None else (completions, mask, drew[:, : len(tokens)])


def completion_mask(completions: Tensor, eos_token_id: int) -> Tensor:
    """(B, L) bool: True up to and including the first EOS of each row."""
    is_eos = completions == eos_token_id
    after_first_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    return ~after_first_eos


def _next_logits(
    policy: nn.Module, ids: Tensor, mask: Tensor, position: Tensor, slots: Tensor, cache: dict
) -> Tensor:
    """(B, V) logits after the last of `ids` (at `position`); their keys and values go to the KV cache
    (`cache`: the model's argument name -> the cache) at `slots`."""
    logits = lm_logits(policy, 1, input_ids=ids, attention_mask=mask, position_ids=position,
                       cache_position=slots, use_cache=True, **cache)  # fmt: skip
    return logits[:, -1]  # float32: the head runs in float32 whatever the autocast, as in the log-prob passes


def _dynamic_cache():
    from transformers import DynamicCache

    return DynamicCache()


def _static_cache(policy: nn.Module, n_rows: int, length: int, device_type: str):
    """A fixed-size KV cache for `policy`, kept on it and reset for the next call of the same shape and
    dtype: a compiled step (a CUDA graph on a GPU) reads its tensors where it found them the first time."""
    from transformers import StaticCache

    on = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if on else None
    key = (n_rows, length, dtype)
    kept = policy.__dict__.get("_sampling_cache")
    if kept is not None and kept[0] == key:
        kept[1].reset()
        return kept[1]
    cache = StaticCache(config=policy.config, max_cache_len=length)
    policy.__dict__["_sampling_cache"] = (key, cache)
    return cache


def _compiled_step(device_type: str):
    """`_next_logits` compiled for one shape: CUDA graphs on a GPU ("reduce-overhead"), fused kernels else."""
    if device_type not in _COMPILED:
        mode = "reduce-overhead" if device_type == "cuda" else None
        _COMPILED[device_type] = torch.compile(_next_logits, mode=mode, dynamic=False)
    return _COMPILED[device_type]
