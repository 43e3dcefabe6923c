"""The RL step and Algorithm 1: direction of the update, EMA anchor, resume, parallel runs, merges."""

import copy
import dataclasses
import json

import pytest
import torch

import checkpoints
import config
import runs
import utils
import warp
from tests import tiny


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny SFT, reward model and review folder on disk, loaded through the real code paths."""
    d = tmp_path_factory.mktemp("assets")
    (d / "data").mkdir()
    with open(d / "data" / "train.jsonl", "w") as f:
        for i, text in enumerate(tiny.corpus(120)):
            f.write(json.dumps({"text": text, "label": i % 2}) + "\n")
    return {
        "sft": tiny.save_tiny_policy(d / "sft"),
        "reward_model": tiny.save_tiny_reward(d / "rm"),
        "data": str(d / "data"),
    }


def make_cfg(assets, out_dir, **kw):
    base = dict(steps=3, batch_size=8, max_new_tokens=5, prompt_tokens=4, save_every=1, cpu_threads=1)
    return config.WarpConfig.for_preset("offline", **assets, out_dir=str(out_dir), **{**base, **kw})


def prompts_of(cfg):
    _, tok = utils.load_policy(cfg.sft)
    return warp.training_prompts(cfg, tok)[0]


def expected_target_prob(policy, prompt_ids, prompt_mask, target, temperature):
    """E_x[pi(y in target | x)]: the exact expected reward of one-token completions rewarded 1 in `target`."""
    dummy = torch.zeros(prompt_ids.shape[0], 1, dtype=torch.long)
    with torch.no_grad():
        logits = utils.completion_logits(policy, prompt_ids, prompt_mask, dummy, temperature)
    return logits[:, 0].softmax(-1)[:, target].sum(-1).mean().item()


@pytest.mark.parametrize("baseline", ["none", "mean", "rloo"])
def test_one_rl_step_raises_expected_reward(assets, tmp_path, baseline):
    """One Adam step on the REINFORCE loss raises the exact expected reward of a constructed reward.

    A flipped sign (reward x NLL), a loss without gradient path or greedy sampling all fail here.
    """
    cfg = make_cfg(assets, tmp_path, max_new_tokens=1, batch_size=256, beta=0.1, baseline=baseline, rloo_k=4)
    policy, tok = utils.load_policy(cfg.sft)
    policy.eval()
    anchor = copy.deepcopy(policy).requires_grad_(False)
    target = torch.arange(0, len(tok), 2)  # reward 1 for even token ids: about half of the mass
    reward_fn = lambda p, m, completions, mask: (completions[:, 0] % 2 == 0).float()
    rows = prompts_of(cfg)[:64]
    rows = [r for r in rows for _ in range(4)]  # 256 rows, 4 per prompt (RLOO groups)
    prompt_ids, prompt_mask = utils.left_pad(rows, tok.pad_token_id)
    before = expected_target_prob(policy, prompt_ids, prompt_mask, target, cfg.temperature)
    torch.manual_seed(0)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    loss, stats, _ = warp.policy_loss(
        policy, anchor, reward_fn, prompt_ids, prompt_mask, cfg, tok.eos_token_id
    )
    loss.backward()
    opt.step()
    after = expected_target_prob(policy, prompt_ids, prompt_mask, target, cfg.temperature)
    assert stats["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # policy == anchor before the step
    assert after > before + 0.005, (before, after)
    for _ in range(2):  # and it keeps rising
        opt.zero_grad()
        warp.policy_loss(policy, anchor, reward_fn, prompt_ids, prompt_mask, cfg, tok.eos_token_id)[
            0
        ].backward()
        opt.step()
    assert expected_target_prob(policy, prompt_ids, prompt_mask, target, cfg.temperature) > after + 0.01


@pytest.mark.parametrize("baseline", ["none", "rloo"])
def test_policy_loss_rows_add_up(assets, tmp_path, baseline):
    """The per-row values 02 prints are the loss's: r_beta = r - beta * KL (KL = log pi - log pi_anchor
    of the sampled completion), the advantage is r_beta minus the baseline, and loss = mean(-A log pi)."""
    cfg = make_cfg(assets, tmp_path, beta=0.5, baseline=baseline, rloo_k=2)
    policy, tok = utils.load_policy(cfg.sft)
    anchor, _ = utils.load_policy(cfg.sft)
    with torch.no_grad():  # an anchor away from the policy, so that the KL term is not zero
        for p in anchor.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reward_fn = lambda p, m, completions, mask: completions.float().mean(1)
    rows = [r for r in prompts_of(cfg)[:4] for _ in range(2)]
    ids, mask = utils.left_pad(rows, tok.pad_token_id)
    torch.manual_seed(0)
    loss, stats, out = warp.policy_loss(policy, anchor, reward_fn, ids, mask, cfg, tok.eos_token_id)
    y, y_mask = out["completions"], out["mask"]
    with torch.no_grad():
        lp = utils.masked_sum(
            utils.token_logprobs(utils.completion_logits(policy, ids, mask, y, 0.9), y), y_mask
        )
        ref = utils.masked_sum(
            utils.token_logprobs(utils.completion_logits(anchor, ids, mask, y, 0.9), y), y_mask
        )
    assert torch.allclose(out["logprob"], lp, atol=1e-5)
    assert torch.allclose(out["kl"], lp - ref, atol=1e-5) and out["kl"].abs().max() > 1e-3
    assert torch.allclose(out["r_beta"], out["scores"] - 0.5 * out["kl"])
    assert torch.allclose(out["advantage"], warp.advantages(out["r_beta"], baseline, 2))
    assert loss.item() == pytest.approx((-out["advantage"] * out["logprob"]).mean().item(), abs=1e-6)
    assert stats["objective/rlhf_reward"] == pytest.approx(out["r_beta"].mean().item(), abs=1e-6)


def test_advantages_baselines():
    """'none' is r_beta, 'mean' is centred, RLOO subtracts the mean of the other samples of its prompt."""
    r = torch.tensor([1.0, 3.0, 0.0, 10.0, 2.0, 2.0])
    assert torch.equal(warp.advantages(r, "none"), r)
    assert warp.advantages(r, "mean").sum().abs() < 1e-6
    k = 3
    expected = torch.tensor(
        [r[i] - (r[(i // k) * k : (i // k + 1) * k].sum() - r[i]) / (k - 1) for i in range(6)]
    )
    assert torch.allclose(warp.advantages(r, "rloo", k), expected)


def test_prompt_batches_are_seeded_permutations():
    """Each epoch covers every prompt once; the same seed repeats the order, another seed changes it."""
    take = lambda seed, n: [
        i for _, b in zip(range(n), warp.prompt_batches(12, 4, seed), strict=False) for i in b
    ]
    assert sorted(take(0, 3)) == list(range(12))
    assert take(0, 6) == take(0, 6)
    assert take(0, 3) != take(1, 3)


@pytest.mark.parametrize("mu", [0.3, 0.0])
def test_anchor_moves_by_exactly_mu_of_the_gap(assets, tmp_path, mu):
    """After a step, anchor = (1 - mu) * init + mu * policy (an anchor never updated fails); mu = 0, the
    KL-to-SFT baseline, keeps the anchor bit for bit at the init while the policy moves."""
    cfg = make_cfg(assets, tmp_path / "out", steps=2, mu=mu)
    prompts = prompts_of(cfg)
    policy, _ = utils.load_policy(cfg.sft)
    init = utils.state_of(policy)
    checkpoints.save_state(init, tmp_path / "init.safetensors")
    spec = runs.RunSpec(str(tmp_path / "run"), str(tmp_path / "init.safetensors"), seed=0, steps=2)

    def stop(step, metrics):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        warp.train_run(cfg, spec, prompts, on_step=stop)
    ckpt = torch.load(tmp_path / "run" / "progress.pt", weights_only=True)
    assert ckpt["step"] == 1
    moved = 0
    for k in init:
        expected = (1 - cfg.mu) * init[k] + cfg.mu * ckpt["policy"][k]
        assert torch.allclose(ckpt["anchor"][k], expected, atol=1e-6), k
        moved += not torch.equal(ckpt["anchor"][k], init[k])
        if mu == 0:
            assert torch.equal(ckpt["anchor"][k], init[k]), k
    assert (moved > 0) == (mu > 0)
    assert any(not torch.equal(ckpt["policy"][k], init[k]) for k in init)  # the policy did move


def run_weights(cfg, prompts, run_dir, init_path, seed=0, stop_at=None):
    spec = runs.RunSpec(str(run_dir), str(init_path), seed=seed, steps=cfg.steps)

    def stop(step, metrics):
        if step == stop_at:
            raise KeyboardInterrupt

    if stop_at is not None:
        with pytest.raises(KeyboardInterrupt):
            warp.train_run(cfg, spec, prompts, on_step=stop)
        assert not runs.run_finished(run_dir)
    return checkpoints.load_state_file(warp.train_run(cfg, spec, prompts))


def test_interrupted_run_resumes_bitwise(assets, tmp_path):
    """A run stopped after step 2 and started again ends with exactly the weights of an uninterrupted run."""
    cfg = make_cfg(assets, tmp_path / "out", steps=4, grad_accum=2)
    prompts = prompts_of(cfg)
    policy, _ = utils.load_policy(cfg.sft)
    checkpoints.save_state(utils.state_of(policy), tmp_path / "init.safetensors")
    whole = run_weights(cfg, prompts, tmp_path / "whole", tmp_path / "init.safetensors")
    resumed = run_weights(cfg, prompts, tmp_path / "resumed", tmp_path / "init.safetensors", stop_at=2)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert any(not torch.equal(whole[k], utils.state_of(policy)[k]) for k in whole)  # training did move
    other_seed = run_weights(cfg, prompts, tmp_path / "seed1", tmp_path / "init.safetensors", seed=1)
    assert any(not torch.equal(whole[k], other_seed[k]) for k in whole)


@pytest.fixture
def own_precision():
    """accelerate keeps one precision per process: start this test from none, and leave none behind."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_a_run_with_the_compiled_sampler_trains_like_the_eager_one(
    assets, tmp_path, precision, own_precision
):
    """compile_generation samples through the compiled step inside the real run (accelerate, autocast,
    the optimizer between calls), draws the same completions and so ends with the same weights."""
    cfg = make_cfg(assets, tmp_path / "out", steps=2, grad_accum=2, mixed_precision=precision)
    prompts = prompts_of(cfg)
    policy, _ = utils.load_policy(cfg.sft)
    checkpoints.save_state(utils.state_of(policy), tmp_path / "init.safetensors")
    eager = run_weights(cfg, prompts, tmp_path / "eager", tmp_path / "init.safetensors")
    cfg = dataclasses.replace(cfg, compile_generation=True)
    ours = run_weights(cfg, prompts, tmp_path / "compiled", tmp_path / "init.safetensors")
    assert all(torch.allclose(eager[k], ours[k], atol=1e-6) for k in eager)
    assert any(not torch.equal(eager[k], utils.state_of(policy)[k]) for k in eager)  # training did move


