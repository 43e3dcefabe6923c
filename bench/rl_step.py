"""Benchmark of one RL optimizer step: our WARP step against TRL's `RLOOTrainer` on the same work.

The same work on both sides: 32 completions per optimizer step (16 prompts x 2 samples), RLOO baseline,
beta 0.1, temperature 0.9 with no top-k/top-p, the same lr, the same policy and reward model. Two scales:

- `offline`: the offline preset's SFT (2 layers, 128 wide) and a MiniLM-L6 reward encoder with a fresh
  one-output head, 8-token prompts, 32 new tokens;
- `imdb`: GPT-2 small and a DistilBERT-base-shaped reward encoder with random weights (`imdb_shaped.py`,
  GPT-2's real tokenizer from `../shared/data`), 15-token prompts, 53 new tokens, reward texts up to 512.

Per scale it prints the median step time after warm-up, its split (generation, policy and anchor
log-probs, reward scoring, backward + optimizer + the rest, EMA), samples/s, generated tokens/s, mean
prompt and completion lengths, peak memory, the time of one SLERP + LITI merge, TRL's time over ours for
the whole step and for its non-reward part, and at the imdb scale the model FLOPs utilisation against
this machine's measured matmul throughput. Each side runs in its own process (clean peak memory).

Our side is the real code path: `warp.train_run` with a `runs.RunSpec`, step times from its `on_step`
callback, the split by wrapping the functions named in `PHASES` below (monkeypatched in the worker
process; the project's code is not changed). TRL's side: `trl.RLOOTrainer`, step times from a
`TrainerCallback`, the split by wrapping the trainer's methods named in `TRL_PHASES`. TRL is needed for
this benchmark only (`bench/requirements.txt`).

    python bench/rl_step.py                      # both scales, 10 measured steps after 2 warm-up
    python bench/rl_step.py --scale offline --steps 5 --threads 2
    python bench/rl_step.py --smoke              # 1 step each side, tiny sizes (what the test runs)
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import machine  # noqa: E402

# ======================================================================================================
# What is timed. Repoint here when the project's functions move or are renamed: phase -> the
# (module, function name) pairs to wrap. Patch the module through which the caller looks the name up
# (`warp` calls `sampling.sample_completions`, so "sampling"; after `from sampling import f` in warp it
# would be "warp"). Log-prob calls under grad count as the policy's, without grad as the anchor's. A timed
# call made inside another timed call is not counted twice.
# ======================================================================================================
PHASES = {
    "generation": [("sampling", "sample_completions")],
    "logprobs": [
        ("utils", "completion_logits"),  # the forward pass
        ("utils", "token_logprobs_and_entropy"),  # log-softmax + gather (+ entropy), policy
        ("utils", "token_logprobs"),  # log-softmax + gather, anchor
    ],
    "ema": [("utils", "ema_update")],
}
# reward scoring: the reward_fn that this function returns as its 4th value (policy, anchor, tok, reward_fn)
REWARD_SOURCE = ("runs", "load_rl_models")
# parts of a phase, timed inside it (ours): key -> (module, function name)
SUB_PHASES = {"reward_texts": ("utils", "decode_texts")}
# TRL's side: phase -> RLOOTrainer method (the reward is the callable we give it)
TRL_PHASES = {"generation": "_generate", "logprobs": "_get_per_token_logps_and_entropies"}

# rows of the table: phase key -> label
PHASE_LABELS = {
    "generation": "generation",
    "policy_logprobs": "policy log-probs (with grad)",
    "policy_logprobs_nograd": "policy log-probs (no grad; TRL's old_logps)",
    "anchor_logprobs": "anchor / ref log-probs",
    "reward": "reward scoring",
    "reward_texts": "reward: ids to texts (part of the above)",
    "backward_optimizer": "backward + optimizer + rest",
    "ema": "EMA anchor update",
}
PROMPTS_PER_STEP, SAMPLES_PER_PROMPT = 16, 2  # 32 completions per optimizer step, both sides


@dataclass
class Scale:
    """One benchmark scale: which models, how long the prompts and completions, which lr."""

    name: str
    preset: str
    prompt_tokens: int
    max_new_tokens: int
    lr: float
    reward_max_length: int = 512
    reward_batch_size: int = 64


SCALES = {
    "offline": Scale("offline", "offline", prompt_tokens=8, max_new_tokens=32, lr=1e-4),
    "imdb": Scale("imdb", "imdb", prompt_tokens=15, max_new_tokens=53, lr=5e-6),
}
SMOKE_NEW_TOKENS = 8  # --smoke: completions of at most this many tokens


# ======================================================================================================
# Timing helpers (used in the worker processes)
# ======================================================================================================


class PhaseClock:
    """Seconds spent in each phase since the last `take()`; wrapped functions add to it."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self.active = 0  # > 0 inside a timed call: nested timed calls are not counted again

    def wrap(self, fn, phase_of, on_result=None):
        """`fn` timed under the phase `phase_of(*args, **kwargs)` names; `on_result(args, kwargs, out)`
        sees each result (outside the timed span)."""

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if self.active:
                return fn(*args, **kwargs)
            phase = phase_of(*args, **kwargs)
            machine.sync()
            start = time.perf_counter()
            self.active += 1
            try:
                out = fn(*args, **kwargs)
            finally:
                self.active -= 1
                machine.sync()
                self.totals[phase] += time.perf_counter() - start
            if on_result is not None:
                on_result(args, kwargs, out)
            return out

        return timed

    def wrap_part(self, fn, key: str):
        """`fn` timed under `key` even inside a timed call: a part of a phase, not a phase of its own."""

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            machine.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                machine.sync()
                self.totals[key] += time.perf_counter() - start

        return timed

    def take(self) -> dict[str, float]:
        out = dict(self.totals)
        self.totals.clear()
        return out


