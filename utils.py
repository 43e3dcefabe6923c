"""The small shared toolbox of the WARP series: data, models, log-probs, reward scoring, KL estimators,
and weight merging (EMA anchor, SLERP of task vectors, LITI).

Pure functions with no hidden state: nothing here prints, writes files, guesses a device or reads a
global; callers pass the models, tensors and settings a function needs. The algorithm that puts these
together is `warp.py`; sampling is `sampling.py`; a merge's angles and norm ratios are in `geometry.py`;
configs in `config.py`; files and the Hub in `checkpoints.py`; runs in `runs.py`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

# --- Data ---------------------------------------------------------------------------------------------

_HTML_BREAK = re.compile(r"<br\s*/?>", flags=re.IGNORECASE)


def clean_review(text: str) -> str:
    """IMDb reviews carry HTML line breaks and escaped quotes; turn them into plain text. The one cleaning
    of the series: 01 trains on reviews cleaned by it (`load_reviews`) and r(x, y) scores text cleaned by
    it (`make_reward_fn`)."""
    text = _HTML_BREAK.sub(" ", text).replace('\\"', '"')
    return re.sub(r"\s+", " ", text).strip()


def load_reviews(source: str, split: str):
    """One split of a review set in IMDb's format (`text`, `label`): Hub id, local file or folder."""
    from datasets import load_dataset, load_from_disk

    path = Path(source)
    if path.is_dir() and (path / "dataset_dict.json").exists():
        ds = load_from_disk(str(path))[split]
    elif path.exists():
        files = {p.stem.split("-")[0]: p for p in sorted(path.glob("*")) if p.suffix in _DATA_SUFFIXES}
        file = path if path.is_file() else files.get(split)
        if file is None:
            raise FileNotFoundError(f"no '{split}' file (.jsonl/.json/.csv/.parquet) in {path}")
        try:
            ds = load_dataset(_DATA_SUFFIXES[file.suffix], data_files={split: str(file)})[split]
        except ValueError as e:  # datasets' way of saying the file holds no rows
            raise ValueError(f"{source}: the '{split}' split is empty ({e})") from e
    elif source.startswith((".", "/", "~")) or path.suffix in _DATA_SUFFIXES:
        raise FileNotFoundError(f"data={source!r}: no such local file or folder")
    else:
        try:
            ds = load_dataset(source, split=split)
        except Exception as e:
            raise FileNotFoundError(
                f"data={source!r}: no such local file or folder, and no Hub data set could be loaded "
                f"({type(e).__name__}); give a .jsonl/.csv/.parquet file, a folder, or a Hub id such as "
                "stanfordnlp/imdb (with internet)"
            ) from e
    missing = {"text", "label"} - set(ds.column_names)
    if missing:
        raise ValueError(f"{source}: the data set lacks column(s) {sorted(missing)}; IMDb's are text, label")
    if len(ds) == 0:
        raise ValueError(f"{source}: the '{split}' split is empty")
    labels = set(ds.unique("label"))
    if not labels <= {0, 1}:  # IMDb's 'unsupervised' split has -1
        raise ValueError(
            f"{source} ('{split}'): labels {sorted(labels - {0, 1})}; reviews must be labelled 0 (negative) "
            "or 1 (positive), so use a labelled split (IMDb's train or test, not unsupervised)"
        )
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


def length_buckets(
    lengths: Sequence[int],
    batch_size: int,
    generator: torch.Generator,
    pool: int = 50,
    drop_last: bool = False,
) -> list[list[int]]:
    """One epoch of batches of indices into `lengths` whose items have similar lengths, so that padding
    each batch to its own longest item wastes little compute. The indices are shuffled, sorted by length
    within chunks of `pool` batches (batches stay random, lengths close), cut into batches, and the
    batches shuffled. Every index appears once; `drop_last` drops what does not fill a whole batch.
    A function of (lengths, batch_size, pool, the generator's state) only."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    chunk_size, stop = batch_size * pool, batch_size - 1 if drop_last else 0
    batches = []
    for i in range(0, len(order) - stop, chunk_size):
        chunk = sorted(order[i : i + chunk_size], key=lengths.__getitem__)
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk) - stop, batch_size)]
    return [batches[k] for k in torch.randperm(len(batches), generator=generator).tolist()]


# --- Models -------------------------------------------------------------------------------------------


def load_policy(source: str, dtype: torch.dtype = torch.float32):
    """Causal LM and its tokenizer (left padding, pad = EOS when missing) from a Hub id or folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kind = AutoConfig.from_pretrained(source)
    if not any(a.endswith(("LMHeadModel", "ForCausalLM")) for a in kind.architectures or ["ForCausalLM"]):
        raise ValueError(
            f"{source} holds a {kind.architectures[0]}, not a causal language model: sft must be one"
        )
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{source}: the tokenizer has neither a pad nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(
            f"{source}: the tokenizer has {len(tokenizer)} tokens, the policy's embedding {rows}"
        )
    return model, tokenizer