def test_parallel_runs_equal_sequential(assets, tmp_path):
    """The M runs of an iteration give the same weights in 2 processes as one after another."""
    cfg = make_cfg(assets, tmp_path / "out", steps=2)
    prompts = prompts_of(cfg)
    policy, _ = utils.load_policy(cfg.sft)
    checkpoints.save_state(utils.state_of(policy), tmp_path / "init.safetensors")
    specs = lambda root: [
        runs.RunSpec(str(root / f"run{m}"), str(tmp_path / "init.safetensors"), m, 2) for m in range(2)
    ]
    runs.run_parallel(warp.train_run, [(cfg, s, prompts) for s in specs(tmp_path / "seq")], processes=1)
    runs.run_parallel(warp.train_run, [(cfg, s, prompts) for s in specs(tmp_path / "par")], processes=2)
    for m in range(2):
        a = checkpoints.load_state_file(tmp_path / "seq" / f"run{m}" / "final.safetensors")
        b = checkpoints.load_state_file(tmp_path / "par" / f"run{m}" / "final.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_warp_outer_loop_slerp_then_liti(assets, tmp_path):
    """Alg. 1 lines 10-12: each iteration's init is LITI(init, SLERP(runs), eta), the first init is the
    SFT; finals are loadable and no state is kept twice (SFT copy, last SLERP and LITI beside the finals)."""
    cfg = make_cfg(assets, tmp_path / "out", steps=2, iterations=2, runs=2, eta=0.3)
    prompts = prompts_of(cfg)
    paths = warp.warp(cfg, prompts)
    out = tmp_path / "out"
    slerp_model, _ = utils.load_policy(str(paths["slerp"]))
    liti_model, _ = utils.load_policy(str(paths["liti"]))
    init = utils.state_of(utils.load_policy(cfg.sft)[0])  # Alg. 1, line 1: theta_init = theta_sft
    for i in range(2):
        finals = [
            checkpoints.load_state_file(out / f"iter{i}" / f"run{m}" / "final.safetensors") for m in range(2)
        ]
        merged = utils.slerp(init, finals)
        last = i == 1
        nxt = (
            utils.state_of(liti_model)
            if last
            else checkpoints.load_state_file(out / "iter1" / "init.safetensors")
        )
        for k in init:
            assert torch.equal(
                nxt[k], (init[k] + cfg.eta * (merged[k] - init[k])).to(init[k].dtype)
            ) or torch.allclose(nxt[k], 0.7 * init[k] + 0.3 * merged[k], atol=1e-6)
        if last:
            assert all(torch.equal(utils.state_of(slerp_model)[k], merged[k]) for k in merged)
        angles = json.loads((out / f"iter{i}" / "merge.json").read_text())
        assert 0 < angles["angle/mean"] < 180
        init = nxt
    duplicates = [out / "iter0" / "init.safetensors", out / "iter1" / "slerp.safetensors", out / "iter2"]
    assert not any(p.exists() for p in duplicates)
    # a second call finds everything done and changes nothing, not even the recorded training time
    weights = paths["slerp"] / "model.safetensors"
    before = weights.stat().st_mtime_ns
    minutes = runs.stage_minutes(out)
    assert minutes["warp"] > 0
    warp.warp(cfg, prompts)
    assert weights.stat().st_mtime_ns == before
    assert runs.stage_minutes(out) == minutes
    # a restart with other settings is refused before any compute, naming what changed
    with pytest.raises(ValueError, match=r"lr: 0\.0001 -> 0\.001"):
        warp.warp(make_cfg(assets, out, steps=2, iterations=2, runs=2, eta=0.3, lr=1e-3), prompts)
    assert weights.stat().st_mtime_ns == before


def test_claim_out_dir_allows_only_harmless_changes(assets, tmp_path):
    """Where to push, how to parallelise and how often to save may change between sessions; beta may not."""
    runs.claim_out_dir(make_cfg(assets, tmp_path))
    runs.claim_out_dir(make_cfg(assets, tmp_path, save_every=5, parallel=False, cpu_processes=2))
    with pytest.raises(ValueError, match="beta"):
        runs.claim_out_dir(make_cfg(assets, tmp_path, beta=0.3))


def scaled_on_the_cpu(monkeypatch, optimizer_kind):
    """fp16's loss scaling on the CPU (accelerate gives the CPU no scaler; torch has one) with a fused or a
    foreach Adam, whatever the device; returns the list the optimizer of a run is appended to."""
    import accelerate

    class ScaledOnTheCpu(accelerate.Accelerator):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)

    made, real_adam = [], torch.optim.Adam

    class Forced(real_adam):  # fused: GradScaler calls its step() and the kernel skips the update itself
        def __init__(self, params, **kw):
            kw = {k: v for k, v in kw.items() if k not in ("fused", "foreach")}
            super().__init__(params, **kw, **{optimizer_kind: True})
            made.append(self)

    monkeypatch.setattr(accelerate, "Accelerator", ScaledOnTheCpu)
    monkeypatch.setattr(torch.optim, "Adam", Forced)
    return made


