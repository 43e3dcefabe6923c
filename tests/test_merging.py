"""Properties of the merging primitives: EMA anchor, SLERP of task vectors, LITI, task-vector angles."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import geometry
import utils

# ------------------------------------------------------------------------------------------------------
# Helpers: an independent float64 SLERP straight from the paper's formula, and vector construction
# ------------------------------------------------------------------------------------------------------


def ref_slerp(d1: torch.Tensor, d2: torch.Tensor, lam: float) -> torch.Tensor:
    """Paper's SLERP of two task vectors, in float64: sin((1-l)W)/sin(W) d1 + sin(lW)/sin(W) d2."""
    a, b = d1.double().flatten(), d2.double().flatten()
    omega = math.acos(max(-1.0, min(1.0, float(a @ b / (a.norm() * b.norm())))))
    w1, w2 = math.sin((1 - lam) * omega) / math.sin(omega), math.sin(lam * omega) / math.sin(omega)
    return (w1 * d1.double() + w2 * d2.double()).reshape(d1.shape)


def orthonormal(n: int, dim: int = 64, seed: int = 0) -> list[torch.Tensor]:
    """n orthonormal float32 vectors of length dim (QR of a random matrix)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, n, generator=g, dtype=torch.float64))
    return [q[:, i].float() for i in range(n)]


def at_angle(degrees: float, dim: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two unit float32 vectors at the given angle."""
    e1, e2 = orthonormal(2, dim, seed)
    rad = math.radians(degrees)
    return e1, math.cos(rad) * e1 + math.sin(rad) * e2


def angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return math.degrees(math.acos(max(-1.0, min(1.0, float(a @ b / (a.norm() * b.norm()))))))


def merge_one(init: torch.Tensor, *policies: torch.Tensor) -> torch.Tensor:
    """utils.slerp on a single-tensor state."""
    return utils.slerp({"w": init}, [{"w": p} for p in policies])["w"]


# ------------------------------------------------------------------------------------------------------
# SLERP: lambda endpoints and M = 1
# ------------------------------------------------------------------------------------------------------


def test_slerp_pair_lambda_zero_and_one_are_the_endpoints():
    """SLERP at lambda 0 returns d1 and at lambda 1 returns d2, exactly."""
    d1, d2 = at_angle(70.0)
    d1, d2 = 3.0 * d1, 0.5 * d2
    assert torch.equal(utils._slerp_pair(d1, d2, 0.0), d1)
    assert torch.equal(utils._slerp_pair(d1, d2, 1.0), d2)


def test_slerp_single_policy_returns_the_policy():
    """With M = 1 the merge is the policy itself (lambda = 1/1), not init and not a shrunk copy."""
    torch.manual_seed(0)
    init = torch.randn(40, 8)
    policy = init + 1e-3 * torch.randn(40, 8)
    assert torch.equal(merge_one(init, policy), policy)


# ------------------------------------------------------------------------------------------------------
# SLERP: norm preservation, the formula, acos of a normalised dot product
# ------------------------------------------------------------------------------------------------------


def test_slerp_two_orthogonal_task_vectors_keep_their_norm():
    """Orthogonal task vectors of equal norm merge to a task vector of the same norm (LERP gives 0.71x)."""
    e1, e2 = orthonormal(2)
    init = torch.randn(64)
    r = 0.37
    merged = merge_one(init, init + r * e1, init + r * e2)
    tv = (merged - init).double()
    assert tv.norm().item() == pytest.approx(r, rel=1e-4)
    # and it bisects the two: 45 degrees from each (a LERP would have norm r / sqrt(2) = 0.71 r)
    assert angle_deg(tv, e1) == pytest.approx(45.0, abs=1e-2)
    assert angle_deg(tv, e2) == pytest.approx(45.0, abs=1e-2)
    lerp_norm = (0.5 * r * (e1 + e2)).double().norm().item()
    assert lerp_norm == pytest.approx(r / math.sqrt(2), rel=1e-4)
    assert abs(tv.norm().item() - lerp_norm) > 0.25 * r


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
def test_slerp_norm_preserved_at_60_degrees_for_tiny_and_huge_norms(scale):
    """The angle is acos of a NORMALISED dot product: 60-degree task vectors keep their norm at any scale."""
    d1, d2 = at_angle(60.0)
    init = torch.full((64,), 2.0)
    merged = merge_one(init, init + scale * d1, init + scale * d2)
    tv = merged.double() - init.double()
    # an unnormalised dot product clamps cos to 1 (huge) or ~0 (tiny): the norm would be 0.87x or 1.15x
    assert tv.norm().item() == pytest.approx(scale, rel=1e-3)
    assert angle_deg(tv, d1) == pytest.approx(30.0, abs=0.1)