def _grad_phase(*args, **kwargs) -> str:
    import torch

    return "policy_logprobs" if torch.is_grad_enabled() else "anchor_logprobs"


def work_row(b, p, length, gen_tokens, prompt_tokens, reward_tok, texts, cfg) -> dict:
    """The work of one micro-batch, as the table and the FLOP count read it (both sides alike)."""
    return dict(
        completions=b,
        prompts=b // SAMPLES_PER_PROMPT,
        prompt_width=p,
        completion_width=length,
        generated_tokens=gen_tokens,
        prompt_tokens=prompt_tokens,
        reward_tokens=reward_tokens(reward_tok, texts, cfg.reward_batch_size, cfg.reward_max_length),
    )


def reward_tokens(reward_tokenizer, texts: list[str], batch_size: int, max_length: int) -> int:
    """Tokens the reward model processes for `texts` when scored as `utils.score_texts` does: sorted by
    length, in batches of `batch_size`, each padded to its longest text."""
    lengths = sorted(
        len(ids) for ids in reward_tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    )
    return sum(
        len(lengths[i : i + batch_size]) * lengths[i : i + batch_size][-1]
        for i in range(0, len(lengths), batch_size)
    )


def flop_params(model) -> dict[str, int]:
    """Parameters that do matmul work per token: all but the token and position embeddings, plus the LM
    head's matmul (vocab x width, tied to the token embedding in GPT-2)."""
    names = ("wte.", "wpe.", "embeddings.word_embeddings", "embeddings.position_embeddings")
    names += ("embeddings.token_type_embeddings",)
    body = sum(p.numel() for n, p in model.named_parameters() if not any(k in n for k in names))
    head = model.get_output_embeddings()
    return {"non_embedding": body, "lm_head": head.weight.numel() if head is not None else 0}


# ======================================================================================================
# Assets: the models of each scale (built once, reused)
# ======================================================================================================


def build_assets(scale: str, root: Path) -> dict[str, str]:
    """{"sft", "reward_model", "data"} of a scale under `root`; the reward models get a fresh one-output
    head on their encoder (its weights do not matter for speed)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import config

    folder = root / scale
    # the folders imdb_shaped.build_assets writes
    paths = {"sft": folder / "gpt2", "reward_model": folder / "reward_model", "data": folder / "imdb"}
    if scale == "offline":
        offline = config.preset_paths("offline")
        paths["sft"], paths["data"], base = (
            Path(offline["sft"]),
            Path(offline["data"]),
            offline["reward_base"],
        )
    if (folder / "COMPLETE").exists():
        return {k: str(v) for k, v in paths.items()}
    if scale == "imdb":
        from bench import imdb_shaped

        built = imdb_shaped.build_assets(folder)
        paths["sft"], paths["data"], base = Path(built["sft"]), Path(built["data"]), built["reward_base"]
    torch.manual_seed(0)
    reward = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    reward.save_pretrained(paths["reward_model"])
    AutoTokenizer.from_pretrained(base).save_pretrained(paths["reward_model"])
    (folder / "COMPLETE").write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    return {k: str(v) for k, v in paths.items()}


def scale_config(
    scale: Scale, assets: dict, smoke: bool, threads: int, out_dir: str, total_steps: int, compiled=False
):
    """Our WarpConfig for the benchmark's work: RLOO, k = 2, 32 rows, no accumulation, beta 0.1;
    `compiled`: sample with the compiled decode step (`--compile`)."""
    from config import WarpConfig

    return WarpConfig.for_preset(
        scale.preset,
        sft=assets["sft"],
        reward_model=assets["reward_model"],
        data=assets["data"],
        out_dir=out_dir,
        baseline="rloo",
        rloo_k=SAMPLES_PER_PROMPT,
        batch_size=PROMPTS_PER_STEP * SAMPLES_PER_PROMPT,
        grad_accum=1,
        beta=0.1,
        temperature=0.9,
        lr=scale.lr,
        prompt_tokens=scale.prompt_tokens,
        max_new_tokens=SMOKE_NEW_TOKENS if smoke else scale.max_new_tokens,
        reward_max_length=scale.reward_max_length,
        reward_batch_size=scale.reward_batch_size,
        save_every=total_steps + 1,
        compile_generation=compiled,
        cpu_threads=threads,
        iterations=1,
        runs=1,
        steps=total_steps,
    )


def policy_tokenizer(sft: str):
    """The policy's tokenizer as `utils.load_policy` sets it up (left padding, pad = EOS), no model."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sft)
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return tokenizer


