"""What every benchmark needs about the machine it runs on: a description to print beside its figures,
a device sync for timing, peak memory, and the measured matmul throughput that MFU is taken against."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def describe() -> dict:
    """The CPU, its cores, torch's threads, the GPU(s) and the versions that decide the speed."""
    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "gpus": torch.cuda.device_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "transformers": transformers.__version__,
        "trl": trl_version,
    }


def line(m: dict, threads: int) -> str:
    """'Machine: CPU, cores (threads), GPU; torch, transformers' from `describe()`."""
    return (
        f"Machine: {m['cpu']}, {m['cores']} cores ({threads} torch threads), GPU: {m['gpu']}; "
        f"torch {m['torch']}, transformers {m['transformers']}"
    )


def sync() -> None:
    """Wait for the GPU's queued work (nothing on the CPU), so a timer measures work done, not issued."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory() -> tuple[int, str]:
    """Peak memory of this process in bytes, and what was measured: torch.cuda.max_memory_allocated on a
    GPU, else the peak RSS."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "GPU max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS"


def matmul_peak(smoke: bool) -> dict:
    """This machine's measured matmul throughput (FLOP/s): the best of a few large square matmuls, fp32
    on the CPU; fp32 and bf16 on a GPU."""
    import torch

    sizes = (1024,) if smoke else (2048, 3072, 4096)
    repeats = 1 if smoke else 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
    out = {"device": device, "sizes": list(sizes)}
    for dtype in dtypes:
        best = 0.0
        for n in sizes:
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            a @ b  # warm-up
            for _ in range(repeats):
                sync()
                start = time.perf_counter()
                a @ b
                sync()
                best = max(best, 2 * n**3 / (time.perf_counter() - start))
        out[str(dtype).replace("torch.", "")] = best
    return out