def test_slerp_two_policies_matches_the_paper_formula():
    """For M = 2 the merged task vector is the paper's SLERP at lambda = 1/2 (unequal norms, any angle)."""
    torch.manual_seed(1)
    init = torch.randn(16, 12)
    d1, d2 = 0.1 * torch.randn(16, 12), 0.3 * torch.randn(16, 12) + 0.05
    merged = merge_one(init, init + d1, init + d2)
    torch.testing.assert_close(merged.double() - init.double(), ref_slerp(d1, d2, 0.5), rtol=1e-5, atol=1e-6)


def test_slerp_two_policies_is_symmetric():
    """Swapping the two policies does not change the merge (lambda = 1/2 is symmetric)."""
    torch.manual_seed(2)
    init = {"a": torch.randn(10, 6), "b": torch.randn(7)}
    p1 = {k: v + 0.1 * torch.randn_like(v) for k, v in init.items()}
    p2 = {k: v + 0.2 * torch.randn_like(v) for k, v in init.items()}
    m12, m21 = utils.slerp(init, [p1, p2]), utils.slerp(init, [p2, p1])
    for k in init:
        torch.testing.assert_close(m12[k], m21[k], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------
# SLERP: the 1/m fold for M > 2
# ------------------------------------------------------------------------------------------------------


def test_slerp_three_policies_fold_with_weight_one_over_m():
    """M = 3 folds as slerp(slerp(d1, d2, 1/2), d3, 1/3), not with lambda = 1/M at every fold."""
    torch.manual_seed(3)
    init = torch.randn(48)
    d1, d2, d3 = 0.2 * torch.randn(48), 0.3 * torch.randn(48), 0.25 * torch.randn(48)
    merged = merge_one(init, init + d1, init + d2, init + d3).double() - init.double()

    by_hand = ref_slerp(ref_slerp(d1, d2, 1 / 2).float(), d3, 1 / 3)
    torch.testing.assert_close(merged, by_hand, rtol=1e-4, atol=1e-6)

    wrong = ref_slerp(ref_slerp(d1, d2, 1 / 3).float(), d3, 1 / 3)  # lambda = 1/M at every fold
    assert (merged - wrong).norm() > 0.05 * merged.norm()


def test_slerp_three_orthogonal_task_vectors_do_not_count_equally():
    """Three orthogonal unit task vectors get coefficients sin(60)/sqrt2, sin(60)/sqrt2 and sin(30): the 1/m
    fold is not a mean (that would be 1/3 each, of norm 0.58); the norm of equal-norm vectors is kept."""
    e1, e2, e3 = orthonormal(3)
    init = torch.zeros(64) + 0.5
    merged = merge_one(init, init + e1, init + e2, init + e3).double() - init.double()
    coefs = [float(merged @ e.double()) for e in (e1, e2, e3)]
    expected = [math.sin(math.pi / 3) / math.sqrt(2)] * 2 + [0.5]
    assert coefs == pytest.approx(expected, abs=1e-4)
    assert merged.norm().item() == pytest.approx(1.0, rel=1e-4)  # norm kept at every fold


# ------------------------------------------------------------------------------------------------------
# SLERP: LERP fallback, task vectors vs full weights, per-tensor merge
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    ["parallel", "opposite", "second_zero", "first_zero", "both_zero", "nearly_parallel"],
)
def test_slerp_falls_back_to_lerp_for_collinear_or_zero_task_vectors(case):
    """Collinear or zero task vectors give the linear interpolation (d1 + d2) / 2, finite, no NaN."""
    torch.manual_seed(4)
    init = torch.randn(32)
    d = torch.randn(32) * 0.1
    d1, d2 = {
        "parallel": (d, 2.0 * d),
        "opposite": (d, -d),
        "second_zero": (d, torch.zeros(32)),
        "first_zero": (torch.zeros(32), d),
        "both_zero": (torch.zeros(32), torch.zeros(32)),
        "nearly_parallel": (d, d * 1.5 + 1e-9 * torch.randn(32)),
    }[case]
    merged = merge_one(init, init + d1, init + d2)
    assert torch.isfinite(merged).all()
    torch.testing.assert_close(merged, init + 0.5 * (d1 + d2), rtol=1e-5, atol=1e-6)


