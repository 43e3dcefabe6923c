"""Properties of the config (presets, validation) and the data helpers (cleaning, loading, prompts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import config
import utils

IMDB_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imdb_sample.jsonl"

# ------------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["offline", "imdb"])
def test_for_preset_builds_a_valid_config(preset):
    """for_preset gives a WarpConfig of that preset; overrides win over the preset's defaults."""
    cfg = config.WarpConfig.for_preset(preset)
    assert cfg.preset == preset and 0 <= cfg.mu <= 1 and 0 <= cfg.eta <= 1
    assert config.WarpConfig.for_preset(preset, mu=0.025).mu == 0.025


def test_presets_hold_the_documented_settings():
    """imdb keeps the seed's settings (SPEC 2); offline is the small CPU run (fewer steps, shorter texts)."""
    imdb = config.WarpConfig.for_preset("imdb")
    assert (imdb.iterations, imdb.runs, imdb.steps, imdb.mu, imdb.eta, imdb.beta) == (
        2,
        2,
        100,
        0.01,
        0.5,
        0.1,
    )
    assert (imdb.batch_size * imdb.grad_accum, imdb.lr, imdb.temperature) == (64, 5e-6, 0.9)
    assert imdb.baseline == "none"  # the paper's plain REINFORCE is the default
    off = config.WarpConfig.for_preset("offline")
    assert off.steps < imdb.steps and off.max_new_tokens <= imdb.max_new_tokens


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mu", 1.5),
        ("mu", -0.01),
        ("eta", -0.1),
        ("eta", 1.01),
        ("steps", 0),
        ("runs", 0),
        ("iterations", 0),
        ("batch_size", 0),
        ("grad_accum", 0),
        ("lr", 0.0),
        ("temperature", 0.0),
        ("prompt_tokens", 0),
        ("max_new_tokens", 0),
        ("beta", -0.1),
        ("warmup_steps", -1),
        ("baseline", "foo"),
        ("mixed_precision", "fp8"),
        ("preset", "auto"),
    ],
)
def test_impossible_values_raise_and_name_the_field(field, value):
    """An impossible value is a ValueError whose message names the field."""
    with pytest.raises(ValueError, match=field):
        config.WarpConfig(**{field: value})
    if field != "preset":
        with pytest.raises(ValueError, match=field):
            config.WarpConfig.for_preset("offline", **{field: value})


def test_rloo_needs_k_of_at_least_two_dividing_the_batch():
    """RLOO: batch_size must be a multiple of rloo_k and rloo_k >= 2; other baselines do not care."""
    with pytest.raises(ValueError, match="batch_size"):
        config.WarpConfig(baseline="rloo", batch_size=31, rloo_k=2)
    with pytest.raises(ValueError, match="rloo_k"):
        config.WarpConfig(baseline="rloo", rloo_k=1)
    assert config.WarpConfig(baseline="rloo", batch_size=32, rloo_k=4).rloo_k == 4
    assert config.WarpConfig(baseline="mean", batch_size=31, rloo_k=2).batch_size == 31


def test_unknown_field_or_preset_raises_naming_it():
    """for_preset rejects an unknown field name (named in the message) and an unknown preset."""
    with pytest.raises(ValueError, match="learning_rate"):
        config.WarpConfig.for_preset("offline", learning_rate=1e-3)
    with pytest.raises(ValueError, match="nope"):
        config.WarpConfig.for_preset("nope")


def reward_config():
    """01's RewardConfig, built from the notebook's own cell."""
    from tests.notebook import notebook_class

    return notebook_class("01_reward_model", "RewardConfig")