def inf_gradients_at(monkeypatch, made, infinite):
    """Make warp's loss have an infinite gradient at the calls `infinite(call)` says (1-based), through a
    term with no effect on the logged statistics; returns, per call, what the run looked like before it:
    a policy and an anchor weight, Adam's applied updates and the lr the scheduler set."""
    real_loss, seen = warp.policy_loss, []

    def loss(policy, anchor, *args):
        weight = next(policy.parameters())
        state = made[0].state.get(weight, {}) if made else {}
        seen.append({
            "policy": weight.detach().clone(),
            "anchor": next(anchor.parameters()).detach().clone(),
            "adam_steps": int(state["step"]) if "step" in state else 0,
            "lr": made[0].param_groups[0]["lr"],
        })  # fmt: skip
        out, stats, rows = real_loss(policy, anchor, *args)
        if infinite(len(seen)):
            out = out + weight.sum() * float("inf")
        return out, stats, rows

    monkeypatch.setattr(warp, "policy_loss", loss)
    return seen


@pytest.mark.parametrize("optimizer_kind", ["foreach", "fused"])
def test_a_step_the_fp16_loss_scaler_skips_moves_nothing_and_is_not_counted(
    assets, tmp_path, monkeypatch, own_precision, optimizer_kind
):
    """A GradScaler skip (forced with an inf gradient at the second step) applies no Adam update, so the
    anchor must not move either and the step does not count: T applied updates, T anchor moves, T
    scheduler steps, the skip in the metrics. A run resumed after the skip ends bit for bit like one that
    was not interrupted (the skipped step's prompts are skipped again). The same with a fused Adam, whose
    step() GradScaler calls even when its kernel skips the update (accelerate issue #4242)."""
    made = scaled_on_the_cpu(monkeypatch, optimizer_kind)
    seen = inf_gradients_at(monkeypatch, made, lambda call: call == 2)
    emas, ema = [], utils.ema_update
    monkeypatch.setattr(utils, "ema_update", lambda *a: (emas.append(1), ema(*a)))
    cfg = make_cfg(assets, tmp_path / "out", steps=3)
    prompts = prompts_of(cfg)
    policy, _ = utils.load_policy(cfg.sft)
    checkpoints.save_state(utils.state_of(policy), tmp_path / "init.safetensors")
    whole = run_weights(cfg, prompts, tmp_path / "whole", tmp_path / "init.safetensors")
    history = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert len(seen) == 4 and len(emas) == 3  # 4 attempts, 1 skipped, 3 applied
    assert [s["adam_steps"] for s in seen] == [0, 1, 1, 2]  # the skip (call 2) applied no update
    assert int(made[0].state[next(iter(made[0].state))]["step"]) == 3
    for key in ("policy", "anchor"):
        assert not torch.equal(seen[0][key], seen[1][key])  # the first step moved both
        assert torch.equal(seen[1][key], seen[2][key])  # the skipped one moved neither
    assert [s["lr"] for s in seen][1:3] == [cfg.lr * 2 / 3] * 2  # nor the scheduler
    assert [h["optimizer/skipped_steps"] for h in history] == [0, 1, 1]
    lrs = [h["lr"] for h in history]  # warm-up 1/3, 2/3, 1 of lr: the skip did not advance it
    assert cfg.warmup_steps == 2 and lrs == pytest.approx([cfg.lr * 2 / 3, cfg.lr, cfg.lr])
    seen.clear()
    resumed = run_weights(cfg, prompts, tmp_path / "resumed", tmp_path / "init.safetensors", stop_at=2)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


