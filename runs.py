"""Runs: what surrounds Algorithm 1 without being it. An RL run's progress checkpoint and resume,
output-folder claims (no mixing of settings in one folder; a resumed run keeps its length), timing
records, the models a run loads, fault checks (NaN/inf, a constant reward model), mixed precision, and
parallel runs across GPUs.

Files and the Hub are `checkpoints.py`; the algorithm is `warp.py`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

import checkpoints
import utils
from checkpoints import atomic_write_text, load_progress, save_progress, to_json


def save_run(path, accelerator, policy, anchor, optimizer, scheduler, step: int, history: list,
             mixed_precision: str) -> None:  # fmt: skip
    """Progress checkpoint of an RL run: enough state for `resume_run` to continue it bit for bit, and the
    mixed precision it trains in (a resume must not change it: `check_precision`)."""
    policy = utils.state_of(accelerator.unwrap_model(policy))
    save_progress(
        path, accelerator, policy=policy, anchor=utils.state_of(anchor), optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(), step=step, history=history, mixed_precision=mixed_precision,
    )  # fmt: skip


def resume_run(path, accelerator, policy, anchor, optimizer, scheduler, seed: int) -> tuple[int, list]:
    """Load what `save_run` wrote into the run's objects and return (step, history); without a progress
    file, seed the run and return (0, [])."""
    state = load_progress(path, accelerator)
    if state is None:
        torch.manual_seed(seed)
        return 0, []
    utils.load_state(accelerator.unwrap_model(policy), state["policy"])
    utils.load_state(anchor, state["anchor"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["step"], state["history"]


def check_precision(progress: Path, mixed_precision: str) -> None:
    """Refuse, before any model loads, to resume a run in another mixed precision than it was trained in
    (a bf16 run resumed on a T4 would go on in fp16 with a fresh loss scaler): 'auto' is resolved on each
    machine, so the run records what it resolved to."""
    recorded = None
    for candidate in (progress, checkpoints.previous(progress)):
        if candidate.exists():
            try:
                recorded = checkpoints.progress_entry(candidate, "mixed_precision")
            except Exception:  # damaged: load_progress says so, with its fallback, when it resumes
                continue
            break
    if recorded is not None and recorded != mixed_precision:
        raise ValueError(
            f"{progress.parent} was trained in mixed precision {recorded!r} and would resume in "
            f"{mixed_precision!r} on this machine; continue it where {recorded!r} runs (set "
            f"mixed_precision={recorded!r} if this GPU supports it), or delete {progress} to restart the run"
        )


class RunFiles:
    """The files of one RL run, here and in the store: whether it is finished, what it resumes from,
    what it saves after a step, and what it leaves when it ends (`warp.train_run` calls these).

    A run saves a progress checkpoint every `save_every` steps on the local disk; the store gets one only
    when the run has gone `store.progress_minutes` without a stored state (`Store.push_progress`, with
    the snapshots made before it), and gets the final state, the snapshots and the metrics in one commit
    at the end, when the progress is deleted everywhere.
    """

    def __init__(self, spec: RunSpec, store, save_every: int):
        self.spec, self.store, self.save_every = spec, store, save_every
        self.dir = Path(spec.run_dir)
        self.progress, self.done = self.dir / "progress.pt", self.dir / "metrics.json"
        self.last_is_snapshot = spec.steps in spec.save_points  # it holds the final weights: no second copy
        self.final = self.dir / (f"step{spec.steps:05d}" if self.last_is_snapshot else "final.safetensors")
        self.since = time.time()  # when this run's last stored state was made (its start in this session)
        self.progress_stored = False  # whether the store holds the latest progress checkpoint
        self.unstored: list[Path] = []  # snapshots not in the store yet (a resume needs those before it)

    def finished(self) -> bool:
        """True when the run's final weights and metrics are here (pulled from the store if need be)."""
        self.store.pull(self.done, self.final)
        return self.done.exists() and self.final.exists()

    def check_resume(self, mixed_precision: str) -> None:
        """Pull an interrupted run's progress from the store if this session lacks it, and refuse it in
        another precision (`check_precision`); before any model loads. The snapshots an interrupted session
        made here and did not store (its progress stayed local) go with the run's next stored state."""
        self.store.pull(self.progress, checkpoints.previous(self.progress))
        check_precision(self.progress, mixed_precision)
        made = [self.dir / f"step{p:05d}" for p in self.spec.save_points]
        self.unstored = [s for s in made if s.exists() and not self.store.holds(s)]

    def save(self, step: int, accelerator, policy, anchor, optimizer, scheduler, history: list, tokenizer,
             mixed_precision: str) -> None:  # fmt: skip
        """After step `step` (an applied update): a `save_pretrained` snapshot at the run's save points
        (stored), and every `save_every` steps a progress checkpoint (stored by the time rule)."""
        if step in self.spec.save_points:  # stored with the next stored progress, or when the run ends
            snapshot = self.dir / f"step{step:05d}"
            unwrapped = accelerator.unwrap_model(policy)
            checkpoints.save_pretrained_atomic(unwrapped, tokenizer, snapshot, extra={"step": step})
            self.unstored += [snapshot] if snapshot not in self.unstored else []
        if step % self.save_every or step >= self.spec.steps:
            return
        if self.progress_stored:  # the store has the last one: free its 4 model states' worth of disk first
            self.progress.unlink(missing_ok=True)
        save_run(self.progress, accelerator, policy, anchor, optimizer, scheduler, step, history,
                 mixed_precision)  # fmt: skip
        self.progress_stored = self.store.push_progress(self.progress, self.since, *self.unstored)
        if self.progress_stored:  # the store has the latest: the local fallback copy is not needed
            self.since, self.unstored = time.time(), []
            checkpoints.previous(self.progress).unlink(missing_ok=True)

    def finish(self, state: dict | None, history: list) -> Path:
        """Write the final weights `state` (None when the last snapshot holds them) and the metrics, which
        mark the run finished, push both in one commit, and delete the progress here and in the store (here
        only once the store confirmed the commit: until then the store may hold only an older state)."""
        if state is not None:
            checkpoints.save_state(state, self.final)
        atomic_write_text(self.done, to_json(history, indent=None))
        # one commit: the final state (unless it is the last snapshot, among the unstored), the metrics,
        # the snapshots not stored yet, and the deletion of a stored progress (this session's or earlier)
        final = [] if self.last_is_snapshot else [self.final]
        stored = self.store.push(*final, *self.unstored, self.done, delete=[self.progress])
        if stored or not self.store:  # a failed push is carried by the store's next one (`Store.unstored`)
            self.progress.unlink(missing_ok=True)
            checkpoints.previous(self.progress).unlink(missing_ok=True)
        return self.final