def test_01_trains_the_measured_budget_and_keeps_the_seed_schedule_by_name():
    """01's imdb default trains the budget the curve chose (4 epochs x 2,048 pairs = 8,192); 'seed_report' is
    the seed's 15 x 16,000; a schedule counts pairs, so a smaller batch trains as many in more batches; a
    field given explicitly wins; the offline preset keeps its own short run; a bad name fails up front."""
    rc, where = reward_config(), dict(reward_base="encoder", data="reviews")
    pairs = lambda c: c.epochs * c.batches_per_epoch * c.batch_size  # noqa: E731
    measured = rc.for_preset("imdb", **where)
    assert (measured.epochs, measured.batches_per_epoch, measured.batch_size) == (4, 128, 16)
    assert pairs(measured) == 8192
    bare = rc(**where)  # the dataclass defaults are the measured schedule too
    assert (bare.epochs, bare.batches_per_epoch) == (4, 128)
    seed = rc.for_preset("imdb", schedule="seed_report", **where)
    assert (seed.epochs, seed.batches_per_epoch) == (15, 1000) and pairs(seed) == 240_000
    same = ("lr", "max_length", "val_pairs", "lora_r", "batch_size")
    assert [getattr(seed, k) for k in same] == [getattr(measured, k) for k in same]
    assert "schedule" not in measured.to_dict()  # the saved config records the numbers, not the name

    # half the batch, two forward passes per optimizer step: as many pairs, in twice the batches
    small = rc.for_preset("imdb", batch_size=8, grad_accum=2, **where)
    assert small.batches_per_epoch == 256 and pairs(small) == 8192
    # pairs per step that do not divide 2,048: rounded up to whole optimizer steps
    odd = rc.for_preset("imdb", batch_size=12, grad_accum=2, **where)
    assert odd.batches_per_epoch == 2 * 86 and 8192 <= pairs(odd) < 8192 + 4 * 24

    assert rc.for_preset("imdb", schedule="seed_report", epochs=2, **where).epochs == 2
    offline = rc.for_preset("offline", **where)
    assert (offline.epochs, offline.batches_per_epoch, offline.batch_size) == (5, 4, 8)
    assert pairs(rc.for_preset("offline", schedule="measured", **where)) == 8192
    for bad in ("fast", 3):
        with pytest.raises(ValueError, match=r"RewardConfig\.schedule=.*: one of \('measured', 'seed_rep"):
            rc.for_preset("imdb", schedule=bad, **where)


def test_an_interrupted_run_keeps_the_length_it_started_with(tmp_path):
    """A run saved under the seed's length resumes with it after the defaults changed (01 leaves out the
    fields its OVERRIDES set); fields not listed take the new config's values; with nothing saved, or the
    same values, the config is unchanged. The result resumes the saved run without a config change."""
    import runs

    rc, where = reward_config(), dict(reward_base="encoder", data="reviews")
    old = rc.for_preset("imdb", schedule="seed_report", time_budget_minutes=30.0, **where)
    old.save(tmp_path / "config.json")
    new = rc.for_preset("imdb", **where)
    length = ("epochs", "batches_per_epoch")
    kept = runs.continue_as_started(new, tmp_path / "config.json", length)
    assert (kept.epochs, kept.batches_per_epoch, kept.time_budget_minutes) == (15, 1000, 0.0)
    assert (new.epochs, new.batches_per_epoch) == (4, 128)  # a new config, not this one changed
    # a user who raised epochs only: the run keeps its own batches_per_epoch
    longer = runs.continue_as_started(
        rc.for_preset("imdb", epochs=20, **where), tmp_path / "config.json", length[1:]
    )
    assert (longer.epochs, longer.batches_per_epoch) == (20, 1000)
    assert runs.continue_as_started(new, tmp_path / "missing.json", length) is new
    assert runs.continue_as_started(old, tmp_path / "config.json", length) is old


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", "3", r"epochs='3': must be of type int, not str"),
        ("lr", True, r"lr=True: must be of type float"),
        # the schedule's arithmetic leaves bad batch sizes to the field checks, which name them
        ("batch_size", "16", r"batch_size='16': must be of type int, not str"),
        ("grad_accum", 0, r"grad_accum=0"),
    ],
)
def test_01_config_checks_types_of_a_notebook_cell(field, value, message):
    """The type check works on a class whose annotations are types (01's cell), not only strings."""
    with pytest.raises(ValueError, match=message):
        reward_config().for_preset("imdb", reward_base="encoder", data="reviews", **{field: value})