def bench_prompts(cfg, tokenizer, n: int) -> list[list[int]]:
    """The first `n` training prompts of the scale's data (cut by tokens, as 02 cuts them)."""
    import warp

    prompts, _ = warp.training_prompts(cfg, tokenizer)
    if len(prompts) < n:
        prompts = (prompts * math.ceil(n / len(prompts)))[:n]
    return prompts[:n]


# ======================================================================================================
# Workers: one process per side
# ======================================================================================================


def worker_ours(
    scale: Scale, assets: dict, steps: int, warmup: int, threads: int, smoke: bool, compiled: bool = False
) -> dict:
    """Our step through `warp.train_run`, timed by its on_step callback, split by the wrapped functions."""
    import importlib

    import torch

    import runs
    import utils
    import warp

    total = warmup + steps
    clock, seen = PhaseClock(), defaultdict(list)
    for phase, targets in PHASES.items():
        for module_name, fn_name in targets:
            module = importlib.import_module(module_name)
            if not callable(getattr(module, fn_name, None)):
                raise AttributeError(f"{module_name}.{fn_name} is gone: repoint PHASES in bench/rl_step.py")
            phase_of = _grad_phase if phase == "logprobs" else (lambda *a, _p=phase, **k: _p)
            # the sampler's calls are counted; the tensors are read after the run (no sync inside a step)
            on_result = (lambda a, k, out: seen["generation"].append(out)) if phase == "generation" else None
            setattr(module, fn_name, clock.wrap(getattr(module, fn_name), phase_of, on_result))
    for key, (module_name, fn_name) in SUB_PHASES.items():
        module = importlib.import_module(module_name)
        setattr(module, fn_name, clock.wrap_part(getattr(module, fn_name), key))

    loaded = {}
    source_module = importlib.import_module(REWARD_SOURCE[0])
    load = getattr(source_module, REWARD_SOURCE[1])

    def load_and_wrap(*args, **kwargs):
        policy, anchor, tokenizer, reward_fn = load(*args, **kwargs)
        loaded.update(policy=policy, tokenizer=tokenizer)
        record = lambda a, k, out: seen["reward_args"].append(a)  # decoded after the run, not in the step
        return policy, anchor, tokenizer, clock.wrap(reward_fn, lambda *a, **k: "reward", record)

    setattr(source_module, REWARD_SOURCE[1], load_and_wrap)

    step_times, phase_rows = [], []

    def on_step(step, metrics):
        step_times.append(metrics["time/step_seconds"])
        phase_rows.append(clock.take())

    with tempfile.TemporaryDirectory(prefix="bench_rl_ours_") as tmp:
        cfg = scale_config(scale, assets, smoke, threads, tmp, total, compiled)
        tokenizer = policy_tokenizer(cfg.sft)  # the tokenizer only: a model loaded here would count in memory
        prompts = bench_prompts(cfg, tokenizer, PROMPTS_PER_STEP * total)
        if threads:
            torch.set_num_threads(threads)
        spec = runs.RunSpec(str(Path(tmp) / "run"), "", seed=0, steps=total)  # "" = the SFT itself
        device = None if torch.cuda.is_available() else "cpu"
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        warp.train_run(cfg, spec, prompts, on_step=on_step, device=device)
    memory, memory_kind = machine.peak_memory()
    check_counts("ours", total, step_times, [out[0].shape[0] for out in seen["generation"]])

    # what each step processed: shapes from the generation calls, reward tokens from the scored texts
    from transformers import AutoTokenizer

    reward_tok = AutoTokenizer.from_pretrained(cfg.reward_model)
    rows = []
    seen["prompt_groups"] = []
    for args in seen["reward_args"]:
        b, p, length, gen_tokens, prompt_tokens, groups = work_of(*args)
        seen["prompt_groups"].append(groups)
        texts = utils.decode_texts(loaded["tokenizer"], *args)
        rows.append(work_row(b, p, length, gen_tokens, prompt_tokens, reward_tok, texts, cfg))
    return {
        "step_s": step_times[warmup:],
        "phases": phase_rows[warmup:],
        "work": rows[warmup:],
        "unique_prompts": seen["prompt_groups"][warmup:],
        "peak_memory_bytes": memory,
        "memory_kind": memory_kind,
        "params": {"policy": flop_params(loaded["policy"]), "reward": _reward_params(cfg.reward_model)},
        "settings": {
            k: v for k, v in cfg.to_dict().items() if k not in ("sft", "reward_model", "data", "out_dir")
        },
    }