def optimizer_step(accelerator, optimizer, scheduler) -> bool:
    """Adam's step, the scheduler's and zero_grad for one micro-batch inside `accelerator.accumulate`;
    True when fp16's loss scaler skipped the update (inf/NaN gradients), and then the lr did not advance.

    A skip is read from the scale as well, which GradScaler.update() lowers after a skip and only then:
    accelerate's step_was_skipped misses the skips of a fused optimizer, whose step() GradScaler calls and
    whose kernel skips the update itself (accelerate issue #4242), and would let the scheduler step."""
    scaler = accelerator.scaler
    scaled = scaler is not None and scaler.is_enabled() and accelerator.sync_gradients  # an update is due
    scale = scaler.get_scale() if scaled else None
    optimizer.step()
    skipped = scaled and (optimizer.step_was_skipped or scaler.get_scale() < scale)
    if not skipped:
        scheduler.step()
    optimizer.zero_grad()
    return skipped


def check_skips(skipped_in_a_row: int, step: int, limit: int = 25) -> None:
    """Stop a run whose fp16 loss scaler skipped `limit` optimizer steps in a row (the scale fell from 2^16
    to below 2^-8): its gradients are not finite at any scale, which no rerun fixes."""
    if skipped_in_a_row >= limit:
        raise FloatingPointError(
            f"step {step + 1}: the fp16 loss scaler skipped {skipped_in_a_row} optimizer steps in a row "
            "(inf/NaN gradients at every scale); lower lr, or use mixed_precision='bf16' or 'no'"
        )