def test_gpu_check_projects_01_at_its_defaults():
    """bench/gpu_check.py projects 01's minutes for the steps and held-out pairs 01 trains by default: it
    scores the held-out pairs before training, after each epoch and once more after saving the model."""
    from bench import gpu_check

    cfg = reward_config().for_preset("imdb", reward_base="encoder", data="reviews")
    expected = (cfg.epochs * cfg.batches_per_epoch, cfg.val_pairs, 1 + cfg.epochs + 1)
    assert (gpu_check.IMDB_01_STEPS, gpu_check.IMDB_01_VAL_PAIRS, gpu_check.IMDB_01_VALIDATIONS) == expected


def test_config_save_round_trips(tmp_path):
    """config.save writes JSON that rebuilds an equal config."""
    cfg = config.WarpConfig.for_preset("offline", mu=0.05, baseline="mean")
    cfg.save(tmp_path / "cfg" / "config.json")
    again = config.WarpConfig(**json.loads((tmp_path / "cfg" / "config.json").read_text()))
    assert again == cfg


def test_resolve_preset_explicit_names_and_invalid():
    """Explicit presets resolve to themselves (with a reason); an unknown name is a ValueError."""
    for name in config.PRESETS:
        preset, reason = config.resolve_preset(name)
        assert preset == name and isinstance(reason, str) and reason
    with pytest.raises(ValueError, match="colab"):
        config.resolve_preset("colab")


def test_resolve_auto_is_offline_without_hub_even_with_a_gpu(monkeypatch):
    """'auto' gives 'offline' when HF_HUB_OFFLINE=1 (even with a GPU), without touching the network."""
    import urllib.request

    calls = []

    def no_network(*a, **k):
        calls.append(a)
        raise OSError("no network in tests")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    pretend_a_t4(monkeypatch)
    assert config.hub_reachable() is False
    assert config.resolve_preset("auto")[0] == "offline"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert config.resolve_preset("auto")[0] == "offline"
    assert config.resolve_preset()[0] == "offline"
    assert calls == []  # HF_HUB_OFFLINE=1 is honoured before any request


