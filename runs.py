"""Runs and persistence: files written atomically, the Hugging Face Hub, resumable training state
(weights, optimizer, RNG, loss scale), output-folder claims, timing records and parallel runs.

Everything that touches the disk, the network or processes lives here, so that `utils.py` stays pure
and `warp.py` reads like the paper. 01 and 02 resume through the same `save_progress`/`load_progress`.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import utils


def _disk_full(path: Path, error: BaseException) -> OSError | None:
    """A plain message for a write that failed because the disk is full; None for any other failure."""
    if getattr(error, "errno", None) != errno.ENOSPC and "No space left" not in str(error):
        return None
    return OSError(
        errno.ENOSPC,
        f"disk full while writing {path}: nothing was replaced, the previous version (if any) is intact; "
        f"free space (e.g. delete finished runs you have pushed) and rerun to continue",
    )


@contextmanager
def _atomic_file(path: str | Path, mode: str) -> Iterator:
    """An open temporary file beside `path`: flushed, fsynced and renamed onto `path` on success (so a crash
    leaves the old file or the new one, never half of one), deleted on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # durable before it replaces anything
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are meant to be read and shared
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        full = _disk_full(path, e)
        if full is None:
            raise
        raise full from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically and durably."""
    with _atomic_file(path, "w") as f:
        f.write(text)


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
    """torch.save atomically and durably (see `_atomic_file`)."""
    with _atomic_file(path, "wb") as f:
        torch.save(obj, f)


def save_state(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write a parameter state atomically, its tensors on the CPU (tied tensors stay shared), so that a
    state trained on a GPU loads anywhere and meets states written on the CPU on the same device."""
    cpu: dict[int, torch.Tensor] = {}
    atomic_torch_save({k: cpu.setdefault(id(v), v.cpu()) for k, v in state.items()}, path)


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A parameter state written by `save_state`, on the CPU whichever device wrote it; tensors only.
    A damaged file (truncated, overwritten) is an error that names it and says how to recover."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise RuntimeError(
            f"{path} is damaged or incomplete ({type(e).__name__}: {e}); delete it and rerun: the step that "
            "wrote it runs again"
        ) from e


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
    for file in tmp.rglob("*"):  # durable before it replaces anything
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
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
    api.create_repo(repo_id, exist_ok=True, private=True)  # checkpoints are yours until you publish them
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, path_in_repo=path_in_repo or None)
    return f"saved in {folder} and pushed to https://huggingface.co/{repo_id}/{path_in_repo}"


def resolve_checkpoint(source: str, subfolder: str = "", hint: str = "", token: str | None = None) -> str:
    """A local folder for `source`: itself if it exists, else a download of the Hub repo (subfolder).
    A missing folder (absolute, relative to an existing folder, or starting with . or ~) is not sent to
    the Hub as a repo id; either way a failure says what was looked for and `hint`, what to do."""
    local = Path(source).expanduser() / subfolder if subfolder else Path(source).expanduser()
    if local.exists():
        return str(local)
    looks_local = source.startswith((".", "/", "~")) or Path(source).parent.exists() or source.count("/") != 1
    if looks_local:
        raise FileNotFoundError(f"no checkpoint at {local}. {hint}".strip())
    from huggingface_hub import snapshot_download

    try:
        root = snapshot_download(
            source, allow_patterns=[f"{subfolder}/*"] if subfolder else None, token=token
        )
    except Exception as e:
        raise FileNotFoundError(
            f"{source}: not a local folder, nor on the Hub ({type(e).__name__}). {hint}".strip()
        ) from e
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