# ======================================================================================================
# Output folders: claims, finished runs, timing
# ======================================================================================================


def config_changes(saved: dict, cfg) -> list[str]:
    """Fields of `cfg` whose value differs from `saved` (a config.json), except those its class lists in
    RESUMABLE_WITH_CHANGES."""
    now = json.loads(to_json(cfg.to_dict()))
    return [k for k in now if k not in cfg.RESUMABLE_WITH_CHANGES and saved.get(k) != now[k]]


def continue_as_started(cfg, saved_config: str | Path, fields: list[str] | tuple[str, ...]):
    """`cfg` with `fields` as the interrupted run's `saved_config` (its config.json) has them, if it exists:
    a run resumed in a new session keeps, say, the length it started with even where the defaults have
    changed since (the caller lists only the fields its user did not set)."""
    path = Path(saved_config)
    if not path.exists():
        return cfg
    saved = json.loads(path.read_text())
    kept = {k: saved[k] for k in fields if k in saved and saved[k] != getattr(cfg, k)}
    if not kept:
        return cfg
    print(f"the run in {path.parent} keeps its own {kept} (set them in OVERRIDES to change them)")
    return replace(cfg, **kept)


def claim_out_dir(cfg, folder: str | Path | None = None, store=None) -> Path:
    """Record `cfg` in `folder/config.json` (default `cfg.out_dir`), first checking that results already
    there, or in the checkpoint `store`, used the same settings (else a restart would silently continue
    old runs under new settings); the record goes to the store with the next commit."""
    folder = Path(folder if folder is not None else cfg.out_dir)
    path = folder / "config.json"
    if store is not None:
        store.pull(path)
    if path.exists():
        saved = json.loads(path.read_text())
        changed = config_changes(saved, cfg)
        if changed:
            now = json.loads(to_json(cfg.to_dict()))
            diff = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
            raise ValueError(
                f"{folder} holds results trained with other settings ({diff}); "
                "choose another out_dir (or CHECKPOINTS), or delete the folder to start over"
            )
    before = path.read_text() if path.exists() else None
    cfg.save(path)
    if store is not None and (path.read_text() != before or not store.holds(path)):
        store.later(path)  # with the first results it describes, not in a commit of its own
    return path


@dataclass
class RunSpec:
    """One RL run of Algorithm 1's inner loop (or the REINFORCE baseline): where it starts and ends."""

    run_dir: str
    """Folder of this run: progress checkpoint, final weights, metrics."""
    init_path: str
    """State file (`checkpoints.save_state`) holding theta_init; "" = the SFT itself, as loaded."""
    seed: int
    """Seeds prompt order and sampling; the only difference between the M runs of an iteration."""
    steps: int
    """Number of Adam steps (T)."""
    save_points: tuple[int, ...] = ()
    """Steps after which to keep a `save_pretrained` snapshot (the REINFORCE baseline's Pareto points)."""


def run_finished(run_dir: str | Path) -> bool:
    """A run is finished when its `metrics.json` was written (atomically, after its final weights)."""
    return (Path(run_dir) / "metrics.json").exists()


def stage_minutes(out_dir: str | Path) -> dict[str, float]:
    """Wall minutes each stage trained in `out_dir` (`warp`, `reinforce`), over all sessions that worked."""
    path = Path(out_dir) / "timing.json"
    return json.loads(path.read_text()) if path.exists() else {}


def record_minutes(out_dir: str | Path, key: str, start: float) -> None:
    """Add this session's wall time since `start` to `out_dir/timing.json` (a resumed stage sums them)."""
    timing = stage_minutes(out_dir)
    timing[key] = timing.get(key, 0.0) + (time.time() - start) / 60
    atomic_write_text(Path(out_dir) / "timing.json", to_json(timing))