def check_counts(side: str, total: int, step_times: list, rows_per_call: list[int]) -> None:
    """Each optimizer step was timed once and generated once, 32 completions."""
    if len(step_times) != total or len(rows_per_call) != total:
        raise RuntimeError(
            f"{side}: {len(step_times)} timed steps, {len(rows_per_call)} generation calls, not {total}"
        )
    rows = set(rows_per_call)
    if rows != {PROMPTS_PER_STEP * SAMPLES_PER_PROMPT}:
        raise RuntimeError(
            f"{side}: {sorted(rows)} completions per step, not {PROMPTS_PER_STEP * SAMPLES_PER_PROMPT}"
        )


def work_of(prompt_ids, prompt_mask, completions, mask) -> tuple[int, int, int, int, int, int]:
    """What one of our steps processed, from the tensors its reward_fn got: (rows, prompt width,
    completion width, generated tokens, prompt tokens, prompt groups); RLOO rows come as rloo_k = 2
    consecutive copies of each prompt (groups = 0 if not)."""
    pairs = prompt_ids.shape[0] % 2 == 0 and bool((prompt_ids[0::2] == prompt_ids[1::2]).all())
    return (
        completions.shape[0],
        prompt_ids.shape[1],
        completions.shape[1],
        int(mask.sum()),
        int(prompt_mask.sum()),
        prompt_ids.shape[0] // SAMPLES_PER_PROMPT if pairs else 0,
    )


def _reward_params(path: str) -> dict[str, int]:
    from transformers import AutoModelForSequenceClassification

    return flop_params(AutoModelForSequenceClassification.from_pretrained(path))


