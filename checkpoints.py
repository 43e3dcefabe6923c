"""Checkpoints: files written atomically and durably, parameter states on the CPU, resumable training
state (weights, optimizer, RNG, loss scale) with a fallback to the previous checkpoint, model cards, and
finding a checkpoint in a local folder or on the Hugging Face Hub. The store they are kept in between
sessions is `storage.py`.

01 and 02 resume through the same `save_progress` / `load_progress`. Nothing here knows about WARP.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn


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


def _first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (torch's unpickling errors run to a page)."""
    return (str(error).strip().splitlines() or [""])[0]


def atomic_torch_save(obj, path: str | Path) -> None:
    """torch.save atomically and durably (see `_atomic_file`)."""
    with _atomic_file(path, "wb") as f:
        torch.save(obj, f)


def save_state(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write a parameter state atomically as safetensors (no pickle: safe to load from a shared Hub repo),
    its tensors on the CPU so that a state trained on a GPU loads anywhere. Tied tensors (GPT-2's lm_head
    and wte) are stored once; the names that share them are kept in the file's metadata."""
    from safetensors.torch import save

    tensors, aliases, first = {}, {}, {}
    for name, tensor in state.items():
        ident = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if tensor.numel() and ident in first:
            aliases[name] = first[ident]
            continue
        first.setdefault(ident, name)
        tensors[name] = tensor.detach().to("cpu").contiguous()
    metadata = {"order": json.dumps(list(state)), "aliases": json.dumps(aliases)}
    with _atomic_file(path, "wb") as f:
        f.write(save(tensors, metadata=metadata))


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A parameter state written by `save_state`, on the CPU, tied names sharing one tensor again, in the
    order it was saved. A damaged file (truncated, overwritten) is an error that names it and says how to
    recover."""
    from safetensors import safe_open

    if not Path(path).exists():
        raise FileNotFoundError(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        aliases = json.loads(metadata.get("aliases", "{}"))
        order = json.loads(metadata.get("order", "null")) or list(tensors)
        return {name: tensors[aliases.get(name, name)] for name in order}
    except Exception as e:
        raise RuntimeError(
            f"{path} is damaged or incomplete ({type(e).__name__}: {_first_line(e)}); delete it and rerun: "
            "the step that wrote it runs again"
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


def remove(path: str | Path) -> None:
    """Delete a file or a folder (a checkpoint either way); nothing when it is not there."""
    path = Path(path)
    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def folder_bytes(root: str | Path) -> int:
    """Bytes of the files under `root` (0 when it does not exist; files that vanish meanwhile skipped)."""
    total = 0
    for path in Path(root).rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except FileNotFoundError:  # renamed or deleted while walking (an atomic write finishing)
            pass
    return total


def disk_report(root: str | Path) -> str:
    """One line: how much the checkpoints under `root` take on the local disk, and how much is left."""
    root = Path(root)
    used = folder_bytes(root)
    free = shutil.disk_usage(root if root.exists() else Path.cwd()).free
    return f"local disk: {used / 1e9:.2f} GB of checkpoints in {root}, {free / 1e9:.1f} GB free"


ROOT = "checkpoints"  # the notebooks' default CHECKPOINTS: "checkpoints/reward_model" is a folder, no Hub id


def looks_local(location: str) -> bool:
    """A folder rather than a Hub repo id ("owner/name"): absolute, relative with ./~, or existing."""
    return location.startswith((".", "/", "~")) or Path(location).exists() or location.count("/") != 1


def resolve_checkpoint(source: str, subfolder: str = "", hint: str = "", token: str | None = None) -> str:
    """A local folder for `source`: itself if it exists, else a download of the Hub repo (subfolder).
    A missing folder (absolute, relative to an existing folder, under the notebooks' default root `ROOT`
    even where that does not exist yet, or starting with . or ~) is not sent to the Hub as a repo id;
    either way a failure says what was looked for and `hint`, what to do."""
    local = Path(source).expanduser() / subfolder if subfolder else Path(source).expanduser()
    if local.exists():
        return str(local)
    if looks_local(source) or Path(source).parent.exists() or Path(source).parts[:1] == (ROOT,):
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


def write_model_card(folder: str | Path, title: str, about: str, base_model: str, data: str, settings: dict,
                     metrics: dict) -> None:  # fmt: skip
    """A `README.md` model card (huggingface_hub's `ModelCard`) in a checkpoint folder: what the model is,
    what it was trained from and on, its settings and headline figures. Local paths are named in the text
    but kept out of the card's metadata, which takes Hub ids only."""
    from huggingface_hub import ModelCard, ModelCardData

    hub = lambda s: s if s and not looks_local(s) else None
    meta = ModelCardData(
        base_model=hub(base_model), datasets=[hub(data)] if hub(data) else None, library_name="transformers",
        tags=["warp", "rlhf", "imdb", "sentiment"],
    )  # fmt: skip
    rows = "\n".join(
        f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()
    )
    text = (
        f"---\n{meta.to_yaml()}\n---\n\n# {title}\n\n{about}\n\n"
        f"- base model: `{base_model}`\n- data: `{data}`\n\n"
        f"## Headline figures\n\n| metric | value |\n|---|---|\n{rows}\n\n"
        f"## Settings\n\n```json\n{to_json(settings)}\n```\n"
    )
    atomic_write_text(Path(folder) / "README.md", str(ModelCard(text)))


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
    if "cuda" in state and torch.cuda.is_available():  # a new session may have fewer GPUs than the old
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


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
    atomic_torch_save({**state, **extra}, path.with_name(path.name + ".new"))
    if path.exists():
        os.replace(path, previous(path))
    os.replace(path.with_name(path.name + ".new"), path)


def progress_entry(path: str | Path, key: str):
    """One small entry of a `save_progress` file (its step, its precision), memory-mapped so that the GBs of
    tensors beside it are not read; None when the file lacks it."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(key)


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
            state = torch.load(candidate, map_location="cpu", weights_only=True)  # no code runs
            break
        except Exception as e:
            errors.append(f"{candidate} is damaged ({type(e).__name__}: {_first_line(e)})")
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