def test_slerp_merges_task_vectors_not_full_weights():
    """With init far from the origin the merge is init + slerp(d1, d2), not slerp(theta1, theta2)."""
    e1, e2 = orthonormal(2)
    init = torch.full((64,), 10.0) + 0.1 * torch.randn(64)
    theta1, theta2 = init + e1, init + e2
    merged = merge_one(init, theta1, theta2).double()

    expected = init.double() + ref_slerp(e1, e2, 0.5)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)

    full_weights = ref_slerp(theta1, theta2, 0.5)  # nearly collinear weights: behaves like LERP
    assert (merged - full_weights).norm() > 0.1
    assert (merged - init.double()).norm().item() == pytest.approx(1.0, rel=1e-4)


def test_slerp_is_applied_tensor_by_tensor():
    """Each parameter tensor is merged with its own angle ("layer by layer"), not one global angle."""
    e1, e2 = orthonormal(2, dim=32, seed=5)
    f1, f2 = at_angle(20.0, dim=16, seed=6)
    init = {"a": torch.zeros(32) + 1.0, "b": torch.zeros(4, 4) - 1.0}
    p1 = {"a": init["a"] + 5.0 * e1, "b": init["b"] + 0.01 * f1.reshape(4, 4)}
    p2 = {"a": init["a"] + 5.0 * e2, "b": init["b"] + 0.01 * f2.reshape(4, 4)}
    out = utils.slerp(init, [p1, p2])
    for k in init:
        d1, d2 = p1[k] - init[k], p2[k] - init[k]
        torch.testing.assert_close(
            out[k].double(), init[k].double() + ref_slerp(d1, d2, 0.5), rtol=1e-5, atol=1e-6
        )


# ------------------------------------------------------------------------------------------------------
# SLERP: dtypes, inputs untouched, tied weights, non-float tensors, errors
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_slerp_half_precision_computes_in_float32_and_returns_input_dtype(dtype):
    """bf16/fp16 states merge in float32 (then cast back): the result equals the float32 merge, cast."""
    torch.manual_seed(7)
    init = torch.randn(2048).to(dtype)
    p1 = (init.float() + 0.01 * torch.randn(2048)).to(dtype)
    p2 = (init.float() + 0.01 * torch.randn(2048)).to(dtype)
    merged = merge_one(init, p1, p2)
    assert merged.dtype == dtype

    d1, d2 = p1.float() - init.float(), p2.float() - init.float()
    expected = (init.float() + utils._slerp_pair(d1, d2, 0.5)).to(dtype)
    assert torch.equal(merged, expected)
    # power check: doing the arithmetic in the half dtype gives visibly different numbers
    n1, n2 = (p1 - init).norm(), (p2 - init).norm()
    omega = torch.arccos((p1 - init).flatten() @ (p2 - init).flatten() / (n1 * n2))
    w = torch.sin(0.5 * omega) / torch.sin(omega)
    in_half = init + w * (p1 - init) + w * (p2 - init)
    assert not torch.equal(in_half, expected)