@pytest.mark.parametrize("optimizer_kind", ["foreach", "fused"])
def test_25_skips_in_a_row_stop_the_run(assets, tmp_path, monkeypatch, own_precision, optimizer_kind):
    """Gradients that are infinite at every scale: 25 skipped steps in a row stop the run with
    FloatingPointError, and in those 25 nothing moved (policy, anchor, Adam, lr) and nothing was saved."""
    made = scaled_on_the_cpu(monkeypatch, optimizer_kind)
    seen = inf_gradients_at(monkeypatch, made, lambda call: True)
    cfg = make_cfg(assets, tmp_path / "out", steps=30)
    spec = runs.RunSpec(str(tmp_path / "run"), "", seed=0, steps=cfg.steps)
    with pytest.raises(FloatingPointError, match="skipped 25 optimizer steps in a row"):
        warp.train_run(cfg, spec, prompts_of(cfg))
    assert len(seen) == 25
    for s in seen[1:]:
        assert torch.equal(s["policy"], seen[0]["policy"]) and torch.equal(s["anchor"], seen[0]["anchor"])
        assert s["adam_steps"] == 0 and s["lr"] == seen[0]["lr"]
    assert not (tmp_path / "run" / "progress.pt").exists()


def test_a_run_does_not_resume_in_another_precision(assets, tmp_path, monkeypatch, own_precision):
    """'auto' is resolved on each machine: a run checkpointed in bf16 and resumed where 'auto' means fp16
    (a T4) is refused before any model loads, with the precision it trained in; the same machine resumes."""
    cfg = make_cfg(assets, tmp_path / "out", steps=3, mixed_precision="auto")
    prompts = prompts_of(cfg)
    spec = runs.RunSpec(str(tmp_path / "run"), "", seed=0, steps=3)
    monkeypatch.setattr(runs, "mixed_precision_for", lambda choice: "bf16")  # the first machine

    def stop(step, metrics):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        warp.train_run(cfg, spec, prompts, on_step=stop)
    assert torch.load(tmp_path / "run" / "progress.pt", weights_only=True)["mixed_precision"] == "bf16"
    monkeypatch.setattr(runs, "mixed_precision_for", lambda choice: "fp16")  # a T4
    loads = []
    monkeypatch.setattr(runs, "load_rl_models", lambda *a: loads.append(1))
    with pytest.raises(ValueError, match=r"trained in mixed precision 'bf16' and would resume in 'fp16'"):
        warp.train_run(cfg, spec, prompts)
    assert not loads  # refused before any model loaded
