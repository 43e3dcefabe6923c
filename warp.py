"""Algorithm 1 of WARP (Ramé et al. 2024, arXiv 2406.16768), and the REINFORCE baseline it is compared to.

Each line of Algorithm 1 (printed at the top of 02) is cited where it is implemented: `policy_loss` is
lines 5-8 on one micro-batch, `train_run` the inner run (lines 3-9), `warp` the whole loop (lines 1-12).
The tensor maths (sampling, log-probs, SLERP, ...) is in `utils.py`; saving, resuming and the store in
`runs.py`, `checkpoints.py` and `storage.py`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

import checkpoints
import geometry
import runs
import sampling
import storage
import utils
from config import WarpConfig


def training_prompts(cfg: WarpConfig, tokenizer, split: str = "train") -> tuple[list[list[int]], int]:
    """The prompts x of Alg. 1, the first `prompt_tokens` tokens of each review of `split`, and how many
    reviews were too short for a prompt (dropped)."""
    texts = utils.load_reviews(cfg.data, split)["text"]
    prompts = utils.cut_prompts(texts, tokenizer, cfg.prompt_tokens)
    return prompts, len(texts) - len(prompts)


def prompt_batches(n_prompts: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Alg. 1, line 5: endless batches of prompt indices, a fresh seeded permutation each epoch."""
    if n_prompts < batch_size:  # else not one batch fits in an epoch and the loop below never yields
        raise ValueError(
            f"{n_prompts} prompt(s), fewer than one micro-batch of {batch_size}: use more reviews (data), "
            "shorter prompts (prompt_tokens) or a smaller batch_size"
        )

    def batches():
        for epoch in itertools.count():
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            order = torch.randperm(n_prompts, generator=g).tolist()
            for i in range(0, n_prompts - batch_size + 1, batch_size):
                yield order[i : i + batch_size]

    return batches()


def prompts_per_batch(cfg: WarpConfig) -> int:
    """Prompts in a micro-batch of `batch_size` rows: RLOO samples `rloo_k` completions of each."""
    return cfg.batch_size // (cfg.rloo_k if cfg.baseline == "rloo" else 1)


def advantages(r_beta: Tensor, baseline: str, k: int = 1) -> Tensor:
    """(B,) REINFORCE weights: r_beta itself ('none', the paper), minus the batch mean ('mean'), or minus
    RLOO's leave-one-out mean over the k samples of the same prompt ('rloo'; rows grouped by prompt)."""
    if baseline == "none":
        return r_beta
    if baseline == "mean":
        return r_beta - r_beta.mean()
    if baseline == "rloo":
        groups = r_beta.view(-1, k)  # (B/k, k): k samples per prompt
        others_mean = (groups.sum(1, keepdim=True) - groups) / (k - 1)
        return (groups - others_mean).flatten()
    raise ValueError(f"baseline={baseline!r}: 'none', 'mean' or 'rloo'")


