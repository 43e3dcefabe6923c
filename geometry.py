"""The geometry of a merge: the angles between the M runs' task vectors theta_m - theta_init (per tensor
and taken whole) and the norm ratios of SLERP and LERP to the runs' task vectors (paper, fig. 11).

What an iteration's merge.json records (`merge_diagnostics`, written by `warp.warp`) and what the offline
study tabulates; the merge itself is `utils.slerp`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

import utils


def task_vector_angles(init: dict[str, Tensor], policies: list[dict[str, Tensor]]) -> dict[str, float]:
    """Per-tensor angle in degrees between the task vectors of the first two policies (tied once).

    NaN where a task vector is zero (the angle is undefined there).
    """
    if len(policies) < 2:
        raise ValueError("angles need at least two policies")
    utils._refuse_lora_factors(init)
    out = {}
    for key in utils._unique_keys(init):
        if not init[key].is_floating_point():
            continue
        base = init[key].float()
        d1 = (policies[0][key].to(base.device, torch.float32) - base).flatten()
        d2 = (policies[1][key].to(base.device, torch.float32) - base).flatten()
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


def task_vector_geometry(
    init: dict[str, Tensor], policies: list[dict[str, Tensor]], merged: dict[str, Tensor] | None = None
) -> dict[str, float]:
    """Task vectors theta_m - init taken whole, flattened over all parameters (tied tensors once), as the
    merging literature measures them (`angle_summary` averages per-tensor angles, each tensor counting
    once whatever its size):

    - "angle/flat": angle in degrees between the first two policies' task vectors;
    - "norm_ratio/slerp": ||merged - init|| / mean_m ||theta_m - init||, `merged` = `slerp(init, policies)`
      unless given; ~1 (SLERP keeps the norm of equal-norm task vectors);
    - "norm_ratio/lerp": the same for the mean of the policies, cos(Omega / 2) for two at angle Omega
      (paper, fig. 11). NaN where undefined (a zero task vector).
    """
    if len(policies) < 2:
        raise ValueError("task-vector geometry needs at least two policies")
    merged = utils.slerp(init, policies) if merged is None else merged
    sq = torch.zeros(len(policies), dtype=torch.float64)  # ||d_m||^2, summed over tensors
    dot = slerp_sq = lerp_sq = 0.0
    for key in utils._unique_keys(init):
        if not init[key].is_floating_point():
            continue
        base = init[key].double()
        ds = [(pol[key].to(base.device, torch.float64) - base).flatten() for pol in policies]
        sq += torch.stack([d @ d for d in ds]).cpu()
        dot += float(ds[0] @ ds[1])
        slerp_sq += float((merged[key].to(base.device, torch.float64) - base).square().sum())
        lerp_sq += float(torch.stack(ds).mean(0).square().sum())
    norms = sq.sqrt()
    mean_norm = float(norms.mean())
    nan = float("nan")
    cos = dot / float(norms[0] * norms[1]) if norms[0] > 0 and norms[1] > 0 else nan
    return {
        "angle/flat": math.degrees(math.acos(max(-1.0, min(1.0, cos)))) if cos == cos else nan,
        "norm_ratio/slerp": math.sqrt(slerp_sq) / mean_norm if mean_norm > 0 else nan,
        "norm_ratio/lerp": math.sqrt(lerp_sq) / mean_norm if mean_norm > 0 else nan,
    }


def merge_diagnostics(init: dict[str, Tensor], policies: list[dict[str, Tensor]], merged) -> dict[str, float]:
    """What a merge's merge.json records: `angle_summary` of the per-tensor angles and `task_vector_geometry`
    (flat angle, SLERP's and LERP's norm ratios); nothing for a single run."""
    if len(policies) < 2:
        return {}
    return {
        **angle_summary(task_vector_angles(init, policies)),
        **task_vector_geometry(init, policies, merged),
    }