def test_slerp_and_liti_never_modify_their_inputs():
    """slerp and liti leave init and every policy state bit-for-bit unchanged."""
    torch.manual_seed(8)
    init = {"w": torch.randn(5, 5), "b": torch.randn(5), "i": torch.arange(5)}
    pols = [
        {k: (v + torch.randn_like(v.float()) if v.is_floating_point() else v + 1) for k, v in init.items()}
    ]
    pols.append({k: (v * 2 if v.is_floating_point() else v) for k, v in init.items()})
    before = copy.deepcopy((init, pols))
    merged = utils.slerp(init, pols)
    merged_before = copy.deepcopy(merged)
    utils.liti(init, merged, 0.3)
    for a, b in zip([init, *pols, merged], [before[0], *before[1], merged_before], strict=True):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    for k in init:  # the output is a new tensor, never an alias of an input
        assert merged[k].data_ptr() != init[k].data_ptr()


def test_slerp_copies_non_float_tensors_from_init():
    """Integer / bool tensors (buffers, indices) are copied from init, not interpolated."""
    init = {"w": torch.zeros(4), "idx": torch.arange(6), "flag": torch.tensor([True, False])}
    p1 = {"w": torch.ones(4), "idx": torch.arange(6) * 3, "flag": torch.tensor([False, False])}
    p2 = {"w": -torch.ones(4), "idx": torch.arange(6) + 9, "flag": torch.tensor([True, True])}
    out = utils.slerp(init, [p1, p2])
    assert torch.equal(out["idx"], init["idx"]) and out["idx"].dtype == torch.long
    assert torch.equal(out["flag"], init["flag"]) and out["flag"].dtype == torch.bool
    assert out["idx"] is not init["idx"]
    lit = utils.liti(init, out, 0.5)
    assert torch.equal(lit["idx"], init["idx"]) and lit["idx"].dtype == torch.long


def _tied_states(make_gpt2):
    """state_of a tied GPT-2 (init) and of two perturbed copies (policies), and the model."""
    model = make_gpt2(seed=0)
    init = utils.state_of(model)
    pols = []
    for s in (1, 2):
        pol = copy.deepcopy(model)
        g = torch.Generator().manual_seed(s)
        with torch.no_grad():
            for p in pol.parameters():  # deduplicated: the tied tensor is perturbed once
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        pols.append(utils.state_of(pol))
    return model, init, pols


def test_state_of_keeps_gpt2_tied_weights_as_one_tensor(make_gpt2):
    """state_of of a tied GPT-2 lists wte and lm_head, as one shared tensor, detached from the model."""
    model = make_gpt2()
    state = utils.state_of(model)
    assert state["lm_head.weight"] is state["transformer.wte.weight"]
    assert not state["lm_head.weight"].requires_grad
    with torch.no_grad():
        model.transformer.wte.weight.add_(1.0)
    assert not torch.equal(state["transformer.wte.weight"], model.transformer.wte.weight)  # a copy


def test_slerp_tied_weights_merged_once_and_stay_tied(make_gpt2):
    """GPT-2's tied wte/lm_head are merged once: both keys hold the same tensor, equal to the formula."""
    model, init, pols = _tied_states(make_gpt2)
    out = utils.slerp(init, pols)
    wte, head = "transformer.wte.weight", "lm_head.weight"
    assert set(out) == set(init)
    assert out[wte] is out[head] or (
        torch.equal(out[wte], out[head]) and out[wte].data_ptr() == out[head].data_ptr()
    )
    d1, d2 = pols[0][wte] - init[wte], pols[1][wte] - init[wte]
    torch.testing.assert_close(
        out[wte].double(), init[wte].double() + ref_slerp(d1, d2, 0.5), rtol=1e-5, atol=1e-6
    )
    # loading the merge keeps the model tied and puts the merged values in both places
    utils.load_state(model, out)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.lm_head.weight, out[head])