def worker_trl(scale: Scale, assets: dict, steps: int, warmup: int, threads: int, smoke: bool) -> dict:
    """TRL's RLOOTrainer on the same work, timed by a TrainerCallback, split by its wrapped methods."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    import runs
    import utils

    total = warmup + steps
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="bench_rl_trl_") as tmp:
        cfg = scale_config(scale, assets, smoke, threads, tmp, total)
        tokenizer = policy_tokenizer(cfg.sft)
        prompts = bench_prompts(cfg, tokenizer, PROMPTS_PER_STEP * total)
        texts = [tokenizer.decode(p) for p in prompts]
        dataset = Dataset.from_dict({"prompt": texts, "prompt_index": list(range(len(texts)))})

        reward_model, reward_tok = utils.load_reward_model(cfg.reward_model)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        reward_model.to(device)
        clock, seen = PhaseClock(), defaultdict(list)

        def sentiment(prompts, completions, **kwargs):
            """r(x, y): the reward model's logit of prompt + completion, scored as our reward_fn scores."""
            texts = [p + c for p, c in zip(prompts, completions, strict=True)]
            return utils.score_texts(
                reward_model, reward_tok, texts, cfg.reward_batch_size, cfg.reward_max_length
            ).tolist()

        def record_reward(args, kwargs, out):
            seen["reward_texts"].append(
                [p + c for p, c in zip(kwargs["prompts"], kwargs["completions"], strict=True)]
            )
            seen["unique_prompts"].append(len(set(kwargs["prompt_index"])))  # a column of the dataset

        mixed = runs.mixed_precision_for(cfg.mixed_precision)
        args = RLOOConfig(
            output_dir=tmp,
            per_device_train_batch_size=PROMPTS_PER_STEP * SAMPLES_PER_PROMPT,  # 32 completions per step ...
            num_generations=SAMPLES_PER_PROMPT,  # ... of 16 prompts x 2
            gradient_accumulation_steps=1,  # -> steps_per_generation 1, generation_batch_size 32
            num_iterations=1,  # one optimizer step per generation batch, as ours
            max_steps=total,
            max_completion_length=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=0,
            top_p=1.0,
            beta=cfg.beta,
            learning_rate=cfg.lr,
            disable_dropout=True,  # ours samples and trains with dropout off
            gradient_checkpointing=False,  # TRL's default is True: recomputes the forward; ours does not
            bf16=mixed == "bf16",
            fp16=mixed == "fp16",
            use_cpu=not torch.cuda.is_available(),
            model_init_kwargs={"dtype": "float32"},  # fp32 master weights, as ours
            report_to="none",
            save_strategy="no",
            logging_steps=10**6,
            dataloader_num_workers=0,
            seed=0,
        )
        trainer = RLOOTrainer(
            model=cfg.sft,
            reward_funcs=clock.wrap(sentiment, lambda *a, **k: "reward", record_reward),
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        step_times, phase_rows = [], []

        def logprob_phase(model, *a, **k):
            if torch.is_grad_enabled():
                return "policy_logprobs"
            return "anchor_logprobs" if model is trainer.ref_model else "policy_logprobs_nograd"

        def record_generation(a, k, out):
            prompt_ids, completion_ids, _ = out
            seen["generation"].append(
                (
                    len(completion_ids),
                    max(map(len, prompt_ids)),
                    max(map(len, completion_ids)),
                    sum(map(len, completion_ids)),
                    sum(map(len, prompt_ids)),
                )
            )

        trainer._generate = clock.wrap(trainer._generate, lambda *a, **k: "generation", record_generation)
        name = TRL_PHASES["logprobs"]
        setattr(trainer, name, clock.wrap(getattr(trainer, name), logprob_phase))
        assert TRL_PHASES["generation"] == "_generate"

        class StepClock(TrainerCallback):
            def on_step_begin(self, *a, **k):
                machine.sync()
                clock.take()  # anything before the step (none expected) is not the step's
                self.start = time.perf_counter()

            def on_step_end(self, *a, **k):
                machine.sync()
                step_times.append(time.perf_counter() - self.start)
                phase_rows.append(clock.take())

        trainer.add_callback(StepClock())
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        memory, memory_kind = machine.peak_memory()
        check_counts("TRL", total, step_times, [c[0] for c in seen["generation"]])
        settings = {
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "num_generations": args.num_generations,
            "generation_batch_size": args.generation_batch_size,
            "steps_per_generation": args.steps_per_generation,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "num_iterations": args.num_iterations,
            "max_completion_length": args.max_completion_length,
            "temperature": args.temperature,
            "top_k": args.top_k,
            "top_p": args.top_p,
            "beta": args.beta,
            "learning_rate": args.learning_rate,
            "optim": str(args.optim),
            "bf16": args.bf16,
            "fp16": args.fp16,
            "gradient_checkpointing": args.gradient_checkpointing,
            "disable_dropout": args.disable_dropout,
            "max_grad_norm": args.max_grad_norm,
        }
    rows = []
    for (b, p, length, gen_tokens, prompt_tokens), texts in zip(
        seen["generation"], seen["reward_texts"], strict=True
    ):
        rows.append(work_row(b, p, length, gen_tokens, prompt_tokens, reward_tok, texts, cfg))
    return {
        "step_s": step_times[warmup:],
        "phases": phase_rows[warmup:],
        "work": rows[warmup:],
        "unique_prompts": seen["unique_prompts"][warmup:],
        "peak_memory_bytes": memory,
        "memory_kind": memory_kind,
        "settings": settings,
    }


# ======================================================================================================
# The parent: merge timing, matmul peak, the workers, the table
# ======================================================================================================


def merge_seconds(sft: str, repeats: int) -> dict:
    """Median seconds of one `utils.slerp(init, [p1, p2])` then `utils.liti(init, merged, 0.5)` on the
    CPU, on states of the SFT's size (two perturbed copies of it)."""
    import torch

    import utils

    policy, _ = utils.load_policy(sft)
    init = utils.state_of(policy)
    del policy
    g = torch.Generator().manual_seed(0)
    policies = [{k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in init.items()} for _ in range(2)]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        merged = utils.slerp(init, policies)
        utils.liti(init, merged, 0.5)
        times.append(time.perf_counter() - start)
    n = sum(v.numel() for k, v in init.items() if k in utils._unique_keys(init))
    return {"seconds": statistics.median(times), "parameters": n, "repeats": repeats}


def run_worker(
    side: str, scale: str, assets: Path, steps: int, warmup: int, threads: int, smoke: bool, compiled=False
) -> dict:
    """One side at one scale in its own process; returns what the worker wrote."""
    with tempfile.TemporaryDirectory(prefix="bench_rl_") as tmp:
        result = Path(tmp) / "result.json"
        cmd = (
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--worker",
                side,
                "--scale",
                scale,
                "--assets",
                str(assets),
                "--steps",
                str(steps),
                "--warmup",
                str(warmup),
                "--threads",
                str(threads),
                "--result",
                str(result),
            ]
            + (["--smoke"] if smoke else [])
            + (["--compile"] if compiled and side == "ours" else [])
        )
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        print(f"[bench_rl] {scale}: {side} ({warmup} warm-up + {steps} measured steps) ...", file=sys.stderr)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the {side} worker at scale {scale} failed:\n{proc.stderr[-6000:]}")
        print(f"[bench_rl] {scale}: {side} done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        return json.loads(result.read_text())


def step_flops(params: dict, work: dict) -> dict[str, float]:
    """Model FLOPs of one step (attention score FLOPs left out): generation 2N per processed token with the
    KV cache, policy forward + backward 6N and anchor forward 2N per prompt + completion token, reward 2N_r
    per reward token; N = non-embedding parameters + the LM head's matmul; tokens as processed (padded)."""
    n = params["policy"]["non_embedding"] + params["policy"]["lm_head"]
    n_r = params["reward"]["non_embedding"]
    tokens = work["completions"] * (work["prompt_width"] + work["completion_width"])
    parts = {
        "generation": 2 * n * tokens,
        "policy": 6 * n * tokens,
        "anchor": 2 * n * tokens,
        "reward": 2 * n_r * work["reward_tokens"],
    }
    return {**parts, "total": sum(parts.values())}


def summarise(side: dict, params: dict | None, peak: dict | None, use_bf16: bool) -> dict:
    """Medians of a worker's steps: step time, each phase, the rest, throughput, lengths, MFU."""
    steps = side["step_s"]
    phases = defaultdict(list)
    for t, row in zip(steps, side["phases"], strict=True):
        for key in (
            "generation",
            "policy_logprobs",
            "policy_logprobs_nograd",
            "anchor_logprobs",
            "reward",
            "reward_texts",
            "ema",
        ):
            phases[key].append(row.get(key, 0.0))
        phases["backward_optimizer"].append(t - sum(v for k, v in row.items() if k not in SUB_PHASES))
        phases["non_reward"].append(t - row.get("reward", 0.0))
    work = side["work"]
    med = statistics.median
    step = med(steps)
    gen_tokens = med(w["generated_tokens"] for w in work)
    out = {
        "step_s": step,
        "steps": len(steps),
        "phases_s": {k: med(v) for k, v in phases.items()},
        "samples_per_s": med(w["completions"] for w in work) / step,
        "generated_tokens_per_s": gen_tokens / step,
        "completions_per_step": sorted({w["completions"] for w in work}),
        "unique_prompts_per_step": sorted(set(side["unique_prompts"])),
        "mean_completion_tokens": sum(w["generated_tokens"] for w in work)
        / sum(w["completions"] for w in work),
        "mean_prompt_tokens": sum(w["prompt_tokens"] for w in work) / sum(w["completions"] for w in work),
        "peak_memory_bytes": side["peak_memory_bytes"],
        "memory_kind": side["memory_kind"],
    }
    if params is not None and peak is not None:
        flops = med(step_flops(params, w)["total"] for w in work)
        throughput = peak["bfloat16" if use_bf16 and "bfloat16" in peak else "float32"]
        out.update(step_flops=flops, achieved_flops_per_s=flops / step, mfu=flops / step / throughput)
    return out


def run(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        assets = build_assets(args.scale, Path(args.assets))
        worker = worker_ours if args.worker == "ours" else worker_trl
        extra = {"compiled": True} if args.compile else {}  # only ours gets --compile (TRL: `generate`)
        out = worker(SCALES[args.scale], assets, args.steps, args.warmup, args.threads, args.smoke, **extra)
        Path(args.result).write_text(json.dumps(out))
        return out

    import torch

    from bench import imdb_shaped

    if args.threads:
        torch.set_num_threads(args.threads)
    steps, warmup = (1, 0) if args.smoke else (args.steps, args.warmup)
    scales = ["offline", "imdb"] if args.scale == "both" else [args.scale]
    sides = ["ours", "trl"] if args.only is None else [args.only]
    assets_root = Path(args.assets)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine.describe(),
        "settings": {
            "steps": steps,
            "warmup": warmup,
            "threads": args.threads or torch.get_num_threads(),
            "smoke": args.smoke,
            "compile_generation": args.compile,
            "completions_per_step": PROMPTS_PER_STEP * SAMPLES_PER_PROMPT,
            "prompts_per_step": PROMPTS_PER_STEP,
            "samples_per_prompt": SAMPLES_PER_PROMPT,
        },
        "scales": {},
    }
    for name in scales:
        if name == "imdb" and (missing := imdb_shaped.missing_shared()):
            print(f"[bench_rl] skipping the imdb scale: {missing}", file=sys.stderr)
            report["scales"][name] = {"skipped": missing}
            continue
        scale = SCALES[name]
        assets = build_assets(name, assets_root)  # once here, so neither worker's time includes it
        entry: dict = {"scale": asdict(scale)}
        if args.smoke:
            entry["scale"]["max_new_tokens"] = SMOKE_NEW_TOKENS
        raw = {
            side: run_worker(side, name, assets_root, steps, warmup, args.threads, args.smoke, args.compile)
            for side in sides
        }
        params = raw.get("ours", {}).get("params")
        if params is None:  # --only trl: count the parameters here
            from transformers import AutoModelForCausalLM

            params = {
                "policy": flop_params(AutoModelForCausalLM.from_pretrained(assets["sft"])),
                "reward": _reward_params(assets["reward_model"]),
            }
        entry["params"] = params
        peak = None
        if name == "imdb" or args.mfu_all:
            peak = report.setdefault("matmul_peak_flops", machine.matmul_peak(args.smoke))
        use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        for side, result in raw.items():
            entry[side] = summarise(result, params, peak, use_bf16)
            entry[side]["step_s_each"] = result["step_s"]
            entry[side]["settings"] = result["settings"]
        if len(raw) == 2:
            entry["ratios"] = {
                "step": entry["trl"]["step_s"] / entry["ours"]["step_s"],
                "non_reward": entry["trl"]["phases_s"]["non_reward"]
                / entry["ours"]["phases_s"]["non_reward"],
            }
        entry["merge"] = merge_seconds(assets["sft"], 1 if args.smoke else 3)
        report["scales"][name] = entry
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    markdown = table(report)
    (out / "bench_rl.json").write_text(json.dumps(report, indent=2))
    (out / "bench_rl.md").write_text(markdown)
    print(markdown)
    return report


# ======================================================================================================
# The table
# ======================================================================================================


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:,.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:.1f} ms"