class Stage:
    """The files of one stage (02's WARP or its REINFORCE baseline, one mu of 04) here and in the store: it
    claims its folder (`claim_out_dir`), pulls what a step needs, keeps what a step made (one commit) and
    then discards what no later step needs, and at its end records its minutes."""

    def __init__(self, cfg, name: str, store):
        self.name, self.store, self.start = name, store, time.time()
        self.out = Path(cfg.out_dir)
        store.pull(self.out / "timing.json")  # what an earlier session recorded
        claim_out_dir(cfg, store=store)  # refuses results of other settings before any compute

    def pull(self, *paths) -> None:
        self.store.pull(*[p for p in paths if p])

    def holds(self, path: Path) -> bool:
        """True when `path` is here or in the store (without fetching it)."""
        return path.exists() or self.store.holds(path)

    def keep(self, *paths, then_discard=()) -> bool:
        """Push `paths` and delete `then_discard` (what only the step that made them needed) from the store,
        in one commit; once the store confirms it, delete `then_discard` from the local disk too. Without
        a store nothing is deleted: the local copies are the only ones."""
        then_discard = [Path(p) for p in then_discard if p]
        stored = self.store.push(*paths, delete=then_discard)
        for path in then_discard if stored else []:
            checkpoints.remove(path)
        return stored

    def end(self, *paths, then_discard=()) -> bool:
        """Add this session's minutes to `timing.json` and `keep` it with `paths` (without paths, with the
        next commit); the notebook squashes the store's history at its own end."""
        record_minutes(self.out, self.name, self.start)
        if not paths:
            self.store.later(self.out / "timing.json")
            return False
        return self.keep(*paths, self.out / "timing.json", then_discard=then_discard)


def check_reward_model(reward_model: nn.Module, tokenizer, texts: list[str], source: str) -> None:
    """Refuse a reward model that gives every review the same score (a failed or untrained 01): WARP would
    learn nothing from it, silently."""
    scores = utils.score_texts(reward_model, tokenizer, texts, batch_size=len(texts))
    if not torch.isfinite(scores).all():
        raise ValueError(f"the reward model at {source} returns NaN or inf; rerun 01 (e.g. with a lower lr)")
    if scores.max() - scores.min() < 1e-6:
        raise ValueError(
            f"the reward model at {source} gives all {len(texts)} test reviews the same score "
            f"({scores[0].item():.4g}): 01 failed or never trained it; rerun 01, or point reward_model "
            "(REWARD_MODEL) at a working one"
        )


def load_rl_models(cfg, device):
    """What one RL run of `cfg` works with: policy and anchor (the SFT architecture; the caller loads
    theta_init into both), the policy's tokenizer, and r(x, y) with the reward model on `device`."""
    policy, tokenizer = utils.load_policy(cfg.sft)
    anchor, _ = utils.load_policy(cfg.sft)
    reward_model, reward_tokenizer = utils.load_reward_model(cfg.reward_model)
    reward_model.to(device)
    reward_fn = utils.make_reward_fn(
        reward_model, reward_tokenizer, tokenizer, cfg.reward_batch_size, cfg.reward_max_length
    )
    return policy, anchor, tokenizer, reward_fn


# What a non-finite logged statistic means, in the order they are checked.
_FINITE = {"objective/scores": "reward", "objective/kl": "log-prob (KL to the anchor)", "loss/policy": "loss"}


def check_finite(stats: dict[str, float], step: int, progress: Path) -> None:
    """Stop a run at the first NaN or inf in its reward, log-probs or loss, naming it and the step, before
    it reaches the weights; the last progress checkpoint stays what a rerun resumes from."""
    for key, name in _FINITE.items():
        if not math.isfinite(stats[key]):
            last = (
                f"{progress} (step {checkpoints.progress_entry(progress, 'step')})"
                if progress.exists()
                else None
            )
            raise FloatingPointError(
                f"step {step}: the {name} is {stats[key]} ({key}); nothing of this step was applied. "
                f"The last good state is {last or 'theta_init (no progress checkpoint yet)'}: find the cause "
                "(a reward model that returns NaN, too high an lr, fp16 overflow) and rerun to resume from it"
            )


def check_finite_state(state: dict[str, torch.Tensor], what: str) -> None:
    """Refuse a weight state with a NaN or inf (e.g. a merge of a diverged run), naming the tensor."""
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise FloatingPointError(f"{what}: tensor {key} holds NaN or inf; it was not saved")