def previous(path: str | Path) -> Path:
    """Where `save_progress` keeps the checkpoint before the last one (used if the last is damaged)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_progress(path: str | Path, accelerator=None, **state) -> None:
    """Write the resumable state of a training loop atomically, with every RNG state and, in fp16, the
    GradScaler's loss scale (else a resumed run would restart at the initial scale). The checkpoint it
    replaces is kept as `previous(path)`, the fallback if this one turns out damaged."""
    scaler = getattr(accelerator, "scaler", None)
    extra = {"rng": rng_state(), "scaler": scaler.state_dict() if scaler is not None else None}
    path = Path(path)
    with _atomic_file(path.with_name(path.name + ".new"), "wb") as f:
        torch.save({**state, **extra}, f)
    if path.exists():
        os.replace(path, previous(path))
    os.replace(path.with_name(path.name + ".new"), path)


def load_progress(path: str | Path, accelerator=None) -> dict | None:
    """What `save_progress` wrote, or None when there is nothing to resume; a damaged file falls back to
    the one before it, with a warning. Restores the RNG states and the GradScaler, so call it where the
    interrupted loop stood: after setup, right before it continues."""
    import warnings

    path = Path(path)
    candidates = [p for p in (path, previous(path)) if p.exists()]
    if not candidates:
        return None
    errors = []
    for candidate in candidates:
        try:
            state = torch.load(candidate, map_location="cpu", weights_only=False)  # optimizers move theirs
            break
        except Exception as e:
            errors.append(f"{candidate} is damaged ({type(e).__name__}: {e})")
    else:
        raise RuntimeError(
            "; ".join(errors) + ". Nothing to resume from: delete them to start this run from its beginning"
        )
    if errors:
        warnings.warn(f"{errors[0]}; resuming from the checkpoint before it, {candidate}", stacklevel=2)
    set_rng_state(state["rng"])
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return state


def save_run(path, accelerator, policy, anchor, optimizer, scheduler, step: int, history: list) -> None:
    """Progress checkpoint of an RL run: enough state for `resume_run` to continue it bit for bit."""
    policy = utils.state_of(accelerator.unwrap_model(policy))
    save_progress(
        path, accelerator, policy=policy, anchor=utils.state_of(anchor), optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(), step=step, history=history,
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


# ======================================================================================================
# Output folders: claims, finished runs, timing
# ======================================================================================================


def config_changes(saved: dict, cfg) -> list[str]:
    """Fields of `cfg` whose value differs from `saved` (a config.json), except those its class lists in
    RESUMABLE_WITH_CHANGES."""
    now = json.loads(to_json(cfg.to_dict()))
    return [k for k in now if k not in cfg.RESUMABLE_WITH_CHANGES and saved.get(k) != now[k]]


def claim_out_dir(cfg, folder: str | Path | None = None) -> Path:
    """Record `cfg` in `folder/config.json` (default `cfg.out_dir`), first checking that results already
    there used the same settings (else a restart would silently continue old runs under new settings)."""
    folder = Path(folder if folder is not None else cfg.out_dir)
    path = folder / "config.json"
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
    cfg.save(path)
    return path


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


def stage_minutes(out_dir: str | Path) -> dict[str, float]:
    """Wall minutes each stage trained in `out_dir` (`warp`, `reinforce`), over all sessions that worked."""
    path = Path(out_dir) / "timing.json"
    return json.loads(path.read_text()) if path.exists() else {}


def record_minutes(out_dir: str | Path, key: str, start: float) -> None:
    """Add this session's wall time since `start` to `out_dir/timing.json` (a resumed stage sums them)."""
    timing = stage_minutes(out_dir)
    timing[key] = timing.get(key, 0.0) + (time.time() - start) / 60
    atomic_write_text(Path(out_dir) / "timing.json", to_json(timing))


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
                f"{progress} (step {torch.load(progress, map_location='cpu', weights_only=False)['step']})"
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
    """How many of the M runs of an iteration train at once: M when `cfg.parallel` and 2+ GPUs, else 1."""
    return cfg.runs if cfg.parallel and torch.cuda.device_count() >= 2 else 1


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


def run_parallel(fn, jobs: list[tuple], processes: int = 1) -> None:
    """Call `fn(*job)` for each job: one after another, or `processes` at a time in spawned processes,
    one per GPU when there are GPUs (`fn` takes a `device` keyword: "cpu", or None for the GPU it sees).
    A failed job raises RuntimeError with the child's traceback, after the other jobs have finished."""
    if processes <= 1 or len(jobs) <= 1:
        for job in jobs:
            fn(*job)
        return
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")  # CUDA cannot be shared with forked children
    n_gpus, parent_visible = torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES")
    errors = ctx.Queue()
    for start in range(0, len(jobs), processes):
        procs = []
        for j, job in enumerate(jobs[start : start + processes]):
            gpu = child_gpu(j % n_gpus, parent_visible) if n_gpus else None
            p = ctx.Process(target=_worker, args=(fn, job, gpu, errors))
            p.start()
            procs.append(p)
        for p in procs:
            p.join()
        failed = [j for j, p in enumerate(procs, start=start) if p.exitcode != 0]
        if failed:
            tracebacks = []
            while not errors.empty():
                tracebacks.append(errors.get())
            raise RuntimeError(
                f"parallel job(s) {failed} failed; finished work is kept, rerun to resume. "
                + ("\n".join(tracebacks) or "No traceback came back (the process was killed).")
            )