def pretend_a_t4(monkeypatch):
    """torch.cuda reports one T4 (sm_75), which this (CPU) torch is taken to have kernels for."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75"])


def test_resolve_auto_is_imdb_with_gpu_and_hub(monkeypatch):
    """'auto' gives 'imdb' when a GPU and the Hub are both there."""
    pretend_a_t4(monkeypatch)
    monkeypatch.setattr(config, "hub_reachable", lambda *a, **k: True)
    assert config.resolve_preset("auto")[0] == "imdb"


def test_preset_paths_imdb_are_the_hub_ids():
    """The imdb preset points at the real SFT, reward base and data set (SPEC 4)."""
    paths = config.preset_paths("imdb")
    assert paths == {
        "sft": "lvwerra/gpt2-imdb",
        "reward_base": "distilbert-base-cased",
        "data": "stanfordnlp/imdb",
    }
    with pytest.raises(ValueError):
        config.preset_paths("auto")


# ------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------


def test_clean_review_removes_html_breaks_and_escaped_quotes():
    """clean_review turns <br /> variants into spaces, \\" into ", and collapses whitespace."""
    raw = 'Great film.<br /><br />He said \\"wow\\".<br/>Really<BR>good. <br  />  End '
    assert utils.clean_review(raw) == 'Great film. He said "wow". Really good. End'
    assert utils.clean_review("plain text") == "plain text"


def test_cut_prompts_cuts_by_tokens_and_drops_short_texts(bpe_tokenizer):
    """Each prompt is exactly n tokens (the text's first n), not n characters; shorter texts are dropped."""
    tok = bpe_tokenizer
    texts = [
        "A brilliant film with a moving story and superb acting, truly.",
        "Dull.",
        "The plot was clever, the cast charming, the music lovely, the end sad.",
    ]
    n = 6
    prompts = utils.cut_prompts(texts, tok, n)
    assert len(prompts) == 2  # "Dull." has fewer than n tokens
    for ids, text in zip(prompts, [texts[0], texts[2]], strict=True):
        assert len(ids) == n
        assert ids == tok.encode(text, add_special_tokens=False)[:n]
        assert text.startswith(tok.decode(ids))
        assert len(tok.decode(ids)) != n  # a character cut would be another prompt


def test_left_pad_pads_on_the_left_with_a_mask():
    """left_pad right-aligns rows, fills the left with pad_id and marks real tokens in the mask."""
    ids, mask = utils.left_pad([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert ids.dtype == mask.dtype == torch.long


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [
    {"text": "Loved it.<br /><br />Would watch again.", "label": 1},
    {"text": 'Awful, \\"boring\\" and long.', "label": 0},
    {"text": "Fine.", "label": 1},
]


def test_load_reviews_from_a_local_jsonl_file(tmp_path):
    """A local IMDb-format .jsonl file loads with text cleaned and labels kept."""
    ds = utils.load_reviews(str(_write_jsonl(tmp_path / "reviews.jsonl", ROWS)), "train")
    assert ds["text"] == ["Loved it. Would watch again.", 'Awful, "boring" and long.', "Fine."]
    assert ds["label"] == [1, 0, 1]


def test_load_reviews_from_a_folder_picks_the_split(tmp_path):
    """A folder with train.jsonl and test.jsonl gives each split its own file; a missing split is an error."""
    _write_jsonl(tmp_path / "train.jsonl", ROWS)
    _write_jsonl(tmp_path / "test.jsonl", ROWS[:1])
    assert len(utils.load_reviews(str(tmp_path), "train")) == 3
    test = utils.load_reviews(str(tmp_path), "test")
    assert test["text"] == ["Loved it. Would watch again."]
    with pytest.raises(FileNotFoundError, match="unsupervised"):
        utils.load_reviews(str(tmp_path), "unsupervised")


def test_load_reviews_from_a_saved_dataset_dict(tmp_path):
    """A save_to_disk DatasetDict folder loads through the same function."""
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    ds = utils.load_reviews(str(tmp_path / "dd"), "train")
    assert ds["text"][0] == "Loved it. Would watch again."


def test_load_reviews_without_label_is_a_clear_error(tmp_path):
    """Data without a `label` column raises a ValueError that names the missing column."""
    path = _write_jsonl(tmp_path / "nolabel.jsonl", [{"text": "a"}, {"text": "b"}])
    with pytest.raises(ValueError, match="label"):
        utils.load_reviews(str(path), "train")


@pytest.mark.skipif(not IMDB_SAMPLE.exists(), reason=f"real IMDb sample not found at {IMDB_SAMPLE}")
def test_real_imdb_sample_loads_clean_and_cuts_by_tokens(make_bpe_tokenizer):
    """Real IMDb reviews: load_reviews leaves no <br, keeps long reviews; prompts are exactly n tokens."""
    ds = utils.load_reviews(str(IMDB_SAMPLE), "train")
    texts = ds["text"]
    assert len(texts) == 200 and set(ds["label"]) == {0, 1}
    assert not any("<br" in t.lower() for t in texts)
    assert not any('\\"' in t for t in texts)
    assert max(len(t) for t in texts) > 3000  # long reviews are not truncated by loading
    tok = make_bpe_tokenizer(texts, vocab_size=1000)
    n = 15
    prompts = utils.cut_prompts(texts, tok, n)
    assert len(prompts) == sum(len(tok.encode(t)) > n for t in texts) > 190
    assert all(len(p) == n for p in prompts)
    kept = [t for t in texts if len(tok.encode(t)) > n]
    assert all(t.startswith(tok.decode(p)) for t, p in zip(kept, prompts, strict=True))
    assert sum(len(tok.decode(p)) != n for p in prompts) > 190  # not a character cut