def load_reward_model(source: str, dtype: torch.dtype = torch.float32):
    """Sequence classifier with one output (the reward) and its tokenizer, in eval mode, frozen."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    outputs = AutoConfig.from_pretrained(source).num_labels
    if outputs != 1:
        raise ValueError(
            f"{source} has {outputs} outputs; a reward model has one (01 saves one): run 01 first"
        )
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForSequenceClassification.from_pretrained(source, dtype=dtype)
    model.eval().requires_grad_(False)
    return model, tokenizer


def model_device(model: nn.Module) -> torch.device:
    """Device of a model's first parameter."""
    return next(model.parameters()).device


# --- Log-probs ----------------------------------------------------------------------------------------


def lm_logits(model: nn.Module, logits_to_keep: int, **inputs) -> Tensor:
    """(B, K, V) float32 logits of a causal LM at its last K = `logits_to_keep` positions.

    The transformer body runs as the caller set it up (e.g. under bf16 autocast); its output, the final
    layer norm's (autocast keeps layer norms in float32, and the residual stream it reads is float32 there
    too), goes through the LM head in float32 with autocast off. GPT-2's logits sit around -55 to -75,
    where a bf16 logit is rounded to 0.25-0.5: the log-probs of the loss and the KL would otherwise differ
    from the law that sampled by up to that much per token. For models whose logits are lm_head(hidden),
    as GPT-2's (no soft-capping or scaling after the head: refused).
    """
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        raise ValueError(f"{type(model).__name__} transforms its logits after the LM head: not supported")
    hidden = model.base_model(**inputs)[0][:, -logits_to_keep:]  # (B, K, D), after the final layer norm
    head = model.get_output_embeddings()
    bias = None if head.bias is None else head.bias.float()
    with torch.autocast(hidden.device.type, enabled=False):
        return nn.functional.linear(hidden.float(), head.weight.float(), bias)