def _ratio(trl: float | None, ours: float | None) -> str:
    return f"{trl / ours:.2f}x" if trl and ours and trl > 0 and ours > 0 else "-"


NOTES = (
    "TRL's generation includes tokenising the prompt texts and decoding the completions; ours gets token "
    "prompts and decodes inside reward scoring. Backward + optimizer + rest = step time minus the timed "
    "phases (ours: loss, backward, Adam, stats; TRL: loss, backward, grad norm, AdamW, its bookkeeping). "
    "TRL computes the policy's log-probs twice (once without grad, for the KL and its old log-probs; once "
    "with grad, for the loss), ours once, with grad. EMA is WARP's anchor update (TRL's reference model "
    "stays fixed). MFU counts the same model FLOPs on both sides (generation 2N, policy forward + backward "
    "6N, anchor forward 2N per processed token, reward 2N_r per reward token; N = non-embedding parameters "
    "+ the LM head matmul, attention scores left out), not TRL's extra forward."
)


def scale_table(e: dict) -> list[str]:
    """The markdown rows of one scale: ours, TRL and TRL / ours."""
    sides = [k for k in ("ours", "trl") if k in e]
    both = len(sides) == 2
    head = {"ours": "ours (WARP train_run)", "trl": "TRL RLOOTrainer"}
    lines = ["| | " + " | ".join(head[k] for k in sides) + (" | TRL / ours |" if both else " |")]
    lines.append("|---" * (len(sides) + 1 + both) + "|")

    def row(label: str, values: list[str], ratio: str = "") -> None:
        lines.append(f"| {label} | " + " | ".join(values) + (f" | {ratio} |" if both else " |"))

    def times(label: str, values: list[float | None]) -> None:
        row(label, [_ms(v) for v in values], _ratio(values[-1], values[0]) if both else "")

    d = [e[k] for k in sides]
    times("**step (median)**", [x["step_s"] for x in d])
    for key, label in PHASE_LABELS.items():
        times(f"- {label}", [x["phases_s"][key] or None for x in d])
    times("**non-reward part** (step - reward)", [x["phases_s"]["non_reward"] for x in d])
    row("samples/s", [f"{x['samples_per_s']:.1f}" for x in d])
    row("generated tokens/s", [f"{x['generated_tokens_per_s']:,.0f}" for x in d])
    row("completions / unique prompts per step",
        [f"{x['completions_per_step']} / {x['unique_prompts_per_step']}" for x in d])  # fmt: skip
    row("mean prompt / completion tokens",
        [f"{x['mean_prompt_tokens']:.1f} / {x['mean_completion_tokens']:.1f}" for x in d])  # fmt: skip
    row("peak memory", [f"{x['peak_memory_bytes'] / 2**30:.2f} GiB ({x['memory_kind']})" for x in d])
    if "mfu" in d[0]:
        row("model FLOPs per step", [f"{x['step_flops'] / 1e12:.3f} TFLOP" for x in d])
        row(
            "achieved FLOP/s, MFU",
            [f"{x['achieved_flops_per_s'] / 1e9:,.1f} GFLOP/s, {x['mfu']:.1%}" for x in d],
        )
    return lines