def speed(start: float) -> dict[str, float]:
    """Wall seconds since `start` (a time.perf_counter) and, on a GPU, the peak memory so far (GiB)."""
    out = {"time/step_seconds": time.perf_counter() - start}
    if torch.cuda.is_available():
        out["memory/peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


# ======================================================================================================
# Parallel runs
# ======================================================================================================


def mixed_precision_for(choice: str) -> str:
    """accelerate's mixed precision for 'auto': bf16 where the GPU computes it natively (Ampere and
    newer), fp16 with a loss scaler on older GPUs such as the T4, none on the CPU."""
    if choice != "auto":
        return choice
    if not torch.cuda.is_available():
        return "no"
    # without including_emulation=False a T4 (sm_75) says yes and runs bf16 emulated, without tensor cores
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def processes_for(cfg) -> int:
    """How many of the M runs of an iteration train at once: one per GPU when `cfg.parallel` and 2+ GPUs;
    without a GPU, `cfg.cpu_processes` (spawned processes on the CPU, through the same `run_parallel`)."""
    gpus = torch.cuda.device_count()
    if gpus == 0:
        return max(1, min(cfg.runs, cfg.cpu_processes))
    return min(cfg.runs, gpus) if cfg.parallel and gpus >= 2 else 1


def child_gpu(index: int, parent_visible: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for the child that uses the parent's `index`-th visible GPU: the parent may
    itself see only some GPUs ("2,3"), and its index 0 is then physical GPU 2."""
    visible = [v.strip() for v in parent_visible.split(",") if v.strip()] if parent_visible else []
    return visible[index] if visible else str(index)


def _worker(fn, args: tuple, gpu: str | None, errors) -> None:
    """Entry point of one parallel job in its own process, pinned to one GPU (or the CPU); a failure
    sends its traceback to the parent, which raises it where the user is looking."""
    import traceback

    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    try:
        fn(*args, device=None if gpu is not None else "cpu")
    except BaseException:
        errors.put(traceback.format_exc())
        raise SystemExit(1) from None


def _stop(procs: list, grace: float = 10.0) -> None:
    """End the given child processes and reap them: SIGTERM, then SIGKILL for those still alive after
    `grace` seconds (a child holding a GPU frees it only when it is gone)."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def run_parallel(fn, jobs: list[tuple], processes: int = 1, on_done=None) -> None:
    """Call `fn(*job)` for each job: one after another, or `processes` at a time in spawned processes,
    one per GPU when there are GPUs (`fn` takes a `device` keyword: "cpu", or None for the GPU it sees);
    `on_done(job)` follows each finished job. A failed job raises RuntimeError with the child's traceback,
    after the other jobs have finished; an interrupt (or any exception) in the parent ends the children
    first, then propagates."""
    on_done = on_done or (lambda job: None)
    if processes <= 1 or len(jobs) <= 1:
        for job in jobs:
            fn(*job)
            on_done(job)
        return
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")  # CUDA cannot be shared with forked children
    n_gpus, parent_visible = torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES")
    errors = ctx.Queue()
    for start in range(0, len(jobs), processes):
        procs = []
        try:
            for j, job in enumerate(jobs[start : start + processes]):
                gpu = child_gpu(j % n_gpus, parent_visible) if n_gpus else None
                p = ctx.Process(target=_worker, args=(fn, job, gpu, errors))
                p.start()
                procs.append(p)
            for p in procs:
                p.join()
        except BaseException:  # an interrupted cell (KeyboardInterrupt) or a failure here: no orphans
            _stop(procs)
            raise
        failed = [j for j, p in enumerate(procs, start=start) if p.exitcode != 0]
        for j, p in enumerate(procs, start=start):
            if p.exitcode == 0:
                on_done(jobs[j])
        if failed:
            tracebacks = []
            while not errors.empty():
                tracebacks.append(errors.get())
            raise RuntimeError(
                f"parallel job(s) {failed} failed; finished work is kept, rerun to resume. "
                + ("\n".join(tracebacks) or "No traceback came back (the process was killed).")
            )