def test_load_state_round_trip_and_missing_keys(make_gpt2):
    """load_state(state_of(a)) makes b equal to a; a state lacking a parameter is an error."""
    a, b = make_gpt2(seed=0), make_gpt2(seed=1)
    utils.load_state(b, utils.state_of(a))
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb)
    state = utils.state_of(a)
    del state["transformer.h.0.ln_1.weight"]
    with pytest.raises(KeyError):
        utils.load_state(b, state)


def test_slerp_refuses_lora_factors():
    """LoRA A and B are never SLERPed one by one (SPEC 3): slerp of a LoRA state is a ValueError."""
    g = torch.Generator().manual_seed(10)
    key = "base_model.model.transformer.h.0.attn.c_attn"
    a, b, w = f"{key}.lora_A.default.weight", f"{key}.lora_B.default.weight", f"{key}.base_layer.weight"
    init = {
        w: torch.randn(12, 8, generator=g),
        a: 0.1 * torch.randn(2, 8, generator=g),
        b: torch.zeros(12, 2),
    }
    pols = [
        {
            w: init[w],
            a: init[a] + 0.1 * torch.randn(2, 8, generator=g),
            b: 0.1 * torch.randn(12, 2, generator=g),
        }
        for _ in range(2)
    ]
    # why it matters: the product of per-factor SLERPs is not the SLERP of the weight updates B A
    upd = [p[b] @ p[a] for p in pols]
    per_factor = ref_slerp(pols[0][b], pols[1][b], 0.5) @ (
        init[a].double() + ref_slerp(*(p[a] - init[a] for p in pols), 0.5)
    )
    assert (per_factor - ref_slerp(upd[0], upd[1], 0.5)).norm() > 0.05 * upd[0].norm()
    with pytest.raises(ValueError, match="(?i)lora"):
        utils.slerp(init, pols)


def test_slerp_rejects_no_policies_and_mismatched_keys():
    """slerp with no policy, or with a policy whose keys differ from init, is an error."""
    init = {"w": torch.zeros(3)}
    with pytest.raises(ValueError):
        utils.slerp(init, [])
    with pytest.raises(KeyError):
        utils.slerp(init, [{"v": torch.zeros(3)}])


# ------------------------------------------------------------------------------------------------------
# LITI
# ------------------------------------------------------------------------------------------------------


def test_liti_endpoints_and_weight_direction():
    """LITI: eta 0 gives init, eta 1 gives the merge, eta 0.3 gives 0.7 init + 0.3 merge (not flipped)."""
    torch.manual_seed(9)
    init = {"w": torch.randn(6, 4), "b": torch.randn(4)}
    merged = {k: v + torch.randn_like(v) for k, v in init.items()}
    zero, one, mid = (utils.liti(init, merged, eta) for eta in (0.0, 1.0, 0.3))
    for k in init:
        assert torch.equal(zero[k], init[k])
        assert torch.equal(one[k], merged[k])
        torch.testing.assert_close(mid[k], 0.7 * init[k] + 0.3 * merged[k], rtol=1e-6, atol=1e-6)
        flipped = 0.3 * init[k] + 0.7 * merged[k]
        assert (mid[k] - flipped).abs().max() > 0.1


def test_liti_tied_weights_and_dtype(make_gpt2):
    """LITI on a tied GPT-2 state keeps wte and lm_head one value, and keeps a bf16 state in bf16."""
    _, init, pols = _tied_states(make_gpt2)
    out = utils.liti(init, pols[0], 0.5)
    assert torch.equal(out["lm_head.weight"], out["transformer.wte.weight"])
    assert out["lm_head.weight"].data_ptr() == out["transformer.wte.weight"].data_ptr()
    half = {k: v.to(torch.bfloat16) for k, v in {"w": torch.randn(8)}.items()}
    half_merged = {"w": (half["w"].float() + 1).to(torch.bfloat16)}
    res = utils.liti(half, half_merged, 0.25)["w"]
    assert res.dtype == torch.bfloat16
    assert torch.equal(res, torch.lerp(half["w"].float(), half_merged["w"].float(), 0.25).to(torch.bfloat16))