def table(report: dict) -> str:
    """The whole report as markdown: machine, work, then one table per scale."""
    m, s = report["machine"], report["settings"]
    lines = [
        f"# RL step benchmark ({report['date']})",
        "",
        f"{machine.line(m, s['threads'])}, TRL {m['trl']}.",
        f"Work per optimizer step: {s['completions_per_step']} completions = {s['prompts_per_step']} prompts "
        f"x {s['samples_per_prompt']} samples, RLOO baseline, beta 0.1, temperature 0.9, no top-k/top-p. "
        f"Medians of {s['steps']} measured steps after {s['warmup']} warm-up"
        + (" (SMOKE: the numbers mean nothing)" if s["smoke"] else "")
        + "."
        + (
            " Ours samples with the compiled decode step (`--compile`)."
            if s.get("compile_generation")
            else ""
        ),
    ]
    if "matmul_peak_flops" in report:
        p = report["matmul_peak_flops"]
        measured = ", ".join(
            f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in p.items() if k not in ("device", "sizes")
        )
        lines.append(
            f"Measured matmul peak ({p['device']}, best of square matmuls {p['sizes']}): {measured}."
        )
    for name, e in report["scales"].items():
        lines += ["", f"## {name} scale", ""]
        if "skipped" in e:
            lines.append(f"Skipped: {e['skipped']}")
            continue
        sc, pp = e["scale"], e["params"]
        lines += [
            f"Prompts {sc['prompt_tokens']} tokens, up to {sc['max_new_tokens']} new tokens, reward texts up "
            f"to {sc['reward_max_length']} tokens, lr {sc['lr']}; policy "
            f"{pp['policy']['non_embedding'] / 1e6:.2f}M non-embedding parameters + LM head "
            f"{pp['policy']['lm_head'] / 1e6:.2f}M, reward model {pp['reward']['non_embedding'] / 1e6:.2f}M "
            "non-embedding.",
            "",
            *scale_table(e),
            "",
            f"One SLERP (2 policies) + LITI merge of {e['merge']['parameters'] / 1e6:.1f}M parameters on the "
            f"CPU: {_ms(e['merge']['seconds'])}.",
        ]
        if "ratios" in e:
            r = e["ratios"]
            lines.append(
                f"**TRL / ours: whole step {r['step']:.2f}x, non-reward part {r['non_reward']:.2f}x** "
                "(above 1: ours is faster)."
            )
    lines += ["", NOTES]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--scale", choices=["offline", "imdb", "both"], default="both")
    p.add_argument("--steps", type=int, default=10, help="measured optimizer steps per side (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps left out of the medians (default 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--smoke", action="store_true", help="1 step each side, no warm-up, 8 new tokens")
    p.add_argument("--only", choices=["ours", "trl"], default=None, help="run one side only")
    p.add_argument(
        "--compile",
        action="store_true",
        help="ours samples with the compiled decode step (compile_generation)",
    )
    p.add_argument("--mfu-all", action="store_true", help="also MFU at the offline scale")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_rl"), help="folder of bench_rl.{json,md}")
    p.add_argument(
        "--assets", default=str(ROOT / "runs" / "bench_rl" / "assets"), help="built models (reused)"
    )
    p.add_argument("--worker", choices=["ours", "trl"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    run()
