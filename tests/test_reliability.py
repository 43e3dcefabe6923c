"""Bad input and faults stop early with a message that says what to change, and lose nothing already
computed: configs before any model loads, data, numerical faults inside a run, damaged or unwritable
files, and models that do not fit. Each case asserts the message; where something was computed before
the fault, that it is still there and loadable."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

import checkpoints
import config
import runs
import utils
import warp
from tests import tiny

# ------------------------------------------------------------------------------------------------------
# configs: the field, its value and what is allowed, before any model loads
# ------------------------------------------------------------------------------------------------------

BAD_WARP = [
    ("mu", -0.1, r"mu=-0\.1: must lie in \[0, 1\]"),  # 0 is allowed: a frozen anchor (KL to the SFT)
    ("mu", 1.5, r"mu=1\.5: must lie in \[0, 1\]"),
    ("eta", -0.1, r"eta=-0\.1: must lie in \[0, 1\]"),
    ("eta", 2.0, r"eta=2\.0: must lie in \[0, 1\]"),
    ("beta", -0.5, r"beta=-0\.5: must be >= 0"),
    ("iterations", 0, r"iterations=0: must be > 0"),
    ("runs", 0, r"runs=0: must be > 0"),
    ("steps", -3, r"steps=-3: must be > 0"),
    ("batch_size", 0, r"batch_size=0: must be > 0"),
    ("grad_accum", 0, r"grad_accum=0: must be > 0"),
    ("prompt_tokens", 0, r"prompt_tokens=0: must be > 0"),
    ("max_new_tokens", 0, r"max_new_tokens=0: must be > 0"),
    ("reward_max_length", 0, r"reward_max_length=0: must be > 0"),
    ("temperature", 0.0, r"temperature=0\.0: must be > 0"),
    ("steps", "10", r"steps='10': must be of type int, not str"),
    ("steps", True, r"steps=True: must be of type int, not bool"),
    ("lr", "1e-5", r"lr='1e-5': must be of type float, not str"),
]


@pytest.mark.parametrize(("field", "value", "message"), BAD_WARP, ids=[f"{f}={v!r}" for f, v, _ in BAD_WARP])
def test_bad_warp_config_values_are_named(field, value, message):
    with pytest.raises(ValueError, match=rf"WarpConfig\.{message}"):
        config.WarpConfig.for_preset("offline", **{field: value})


def test_rloo_batch_must_divide_by_k():
    with pytest.raises(ValueError, match=r"batch_size=6: must be a multiple of rloo_k=4"):
        config.WarpConfig.for_preset("offline", baseline="rloo", rloo_k=4, batch_size=6)


def test_unknown_override_names_the_closest_field():
    with pytest.raises(ValueError, match=r"unknown field 'stpes' in OVERRIDES; did you mean 'steps'\?"):
        config.WarpConfig.for_preset("offline", stpes=10)
    with pytest.raises(
        ValueError, match=r"unknown field 'n_promts' in OVERRIDES; did you mean 'n_prompts'\?"
    ):
        config.EvalConfig.for_preset("offline", n_promts=10)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match=r"preset='kaggle': choose one of \('imdb', 'offline'\)"):
        config.WarpConfig.for_preset("kaggle")


def test_eval_etas_outside_the_unit_interval():
    with pytest.raises(ValueError, match=r"EvalConfig\.etas=\(0\.0, 1\.5\): values in \[0, 1\]"):
        config.EvalConfig.for_preset("offline", etas=[0.0, 1.5])


@pytest.mark.parametrize(
    ("mus", "message"),
    [
        ([], r"MUS=\[\]: give one or more"),
        ([0.01, 0.01], r"\[0\.01\] appear more than once"),
        ([0.0, 2], r"\[0\.0, 2\] not in \(0, 1\]"),
    ],
    ids=["empty", "repeated", "outside"],
)
def test_bad_mu_lists(mus, message):
    with pytest.raises(ValueError, match=message):
        config.check_mus(mus)
    assert config.check_mus([0.01, 0.05]) == [0.01, 0.05]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny.save_tiny_assets(tmp_path_factory.mktemp("assets"), n_train=40, n_test=16)


def make_cfg(assets, out_dir, **kw):
    base = dict(steps=3, batch_size=4, max_new_tokens=4, prompt_tokens=4, save_every=1, cpu_threads=1)
    return config.WarpConfig.for_preset("offline", **assets, out_dir=str(out_dir), **{**base, **kw})


def test_prompt_plus_completion_longer_than_the_context(assets, tmp_path):
    cfg = make_cfg(assets, tmp_path, prompt_tokens=40, max_new_tokens=30)  # the tiny GPT-2 has 64 positions
    with pytest.raises(ValueError, match=r"40 \+ 30 exceeds the policy's context of 64 tokens"):
        config.check_fits_models(cfg, assets["reward_model"])


def test_reward_max_length_longer_than_the_reward_model_reads(assets, tmp_path):
    cfg = make_cfg(assets, tmp_path, reward_max_length=512)  # the tiny BERT has 128 positions
    with pytest.raises(ValueError, match=r"reward_max_length=512: .* reads at most 128 tokens"):
        config.check_fits_models(cfg, assets["reward_model"])
    config.check_fits_models(make_cfg(assets, tmp_path, reward_max_length=128), assets["reward_model"])


# ------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_missing_local_data_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no such local file or folder"):
        utils.load_reviews(str(tmp_path / "reviews.jsonl"), "train")


def test_missing_hub_data_set_says_what_to_give():
    with pytest.raises(FileNotFoundError, match=r"no Hub data set could be loaded .* a Hub id such as"):
        utils.load_reviews("nobody/no-such-reviews", "train")  # the Hub is unreachable in tests


def test_wrong_columns(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"review": "good", "sentiment": 1}])
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['label', 'text'\]"):
        utils.load_reviews(path, "train")


def test_unlabelled_reviews_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"text": "good", "label": 1}, {"text": "hm", "label": -1}])
    with pytest.raises(ValueError, match=r"labels \[-1\]; .* use a labelled split"):
        utils.load_reviews(path, "train")


def test_empty_split(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.csv").write_text("text,label\n")
    with pytest.raises(ValueError, match=r"the 'train' split is empty"):
        utils.load_reviews(str(tmp_path / "d"), "train")


def test_short_reviews_are_dropped_and_counted(assets, tmp_path):
    _, tok = utils.load_policy(assets["sft"])
    texts = utils.load_reviews(assets["data"], "train")["text"]
    longest = max(len(ids) for ids in tok(list(texts))["input_ids"])
    prompts, dropped = warp.training_prompts(make_cfg(assets, tmp_path, prompt_tokens=longest), tok)
    assert dropped > 0 and len(prompts) + dropped == len(texts) and {len(p) for p in prompts} == {longest}


def test_fewer_prompts_than_one_batch_fail_before_anything_is_written(assets, tmp_path):
    cfg = make_cfg(assets, tmp_path / "out", batch_size=8)
    with pytest.raises(ValueError, match=r"3 prompt\(s\), fewer than one micro-batch of 8"):
        warp.warp(cfg, [[1, 2, 3, 4]] * 3)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------
# numerical faults inside a run
# ------------------------------------------------------------------------------------------------------


def faulty_run(assets, tmp_path, monkeypatch, fault):
    """A 3-step run whose models are made faulty from step 2 by `fault(policy, reward_fn)`; returns the
    error and the run folder."""
    cfg = make_cfg(assets, tmp_path / "out")
    real = runs.load_rl_models
    calls = {"n": 0}

    def faulty_models(c, device):
        policy, anchor, tok, reward_fn = real(c, device)

        def reward(*args):
            calls["n"] += 1
            return fault(policy, reward_fn(*args), calls["n"])

        return policy, anchor, tok, reward

    monkeypatch.setattr(runs, "load_rl_models", faulty_models)
    policy, tok = utils.load_policy(cfg.sft)
    checkpoints.save_state(utils.state_of(policy), tmp_path / "init.safetensors")
    spec = runs.RunSpec(str(tmp_path / "run"), str(tmp_path / "init.safetensors"), seed=0, steps=3)
    prompts = warp.training_prompts(cfg, tok)[0]
    with pytest.raises(FloatingPointError) as err:
        warp.train_run(cfg, spec, prompts)
    return str(err.value), tmp_path / "run"


def assert_step1_is_kept(run_dir: Path) -> None:
    state = checkpoints.load_progress(run_dir / "progress.pt")
    assert state["step"] == 1 and not (run_dir / "final.safetensors").exists()
    assert all(torch.isfinite(v).all() for v in state["policy"].values())


def test_nan_reward_stops_the_run_and_keeps_the_last_checkpoint(assets, tmp_path, monkeypatch):
    nan_from_step_2 = lambda policy, scores, n: scores * float("nan") if n >= 2 else scores
    message, run_dir = faulty_run(assets, tmp_path, monkeypatch, nan_from_step_2)
    assert message.startswith("step 2: the reward is nan (objective/scores)")
    assert "progress.pt (step 1)" in message
    assert_step1_is_kept(run_dir)


def test_inf_log_prob_stops_the_run(assets, tmp_path, monkeypatch):
    real, calls = utils.token_logprobs, {"n": 0}

    def inf_from_step_2(logits, tokens):  # one call a step: the anchor's log-probs
        calls["n"] += 1
        out = real(logits, tokens)
        return out - torch.inf * (torch.arange(out.numel()).view_as(out) == 0) if calls["n"] > 1 else out

    monkeypatch.setattr(utils, "token_logprobs", inf_from_step_2)
    message, run_dir = faulty_run(assets, tmp_path, monkeypatch, lambda policy, scores, n: scores)
    assert message.startswith("step 2: the log-prob (KL to the anchor) is")
    assert_step1_is_kept(run_dir)


def test_nan_loss_is_named_when_reward_and_kl_are_finite():
    stats = {"objective/scores": 1.0, "objective/kl": 0.1, "loss/policy": float("inf")}
    with pytest.raises(FloatingPointError, match=r"step 7: the loss is inf .* theta_init \(no progress"):
        runs.check_finite(stats, 7, Path("nowhere/progress.pt"))


def test_a_merge_with_nan_is_refused_before_it_is_saved(tmp_path, make_gpt2):
    init = utils.state_of(make_gpt2(seed=0))
    diverged = utils.state_of(make_gpt2(seed=1))
    diverged["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    merged = utils.slerp(init, [diverged, utils.state_of(make_gpt2(seed=2))])
    with pytest.raises(FloatingPointError, match=r"iteration 0: tensor transformer\.h\.0\.mlp\.c_fc\.weight"):
        runs.check_finite_state(merged, "the SLERP merge of iteration 0")


def test_a_reward_model_that_scores_everything_the_same_is_refused(assets):
    model, tok = utils.load_reward_model(assets["reward_model"])
    texts = ["a great film", "an awful film", "boring", "wonderful"]
    runs.check_reward_model(model, tok, texts, "rm")  # a working (random) one passes
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.zero_()  # a head that outputs 0 whatever it reads
    with pytest.raises(ValueError, match=r"gives all 4 test reviews the same score \(0\): 01 failed"):
        runs.check_reward_model(model, tok, texts, "rm")


# ------------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------------


def test_damaged_progress_falls_back_to_the_previous_checkpoint(tmp_path):
    path = tmp_path / "progress.pt"
    checkpoints.save_progress(path, step=1)
    checkpoints.save_progress(path, step=2)
    assert checkpoints.previous(path).exists()
    path.write_bytes(path.read_bytes()[:100])  # truncated, as by a session killed mid-write elsewhere
    with pytest.warns(
        UserWarning, match=r"progress\.pt is damaged .* resuming from the checkpoint before it"
    ):
        assert checkpoints.load_progress(path)["step"] == 1


def test_damaged_progress_without_a_previous_one_says_what_to_do(tmp_path):
    path = tmp_path / "progress.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match=r"progress\.pt is damaged .* delete them to start this run"):
        checkpoints.load_progress(path)


def test_damaged_state_file_is_named(tmp_path, make_gpt2):
    path = tmp_path / "final.safetensors"
    checkpoints.save_state(utils.state_of(make_gpt2()), path)
    path.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(
        RuntimeError, match=r"final\.safetensors is damaged or incomplete .* delete it and rerun"
    ):
        checkpoints.load_state_file(path)


def test_full_disk_keeps_the_previous_file_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    checkpoints.atomic_torch_save({"w": torch.ones(3)}, path)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(OSError, match=r"disk full while writing .*state\.pt: nothing was replaced"):
        checkpoints.atomic_torch_save({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary file left behind


def test_writes_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    synced, real = [], runs.os.fsync
    monkeypatch.setattr(runs.os, "fsync", lambda fd: synced.append(fd) or real(fd))
    checkpoints.atomic_write_text(tmp_path / "a.json", "{}")
    checkpoints.atomic_torch_save({"w": torch.ones(1)}, tmp_path / "b.pt")
    with checkpoints.atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "x.txt").write_text("x")
    assert len(synced) == 3


# ------------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------------


def test_sft_folder_that_is_not_a_causal_lm(assets):
    with pytest.raises(
        ValueError, match=r"holds a BertForSequenceClassification, not a causal language model"
    ):
        utils.load_policy(assets["reward_model"])


def test_policy_vocabulary_smaller_than_the_tokenizer(tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder = Path(tiny.save_tiny_policy(tmp_path / "sft"))
    tok = AutoTokenizer.from_pretrained(folder)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok) - 10, n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        folder
    )
    with pytest.raises(
        ValueError, match=rf"the tokenizer has {len(tok)} tokens, the policy's embedding {len(tok) - 10}"
    ):
        utils.load_policy(str(folder))


def test_tokenizer_without_pad_or_eos(tmp_path, make_bpe_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = make_bpe_tokenizer(tiny.corpus(50), vocab_size=300)
    bare = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer)  # no special tokens at all
    GPT2LMHeadModel(GPT2Config(vocab_size=len(bare), n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        tmp_path
    )
    bare.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"neither a pad nor an EOS token"):
        utils.load_policy(str(tmp_path))


def test_reward_model_with_two_outputs(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    folder = Path(tiny.save_tiny_reward(tmp_path / "rm"))
    cfg = BertConfig.from_pretrained(folder)
    cfg.num_labels = 2
    BertForSequenceClassification(cfg).save_pretrained(folder)
    with pytest.raises(ValueError, match=r"has 2 outputs; a reward model has one"):
        utils.load_reward_model(str(folder))


def test_missing_reward_model_folder_is_not_sent_to_the_hub(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    missing = str(tmp_path / "checkpoints" / "reward_model")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*reward_model\. Run 01 first"):
        checkpoints.resolve_checkpoint(missing, hint="Run 01 first")