def test_liti_follows_the_device_of_init():
    """The Pareto front mixes a policy already on the GPU with a merge loaded on the CPU: LITI computes on
    init's device (a `meta` init stands in for the GPU here) instead of failing on mixed devices."""
    init = {"w": torch.empty(4, device="meta")}
    out = utils.liti(init, {"w": torch.randn(4)}, 0.5)
    assert out["w"].device.type == "meta" and out["w"].shape == (4,)


# ------------------------------------------------------------------------------------------------------
# EMA anchor
# ------------------------------------------------------------------------------------------------------


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tie", [True, False])
def test_ema_update_moves_the_anchor_by_mu_of_the_gap(make_gpt2, tie):
    """anchor <- anchor + mu (policy - anchor): mu 0 keeps it, mu 1 copies the policy, mu 0.25 a quarter."""
    anchor, policy = make_gpt2(seed=0, tie=tie), make_gpt2(seed=1, tie=tie)
    pol = _params(policy)

    a0 = _params(anchor)
    utils.ema_update(anchor, policy, 0.0)
    for n, p in anchor.named_parameters():
        assert torch.equal(p, a0[n]), n

    utils.ema_update(anchor, policy, 0.25)
    for n, p in anchor.named_parameters():
        # with tied weights a double update would move wte by 1 - 0.75^2 = 0.44 of the gap
        torch.testing.assert_close(p, a0[n] + 0.25 * (pol[n] - a0[n]), rtol=1e-6, atol=1e-6)
    if tie:
        assert anchor.lm_head.weight is anchor.transformer.wte.weight

    utils.ema_update(anchor, policy, 1.0)
    for n, p in anchor.named_parameters():
        assert torch.equal(p, pol[n]), n
    for n, p in policy.named_parameters():  # the policy is never touched
        assert torch.equal(p, pol[n]), n


def test_ema_update_repeated_steps_follow_the_closed_form(make_gpt2):
    """k EMA steps towards a fixed policy leave (1 - mu)^k of the initial gap."""
    anchor, policy = make_gpt2(seed=0), make_gpt2(seed=1)
    a0, pol = _params(anchor), _params(policy)
    mu, k = 0.1, 5
    for _ in range(k):
        utils.ema_update(anchor, policy, mu)
    for n, p in anchor.named_parameters():
        torch.testing.assert_close(p, pol[n] + (1 - mu) ** k * (a0[n] - pol[n]), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------
# Task-vector angles
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda e1, e2: (e1, e2), 90.0),
        (lambda e1, e2: (e1, e1), 0.0),
        (lambda e1, e2: (e1, -e1), 180.0),
        (lambda e1, e2: (e1, 3.0 * e1 + 5.0 * e2), math.degrees(math.atan2(5.0, 3.0))),
    ],
    ids=["orthogonal", "identical", "opposite", "oblique"],
)
@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e5])
def test_task_vector_angles_known_angles_at_any_scale(make, expected, scale):
    """Angles in degrees: orthogonal 90, identical 0, opposite 180, oblique exact, for tiny and huge norms."""
    e1, e2 = orthonormal(2, dim=24)
    d1, d2 = make(e1, e2)
    init = {"w": torch.full((24,), 3.0)}
    pols = [{"w": init["w"] + scale * d1}, {"w": init["w"] + scale * d2}]
    got = geometry.task_vector_angles(init, pols)["w"]
    # 1e-4-scale vectors on a base of 3.0 lose bits in float32: a looser tolerance there
    assert got == pytest.approx(expected, abs=0.5 if scale < 1e-3 else 0.05)