def policy_loss(policy, anchor, reward_fn, prompt_ids, prompt_mask, cfg: WarpConfig, eos_token_id: int):
    """Alg. 1, lines 6-8 on one micro-batch of left-padded prompts (B, P).

    Returns the loss, its logged statistics, and per-row tensors (completion, score, kl, r_beta,
    advantage, sequence log-prob) for inspection.
    """
    # 1. sample y ~ pi_theta(.|x) at the training temperature, no top-k/top-p (line 6)
    completions, mask = sampling.sample_completions(
        policy, prompt_ids, prompt_mask, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
        eos_token_id=eos_token_id, compiled=cfg.compile_generation,
    )  # fmt: skip
    # 2. log pi_theta(y|x) with gradient and log pi_ema(y|x) without, same temperature, one pass each
    logits = utils.completion_logits(policy, prompt_ids, prompt_mask, completions, cfg.temperature)  # (B,L,V)
    logprobs, entropy = utils.token_logprobs_and_entropy(logits, completions)  # (B, L) each
    del logits  # only the (B, L) tensors (and the graph) live on
    with torch.inference_mode():
        ref_logits = utils.completion_logits(anchor, prompt_ids, prompt_mask, completions, cfg.temperature)
        ref_logprobs = utils.token_logprobs(ref_logits, completions)
        del ref_logits
    ref_logprobs = ref_logprobs.clone()  # a plain tensor again, usable beside autograd's
    # 3. the reward model scores the decoded review x + y
    scores = reward_fn(prompt_ids, prompt_mask, completions, mask).to(logprobs.device)  # (B,)
    # 4. r_beta = r - beta * log(pi_theta(y|x) / pi_ema(y|x)), sequence level, detached (line 7)
    seq_logprobs = utils.masked_sum(logprobs, mask)  # (B,)
    kl = (seq_logprobs - utils.masked_sum(ref_logprobs, mask)).detach()
    r_beta = scores - cfg.beta * kl
    # 5. REINFORCE: grad of -A * log pi_theta(y|x), A = r_beta (minus an optional baseline) (line 8)
    adv = advantages(r_beta, cfg.baseline, cfg.rloo_k).detach()
    loss = -(adv * seq_logprobs).mean()
    stats = {
        "objective/scores": scores.mean().item(),
        "objective/kl": kl.mean().item(),
        "objective/rlhf_reward": r_beta.mean().item(),
        "loss/policy": loss.item(),
        "policy/entropy": utils.masked_mean(entropy, mask).item(),
        "policy/completion_length": mask.sum(1).float().mean().item(),
    }
    rows = dict(completions=completions, mask=mask, scores=scores, kl=kl, r_beta=r_beta.detach(),
                advantage=adv, logprob=seq_logprobs.detach())  # fmt: skip
    return loss, stats, rows