def completion_logits(
    model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, completions: Tensor, temperature: float
) -> Tensor:
    """(B, L, V) float32 logits / temperature that predicted each completion token, in one forward pass
    (the LM head in float32 whatever the autocast: `lm_logits`).

    Left padding is neutralised with the attention mask and position ids counted from each row's first
    real token, as `generate` does, so a padded row gives the numbers it gives alone.
    """
    ids = torch.cat([prompt_ids, completions], dim=1)  # (B, P+L)
    mask = torch.cat([prompt_mask, torch.ones_like(completions)], dim=1)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    n = completions.shape[1]
    # only the last L+1 positions' logits are needed: the one before the first completion token onward
    logits = lm_logits(model, n + 1, input_ids=ids, attention_mask=mask, position_ids=position_ids)
    return logits[:, :-1].div_(temperature)  # in place: no second (B, L, V) tensor


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """(B, L) log-probability of each token under (B, L, V) logits (the log-softmax in float32)."""
    return torch.gather(logits.float().log_softmax(-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def token_logprobs_and_entropy(logits: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """`token_logprobs` and the (B, L) `entropy` (without gradient) from one log-softmax of the vocabulary."""
    logp = logits.float().log_softmax(-1)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
    return torch.gather(logp, 2, tokens.unsqueeze(-1)).squeeze(-1), entropy


def masked_sum(x: Tensor, mask: Tensor) -> Tensor:
    """(B,) sum of x over the positions where mask is true."""
    return (x * mask).sum(1)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Scalar mean of x over the positions where mask is true."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


# --- Rewards ------------------------------------------------------------------------------------------


def decode_texts(tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, completions: Tensor, mask: Tensor):
    """Review texts x + y: the real prompt tokens then the completion without its EOS and padding."""
    keep = torch.cat([prompt_mask.bool(), mask.bool() & (completions != tokenizer.eos_token_id)], dim=1)
    ids = torch.cat([prompt_ids, completions], dim=1)
    ids, keep = ids.cpu(), keep.cpu()  # one copy each: per-row indexing on a GPU would sync per row
    return [tokenizer.decode(row[k].tolist()) for row, k in zip(ids, keep, strict=True)]


def score_texts(
    reward_model: nn.Module,
    reward_tokenizer,
    texts: Sequence[str],
    batch_size: int = 64,
    max_length: int = 512,
) -> Tensor:
    """(N,) float32 rewards: the reward model's single logit, re-tokenised with its own tokenizer (once),
    scored in batches of similar length, each padded only to its own longest text, under
    `torch.inference_mode`; in the input order."""
    if not texts:
        return torch.zeros(0)
    with torch.inference_mode():
        device = model_device(reward_model)
        enc = reward_tokenizer(list(texts), truncation=True, max_length=max_length)
        # one segment per text: token_type_ids would be all 0, every encoder's default (and DistilBERT
        # under transformers 4.x refuses them), so only ids and mask go in
        keys = ["input_ids", "attention_mask"]
        order = sorted(range(len(texts)), key=lambda i: len(enc["input_ids"][i]))
        scores = torch.zeros(len(texts))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            longest = max(len(enc["input_ids"][i]) for i in rows)
            batch = {}
            for key in keys:  # pad with the pad token (ids) or 0 (masks), on the tokenizer's padding side
                fill = reward_tokenizer.pad_token_id if key == "input_ids" else 0
                padded = [
                    enc[key][i] + [fill] * (longest - len(enc[key][i]))
                    if reward_tokenizer.padding_side == "right"
                    else [fill] * (longest - len(enc[key][i])) + enc[key][i]
                    for i in rows
                ]
                batch[key] = torch.tensor(padded, device=device)
            scores[rows] = reward_model(**batch).logits[:, 0].float().cpu()
    return scores.clone()  # a plain tensor again: callers may modify it


def make_reward_fn(
    reward_model: nn.Module, reward_tokenizer, policy_tokenizer, batch_size: int, max_length: int
):
    """r(x, y): decode prompt + completion with the policy's tokenizer, clean the text as 01's training
    reviews were (`clean_review`, via `load_reviews`), and score it with the reward model. GPT-2 fine-tuned
    on raw IMDb writes `<br /><br />`; the reward model never saw one, so it scores the text without."""

    def reward_fn(prompt_ids: Tensor, prompt_mask: Tensor, completions: Tensor, mask: Tensor) -> Tensor:
        texts = decode_texts(policy_tokenizer, prompt_ids, prompt_mask, completions, mask)
        texts = [clean_review(t) for t in texts]  # what 01 trained on
        return score_texts(reward_model, reward_tokenizer, texts, batch_size, max_length)

    return reward_fn


# --- KL estimators (sequence level) -------------------------------------------------------------------


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


# --- Merging: EMA anchor, SLERP of task vectors, LITI -------------------------------------------------


def state_of(model: nn.Module) -> dict[str, Tensor]:
    """Detached copy of a model's parameters on the CPU, wherever the model is (tied weights stay one
    shared tensor): a state is saved, merged and compared on one device whichever device trained it."""
    copies: dict[int, Tensor] = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in copies:
            copies[id(p)] = p.detach().to("cpu", copy=True)
        out[name] = copies[id(p)]
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
    delta_1 = d_1, delta_m = slerp(delta_{m-1}, d_m, lambda = 1/m). For M = 2 this is the symmetric
    midpoint; for M > 2 the fold does not weight the runs equally and depends on their order (three
    orthogonal unit task vectors merge to about 0.61, 0.61, 0.50 of each), unlike LERP's 1/m fold, which
    is the plain mean. Where the task vectors have equal norms, the merge keeps that norm.
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
            delta = policies[0][key].to(base.device, torch.float32) - b32
            for m, pol in enumerate(policies[1:], start=2):
                delta = _slerp_pair(delta, pol[key].to(base.device, torch.float32) - b32, 1.0 / m)
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