def test_task_vector_angles_use_task_vectors_not_weights():
    """The angle is between theta_m - init, not between the weights (which are nearly parallel)."""
    e1, e2 = orthonormal(2, dim=24)
    init = {"w": torch.full((24,), 10.0)}
    got = geometry.task_vector_angles(init, [{"w": init["w"] + e1}, {"w": init["w"] + e2}])["w"]
    assert got == pytest.approx(90.0, abs=0.05)


def test_task_vector_angles_tied_once_ints_skipped_zero_nan(make_gpt2):
    """Tied GPT-2 weights get one angle, integer tensors none, a zero task vector NaN."""
    _, init, pols = _tied_states(make_gpt2)
    angles = geometry.task_vector_angles(init, pols)
    assert ("transformer.wte.weight" in angles) != ("lm_head.weight" in angles)
    assert len(angles) == len(list(make_gpt2().parameters()))  # one per distinct parameter
    assert all(0.0 < v < 180.0 for v in angles.values())

    init2 = {"w": torch.zeros(4), "i": torch.arange(4), "z": torch.ones(3)}
    pols2 = [{"w": torch.tensor([1.0, 0, 0, 0]), "i": torch.arange(4), "z": torch.ones(3)}] * 2
    angles2 = geometry.task_vector_angles(init2, pols2)
    assert "i" not in angles2
    assert angles2["w"] == pytest.approx(0.0, abs=0.05)
    assert math.isnan(angles2["z"])
    with pytest.raises(ValueError):
        geometry.task_vector_angles(init2, pols2[:1])


def test_angle_summary_mean_min_max_ignoring_nan():
    """angle_summary gives mean/min/max over defined angles; all-undefined gives NaN."""
    s = geometry.angle_summary({"a": 30.0, "b": 90.0, "c": float("nan"), "d": 60.0})
    assert s == {"angle/mean": pytest.approx(60.0), "angle/min": 30.0, "angle/max": 90.0}
    empty = geometry.angle_summary({"a": float("nan")})
    assert all(math.isnan(v) for v in empty.values())


def test_slerp_of_two_is_symmetric_and_of_three_depends_on_the_order():
    """What does hold of the 1/m fold: the merge of two runs is the same in either order; of three, the
    last one folded in gets the smallest share, so the order changes the merge (0.61/0.61/0.50)."""
    torch.manual_seed(5)
    init = torch.randn(40)
    d = [0.1 * torch.randn(40) for _ in range(3)]
    two = merge_one(init, init + d[0], init + d[1]), merge_one(init, init + d[1], init + d[0])
    torch.testing.assert_close(*two, rtol=1e-5, atol=1e-6)
    e1, e2, e3 = orthonormal(3)
    init = torch.zeros(64)
    abc = merge_one(init, init + e1, init + e2, init + e3).double()
    cab = merge_one(init, init + e3, init + e1, init + e2).double()
    assert float(abc @ e3.double()) == pytest.approx(0.5, abs=1e-4)  # e3 folded in last
    assert float(cab @ e3.double()) == pytest.approx(math.sin(math.pi / 3) / math.sqrt(2), abs=1e-4)
    assert (abc - cab).norm() > 0.1


# ------------------------------------------------------------------------------------------------------
# Task-vector geometry: the flat angle and the norms of the SLERP and LERP merges
# ------------------------------------------------------------------------------------------------------


def _split(v: torch.Tensor, sizes: list[int]) -> dict[str, torch.Tensor]:
    """A flat vector cut into named tensors t0, t1, ... of the given sizes."""
    return {f"t{i}": part.clone() for i, part in enumerate(torch.split(v, sizes))}