def train_run(
    cfg: WarpConfig, spec: runs.RunSpec, prompts: list[list[int]], store=None, on_step=None, device=None
) -> Path:
    """Alg. 1, lines 3-9: T steps of REINFORCE against an EMA anchor, from theta_init.

    Resumes from `run_dir/progress.pt` (here or in the `store`) with the weights of an uninterrupted run
    (bitwise on the CPU); `runs.RunFiles` saves and stores. A step is an applied Adam update: one that fp16's
    loss scaler skips (inf gradients) moves neither policy nor anchor and is not counted (the metrics count
    it), so a run is T updates and T anchor moves in every precision. `on_step(step, metrics)` follows each
    step. Returns `final.safetensors`, or the last snapshot when the last step is a save point.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    files = runs.RunFiles(spec, store or storage.Store("", spec.run_dir), cfg.save_every)
    if files.finished():
        return files.final
    precision = runs.mixed_precision_for(cfg.mixed_precision)
    files.check_resume(precision)  # refuses, before any model loads, to resume in another precision
    rows_per_prompt = cfg.batch_size // prompts_per_batch(cfg)
    batches = prompt_batches(len(prompts), prompts_per_batch(cfg), spec.seed)  # checks sizes
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=cfg.grad_accum,
                              cpu=device == "cpu")  # fmt: skip
    policy, anchor, tokenizer, reward_fn = runs.load_rl_models(cfg, accelerator.device)

    # Alg. 1, line 3: theta_m <- theta_init; theta_ema_m <- theta_init (both are loaded as the SFT)
    if spec.init_path:
        init = checkpoints.load_state_file(spec.init_path)
        utils.load_state(policy, init)
        utils.load_state(anchor, init)
    # dropout off: the gradient must see the distribution that sampled; only the policy learns
    policy.eval().requires_grad_(True)
    anchor.eval().requires_grad_(False).to(accelerator.device)
    # one fused kernel for all parameters on a GPU, one multi-tensor pass per operation on the CPU
    fused = {"fused": True} if accelerator.device.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr, **fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1))
    )
    policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)

    # resume where an interrupted run stopped (weights, anchor, optimizer, RNG), else seed the run
    step, history = runs.resume_run(
        files.progress, accelerator, policy, anchor, optimizer, scheduler, spec.seed
    )
    skipped = history[-1].get("optimizer/skipped_steps", 0) if history else 0
    for _ in range((step + skipped) * cfg.grad_accum):  # skip the prompt batches already used
        next(batches)
    bar = tqdm(total=spec.steps, initial=step, desc=Path(spec.run_dir).name, leave=False)
    in_a_row = 0  # steps skipped since the last applied one
    while step < spec.steps:
        # Alg. 1, lines 5-8: one Adam step over grad_accum micro-batches
        stats, step_start = [], time.perf_counter()
        for _ in range(cfg.grad_accum):
            rows = [prompts[i] for i in next(batches) for _ in range(rows_per_prompt)]
            prompt_ids, prompt_mask = (
                t.to(accelerator.device) for t in utils.left_pad(rows, tokenizer.pad_token_id)
            )
            with accelerator.accumulate(policy), accelerator.autocast():
                loss, s, _ = policy_loss(
                    policy, anchor, reward_fn, prompt_ids, prompt_mask, cfg, tokenizer.eos_token_id
                )
                runs.check_finite(s, step + 1, files.progress)  # a NaN stops the run before the weights
                accelerator.backward(loss)
                skip = runs.optimizer_step(accelerator, optimizer, scheduler)  # Adam, then the lr if applied
            stats.append(s)
        if skip:  # fp16: inf gradients, no update (nor lr step) applied, whatever the optimizer
            skipped, in_a_row = skipped + 1, in_a_row + 1
            runs.check_skips(in_a_row, step)
            continue
        in_a_row = 0
        # Alg. 1, line 9: EMA anchor, theta_ema <- (1 - mu) * theta_ema + mu * theta
        utils.ema_update(anchor, accelerator.unwrap_model(policy), cfg.mu)
        step += 1
        metrics = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
        metrics.update(step=step, lr=scheduler.get_last_lr()[0], **runs.speed(step_start))
        metrics["optimizer/skipped_steps"] = skipped  # so far in this run
        history.append(metrics)
        bar.update(1)
        bar.set_postfix(score=f"{metrics['objective/scores']:.2f}", kl=f"{metrics['objective/kl']:.2f}")
        # checkpoint: a snapshot at save points, progress to continue bit for bit every save_every steps
        files.save(step, accelerator, policy, anchor, optimizer, scheduler, history, tokenizer, precision)
        if on_step is not None:
            on_step(step, metrics)
    bar.close()
    state = None if files.final.exists() else utils.state_of(accelerator.unwrap_model(policy))
    final = files.finish(state, history)
    accelerator.free_memory()
    return final


def warp(
    cfg: WarpConfig, prompts: list[list[int]], processes: int = 1, on_event=None, store=None
) -> dict[str, Path]:
    """Algorithm 1 of the WARP paper, every step saved (and kept in the `store`, a `storage.Store`) so that
    a restart, here or in a new session, continues where it stopped.

    Returns the folders of theta_slerp_I (the last merge) and of the final LITI policy (`save_pretrained`
    folders). `on_event(name, info)` reports each "run", "merge", and iteration found "done" (its "units").
    """
    out, store = Path(cfg.out_dir), store or storage.Store("", cfg.out_dir)
    on_event = on_event or (lambda kind, info: None)
    prompt_batches(len(prompts), prompts_per_batch(cfg), cfg.seed)  # fails now if not one batch fits
    stage = runs.Stage(cfg, "warp", store)
    paths = {"slerp": out / "final_slerp", "liti": out / "final_liti"}
    stage.pull(*paths.values())
    finished = all((p / "config.json").exists() for p in paths.values())
    sft, tokenizer = utils.load_policy(cfg.sft)  # Alg. 1, line 1: theta_init <- theta_sft (not copied)
    for i in range(cfg.iterations):  # Alg. 1, line 2
        it, next_init = out / f"iter{i}", out / f"iter{i + 1}" / "init.safetensors"
        stage.pull(it / "merge.json", *(it / f"run{m}" / "metrics.json" for m in range(cfg.runs)))  # plots
        if finished or stage.holds(next_init):  # this iteration is done (in this session or an earlier one)
            on_event("done", {"iteration": i, "units": cfg.runs + 1})
            continue
        init_path = it / "init.safetensors" if i else None  # iteration 0 starts from the SFT itself
        stage.pull(init_path)
        # Alg. 1, lines 3-9: M independent runs that differ only in their seed (prompt order, samples)
        specs = [
            runs.RunSpec(str(it / f"run{m}"), str(init_path or ""), cfg.seed + 1000 * i + m, cfg.steps)
            for m in range(cfg.runs)
        ]
        todo = [s for s in specs if not runs.run_finished(s.run_dir)]  # one after another, or one per GPU
        report = lambda job: on_event("run", {"run_dir": job[1].run_dir})
        for done in [s for s in specs if s not in todo]:
            report((cfg, done))  # finished in an earlier session
        runs.run_parallel(train_run, [(cfg, s, prompts, store) for s in todo], processes, on_done=report)
        # Alg. 1, line 10: theta_slerp <- slerp(theta_init, {theta_m}, lambda = 1/M)
        finals = [Path(s.run_dir) / "final.safetensors" for s in specs]
        stage.pull(*finals)
        init = checkpoints.load_state_file(init_path) if init_path else utils.state_of(sft)
        policies = [checkpoints.load_state_file(f) for f in finals]
        merged = utils.slerp(init, policies)
        runs.check_finite_state(merged, f"the SLERP merge of iteration {i}")
        info = {"iteration": i, **geometry.merge_diagnostics(init, policies, merged)}  # angles, norm ratios
        checkpoints.save_state(merged, it / "slerp.safetensors")
        checkpoints.atomic_write_text(it / "merge.json", checkpoints.to_json(info))
        # Alg. 1, line 11: theta_init <- (1 - eta) * theta_init + eta * theta_slerp
        checkpoints.save_state(utils.liti(init, merged, cfg.eta), next_init)
        # the next start stored, what only this merge needed goes (the last merge: with the final folders)
        if i < cfg.iterations - 1:
            done_with = [*finals, init_path, it / "slerp.safetensors"]
            stage.keep(next_init, it / "merge.json", then_discard=done_with)
        on_event("merge", info)
    if not finished:
        # Alg. 1, line 12: return theta_slerp_I (and the LITI policy, the start of a next iteration)
        states = {
            "slerp": out / f"iter{cfg.iterations - 1}" / "slerp.safetensors",
            "liti": out / f"iter{cfg.iterations}" / "init.safetensors",
        }
        for name, state_file in states.items():
            if not (paths[name] / "config.json").exists():
                stage.pull(state_file)
                utils.load_state(sft, checkpoints.load_state_file(state_file))
                extra = {"kind": name, **cfg.to_dict()}
                checkpoints.save_pretrained_atomic(sft, tokenizer, paths[name], extra=extra)
        # the final folders hold these two states, and the last runs' finals are needed no more
        last = out / f"iter{cfg.iterations - 1}"
        done_with = [*states.values(), last / "init.safetensors", *last.glob("run*/final.safetensors")]
        if stage.end(*paths.values(), last / "merge.json", then_discard=done_with) or not store:
            for state_file in states.values():
                state_file.unlink(missing_ok=True)
            if states["liti"].parent.exists() and not any(states["liti"].parent.iterdir()):
                states["liti"].parent.rmdir()  # iter{I}/ held only that state
    return paths


def train_reinforce_baseline(cfg: WarpConfig, prompts: list[list[int]], store=None) -> Path:
    """Plain REINFORCE with the same EMA-anchored reward for I * M * T steps, no merging, for comparison.
    Returns the folder of its last snapshot; `baseline_checkpoints` snapshots are spread along the run."""
    out, store = Path(cfg.out_dir) / "reinforce", store or storage.Store("", cfg.out_dir)
    stage = runs.Stage(cfg, "reinforce", store)
    total, n = cfg.iterations * cfg.runs * cfg.steps, cfg.baseline_checkpoints
    points = tuple(sorted({max(1, round(total * (j + 1) / n)) for j in range(n)}))
    stage.pull(out / "metrics.json")
    finished = runs.run_finished(out)
    spec = runs.RunSpec(str(out), "", cfg.seed + 999_999, total, save_points=points)  # from the SFT
    final = train_run(cfg, spec, prompts, store)  # the last snapshot
    store.release(*(out / f"step{p:05d}" for p in points[:-1]))  # 03 pulls them when it plots them
    if not finished:
        stage.end()
    return final