@pytest.mark.parametrize("degrees", [30.0, 90.0, 150.0])
def test_task_vector_geometry_of_two_equal_norm_task_vectors(degrees):
    """Equal-norm task vectors at Omega in every tensor: the flat angle is Omega, SLERP keeps the norm
    (ratio 1), LERP shrinks it to cos(Omega / 2) (0.707 at 90 degrees)."""
    sizes = [24, 24, 16]
    d1, d2 = zip(*(at_angle(degrees, dim=s, seed=i) for i, s in enumerate(sizes)), strict=True)
    init = _split(torch.full((64,), 2.0), sizes)
    pols = [{k: init[k] + d[i] for i, k in enumerate(init)} for d in (d1, d2)]
    got = geometry.task_vector_geometry(init, pols)
    assert got["angle/flat"] == pytest.approx(degrees, abs=0.01)
    assert got["norm_ratio/slerp"] == pytest.approx(1.0, abs=1e-5)
    assert got["norm_ratio/lerp"] == pytest.approx(math.cos(math.radians(degrees) / 2), abs=1e-5)


def test_flat_angle_weights_tensors_by_size_unlike_the_per_tensor_mean():
    """A large tensor whose task vectors are 2 degrees apart and a small one where they are orthogonal:
    the flat angle is small (the large tensor dominates), the mean of per-tensor angles about 46 degrees,
    so computing one where the other is asked fails."""
    big1, big2 = at_angle(2.0, dim=1000, seed=1)
    small1, small2 = at_angle(90.0, dim=10, seed=2)
    init = {"big": torch.zeros(1000), "small": torch.zeros(10)}
    pols = [{"big": 10.0 * big1, "small": 0.1 * small1}, {"big": 10.0 * big2, "small": 0.1 * small2}]
    flat = geometry.task_vector_geometry(init, pols)["angle/flat"]
    a, b = torch.cat([10.0 * big1, 0.1 * small1]).double(), torch.cat([10.0 * big2, 0.1 * small2]).double()
    assert flat == pytest.approx(angle_deg(a, b), abs=1e-3) and flat < 3.0
    mean = geometry.angle_summary(geometry.task_vector_angles(init, pols))["angle/mean"]
    assert mean == pytest.approx(46.0, abs=0.01)


def test_task_vector_geometry_counts_tied_weights_once_and_uses_a_given_merge(make_gpt2):
    """GPT-2's tied wte/lm_head enters the flat vectors once: the angle equals the one over the model's
    distinct parameters, where wte's task vectors are orthogonal and every other tensor's identical (a
    second copy of wte would change it). A given `merged` is the one measured."""
    model = make_gpt2(seed=0)
    init = utils.state_of(model)
    g = torch.Generator().manual_seed(3)
    shared = {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in init.items()}
    wte = init["transformer.wte.weight"]
    e1, e2 = orthonormal(2, dim=wte.numel(), seed=4)
    pols = []
    for e in (e1, e2):
        pol = {
            k: v + shared[k] for k, v in init.items() if k not in ("transformer.wte.weight", "lm_head.weight")
        }
        pol["transformer.wte.weight"] = pol["lm_head.weight"] = wte + e.reshape(wte.shape)
        pols.append(pol)
    names = [n for n, _ in model.named_parameters()]  # distinct parameters: the tied one once
    flat = [torch.cat([(p[n] - init[n]).double().flatten() for n in names]) for p in pols]
    got = geometry.task_vector_geometry(init, pols)
    assert got["angle/flat"] == pytest.approx(angle_deg(*flat), abs=1e-3)
    twice = [
        torch.cat([f, (p["lm_head.weight"] - wte).double().flatten()])
        for f, p in zip(flat, pols, strict=True)
    ]
    assert abs(angle_deg(*twice) - angle_deg(*flat)) > 1.0  # the test can tell
    assert geometry.task_vector_geometry(init, pols, merged=init)["norm_ratio/slerp"] == 0.0


def test_task_vector_geometry_zero_task_vector_is_nan_and_one_policy_refused():
    init = {"w": torch.zeros(4), "i": torch.arange(4)}
    pols = [{"w": torch.zeros(4), "i": torch.arange(4)}, {"w": torch.ones(4), "i": torch.arange(4)}]
    got = geometry.task_vector_geometry(init, pols)
    assert math.isnan(got["angle/flat"]) and got["norm_ratio/lerp"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        geometry.task_vector_geometry(init, pols[:1])
