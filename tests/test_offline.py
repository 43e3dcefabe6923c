"""The offline preset: a deterministic, varied corpus; an oracle that agrees with its labels; a tokenizer and
SFT that load through the same `from_pretrained` / `load_dataset` path as Hub assets; a cache that is reused
only when complete and built for the same seed and config."""

from __future__ import annotations

import json
import re

import pytest
import torch

import offline

# A build small enough for tests (seconds): the full default build is exercised by run_series / the notebooks.
TINY = offline.OfflineConfig(
    n_train=400, n_test=60, vocab_size=1024, n_layer=1, n_embd=32, n_head=2, sft_steps=6, quality_prompts=8
)


@pytest.fixture(scope="module")
def corpus():
    return offline.make_reviews(n_train=3000, n_test=500, seed=0)


# ------------------------------------------------------------------------------------------------------------
# corpus
# ------------------------------------------------------------------------------------------------------------


def test_reviews_are_deterministic_per_seed(corpus):
    again = offline.make_reviews(n_train=3000, n_test=500, seed=0)
    other = offline.make_reviews(n_train=3000, n_test=500, seed=1)
    for split in ("train", "test"):
        assert list(again[split]["text"]) == list(corpus[split]["text"])
        assert list(again[split]["label"]) == list(corpus[split]["label"])
        same = sum(a == b for a, b in zip(other[split]["text"], corpus[split]["text"], strict=True))
        assert same == 0, f"seed 1 repeats {same} {split} reviews of seed 0 at the same index"


def test_sizes_columns_and_balance(corpus):
    assert (len(corpus["train"]), len(corpus["test"])) == (3000, 500)
    for split in ("train", "test"):
        ds = corpus[split]
        assert set(ds.column_names) == {"text", "label"}
        assert set(ds["label"]) == {0, 1}
        assert 0.45 <= sum(ds["label"]) / len(ds) <= 0.55
        assert all(isinstance(t, str) and t for t in ds["text"])


def test_reviews_are_3_to_6_sentences_and_varied(corpus):
    texts = list(corpus["train"]["text"])
    # sentences end in . ! or ?; one opener is two short sentences ("Revelation. There is no other word...")
    counts = [len(re.findall(r"[.!?](?=\s|$)", t)) for t in texts]
    assert min(counts) >= 3 and max(counts) <= 7
    assert sum(3 <= c <= 6 for c in counts) / len(counts) > 0.9
    assert len(set(texts)) == len(texts), "duplicate reviews within train"
    first_sentences = {re.split(r"(?<=[.!?])\s", t)[0] for t in texts}
    assert len(first_sentences) > 0.8 * len(texts), "openers repeat: a classifier could memorise them"
    words = {w for t in texts for w in re.findall(r"[a-z]+", t.lower())}
    assert len(words) > 500


def test_train_and_test_streams_are_independent(corpus):
    rate = offline.duplicate_rate(list(corpus["train"]["text"]), list(corpus["test"]["text"]))
    assert rate < 0.01
    assert offline.duplicate_rate(["a", "b"], ["a", "c"]) == 0.5  # the measure itself


def test_negation_decides_the_label(corpus):
    """Reviews whose only polarity word in a sentence is negated still carry the review's label."""
    pos = [t for t, y in zip(corpus["train"]["text"], corpus["train"]["label"], strict=True) if y == 1]
    neg = [t for t, y in zip(corpus["train"]["text"], corpus["train"]["label"], strict=True) if y == 0]
    assert any(re.search(r"\b(never|not) (boring|dull|bad)\b", t) for t in pos)
    assert not any(re.search(r"\b(never|not) (boring|dull|bad)\b", t) for t in neg)
    assert any(re.search(r"\b(never|not) (great|good|convincing|memorable)\b", t) for t in neg)


# ------------------------------------------------------------------------------------------------------------
# lexicon oracle
# ------------------------------------------------------------------------------------------------------------


def test_lexicon_agrees_with_labels_on_test(corpus):
    scores = [offline.lexicon_sentiment(t) for t in corpus["test"]["text"]]
    agree = [(s > 0) == (y == 1) and s != 0 for s, y in zip(scores, corpus["test"]["label"], strict=True)]
    assert sum(agree) / len(agree) > 0.95


@pytest.mark.parametrize(
    "text, sign",
    [
        ("A brilliant film.", 1),
        ("A dull film.", -1),
        ("The pacing is never boring.", 1),
        ("The ending is not exactly convincing.", -1),
        ("It isn't great.", -1),
        ("Far from dull.", 1),
        ("Not recommended.", -1),
        ("I give it 9 out of 10.", 1),
        ("I give it 2 out of 10.", -1),
        ("The score is superb, but the plot is dull. Overall, a terrible thriller.", -1),
        ("I saw it last week.", 0),
    ],
)
def test_lexicon_signs(text, sign):
    s = offline.lexicon_sentiment(text)
    assert (s > 0) - (s < 0) == sign, (text, s)


def test_negation_does_not_cross_a_clause():
    # "not" belongs to the first clause; "brilliant" after the comma stays positive
    assert offline.lexicon_sentiment("It is not long, and brilliant.") > 0


# ------------------------------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------------------------------


def test_tokenizer_round_trips_through_autotokenizer(corpus, tmp_path):
    from transformers import AutoTokenizer

    tok = offline.train_tokenizer(corpus["train"]["text"], vocab_size=1024)
    assert len(tok) <= 1024
    assert tok.eos_token == tok.bos_token == tok.unk_token == tok.pad_token == "<|endoftext|>"
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = list(corpus["test"]["text"][:20]) + ["Unseen wörds & émojis 🎬 still encode."]
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert loaded(t, add_special_tokens=False)["input_ids"] == ids
        assert loaded.decode(ids) == t  # byte-level: lossless, no unknown tokens
    assert loaded.eos_token_id == loaded.pad_token_id == tok.eos_token_id
    assert loaded.padding_side == "right"  # callers choose left padding for generation themselves


# ------------------------------------------------------------------------------------------------------------
# SFT
# ------------------------------------------------------------------------------------------------------------


def test_pretrain_is_deterministic_and_learns(corpus):
    tok = offline.train_tokenizer(corpus["train"]["text"], vocab_size=1024)
    train, test = corpus["train"].select(range(300)), list(corpus["test"]["text"][:50])
    kw = dict(n_layer=1, n_embd=32, n_head=2, steps=30, lr=3e-3, batch_size=16, warmup=5, progress=False)
    a = offline.pretrain_sft(train, tok, seed=0, **kw)
    b = offline.pretrain_sft(train, tok, seed=0, **kw)
    c = offline.pretrain_sft(train, tok, seed=1, **kw)
    untrained = offline.pretrain_sft(train, tok, seed=0, **{**kw, "steps": 0})
    wa, wb, wc = (m.transformer.wte.weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)
    # 30 steps take the loss well below the uniform-guess loss log(V) of the random init
    assert offline.heldout_loss(a, tok, test) < offline.heldout_loss(untrained, tok, test) - 1.0


def test_sft_quality_reports_its_fields(corpus):
    tok = offline.train_tokenizer(corpus["train"]["text"], vocab_size=1024)
    model = offline.pretrain_sft(
        corpus["train"].select(range(100)), tok, n_layer=1, n_embd=32, n_head=2, steps=2, progress=False
    )
    q = offline.sft_quality(model, tok, corpus["test"], n_prompts=10, max_new_tokens=12, n_loss=20)
    assert q["n_prompts"] == 10
    assert 0 <= q["positive_share"] <= 1 and 0 <= q["agreement"] <= 1
    assert 0 <= q["mean_new_tokens"] <= 12
    assert q["heldout_loss"] > 0
    again = offline.sft_quality(model, tok, corpus["test"], n_prompts=10, max_new_tokens=12, n_loss=20)
    assert again == q  # sampling is seeded
    state = torch.random.get_rng_state()
    offline.sft_quality(model, tok, corpus["test"], n_prompts=4, max_new_tokens=4, n_loss=4)
    assert torch.equal(state, torch.random.get_rng_state())  # and leaves the global RNG alone


# ------------------------------------------------------------------------------------------------------------
# build and cache
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("offline") / "cache"
    return cache, offline.build_offline_assets(cache, seed=0, progress=False, config=TINY)


def test_build_loads_through_the_hub_code_path(built):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache, paths = built
    assert paths == {"data": cache / "data", "sft": cache / "sft"}
    data = load_dataset("json", data_files={s: str(paths["data"] / f"{s}.jsonl") for s in ("train", "test")})
    assert (len(data["train"]), len(data["test"])) == (TINY.n_train, TINY.n_test)
    assert list(data["test"]["text"]) == list(
        offline.make_reviews(TINY.n_train, TINY.n_test, 0)["test"]["text"]
    )
    model = AutoModelForCausalLM.from_pretrained(paths["sft"])
    tok = AutoTokenizer.from_pretrained(paths["sft"])
    assert model.config.n_layer == TINY.n_layer and model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.eos_token_id
    prompt = tok(["The plot"], return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)
    assert torch.equal(out[:, : prompt["input_ids"].shape[1]], prompt["input_ids"])
    assert prompt["input_ids"].shape[1] < out.shape[1] <= prompt["input_ids"].shape[1] + 3
    q = json.loads((paths["sft"] / "quality.json").read_text())
    assert {"heldout_loss", "positive_share", "agreement", "mean_new_tokens", "build_seconds"} <= set(q)
    assert q["sft_steps"] == TINY.sft_steps
    assert json.loads((cache / "COMPLETE").read_text())["seed"] == 0
    assert not list(cache.parent.glob(".*partial*")), "temporary build folder left behind"


def test_second_call_reuses_the_cache(built, monkeypatch):
    cache, paths = built
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}

    def no_rebuild(*a, **k):
        raise AssertionError("rebuilt a complete cache")

    monkeypatch.setattr(offline, "pretrain_sft", no_rebuild)
    monkeypatch.setattr(offline, "make_reviews", no_rebuild)
    assert offline.build_offline_assets(cache, seed=0, progress=False, config=TINY) == paths
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == before


def test_incomplete_or_different_cache_is_rebuilt(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    calls = []
    real = offline.pretrain_sft
    monkeypatch.setattr(offline, "pretrain_sft", lambda *a, **k: calls.append(k["seed"]) or real(*a, **k))

    offline.build_offline_assets(cache, seed=0, progress=False, config=TINY)
    (cache / "COMPLETE").unlink()  # as if the process died before the end
    (cache / "sft" / "stale.txt").write_text("from the interrupted build")
    offline.build_offline_assets(cache, seed=0, progress=False, config=TINY)
    assert calls == [0, 0]
    assert (cache / "COMPLETE").exists() and not (cache / "sft" / "stale.txt").exists()

    paths = offline.build_offline_assets(cache, seed=1, progress=False, config=TINY)  # other seed: rebuild
    assert calls == [0, 0, 1]
    assert json.loads((cache / "COMPLETE").read_text())["seed"] == 1
    first = json.loads((paths["data"] / "test.jsonl").read_text().splitlines()[0])
    assert first == {
        "text": offline.make_reviews(TINY.n_train, TINY.n_test, 1)["test"][0]["text"],
        "label": offline.make_reviews(TINY.n_train, TINY.n_test, 1)["test"][0]["label"],
    }
    offline.build_offline_assets(cache, seed=1, force=True, progress=False, config=TINY)  # force: rebuild
    assert calls == [0, 0, 1, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"], "temporary folders left behind"


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("WARP_CACHE", str(tmp_path / "here"))
    assert offline.default_cache_dir() == tmp_path / "here"
    monkeypatch.delenv("WARP_CACHE")
    assert offline.default_cache_dir().parts[-2:] == (".cache", "warp-imdb")


def test_reference_lm_is_trained_apart_from_the_sft_and_reused(tmp_path, monkeypatch):
    """The coherence judge: its own folder in the cache (the corpus and SFT untouched), the SFT's tokenizer,
    other weights than the SFT (another seed and width), rebuilt only when its recipe changes."""
    monkeypatch.setattr(
        offline, "REFERENCE_LM", dict(n_layer=1, n_embd=48, n_head=2, steps=4, seed_offset=1000)
    )
    paths = offline.build_offline_assets(tmp_path / "cache", config=TINY, progress=False)
    marker = (tmp_path / "cache" / "COMPLETE").read_text()
    ref = offline.build_reference_lm(tmp_path / "cache", progress=False)
    assert (
        ref == tmp_path / "cache" / "reference_lm" and (tmp_path / "cache" / "COMPLETE").read_text() == marker
    )
    import transformers

    lm = transformers.AutoModelForCausalLM.from_pretrained(ref)
    sft = transformers.AutoModelForCausalLM.from_pretrained(paths["sft"])
    assert lm.config.n_embd == 48 and sft.config.n_embd == TINY.n_embd
    tok, sft_tok = (transformers.AutoTokenizer.from_pretrained(p) for p in (ref, paths["sft"]))
    assert tok.get_vocab() == sft_tok.get_vocab() and lm.config.vocab_size == sft.config.vocab_size
    built = (ref / "model.safetensors").stat().st_mtime_ns
    assert offline.build_reference_lm(tmp_path / "cache", progress=False) == ref
    assert (ref / "model.safetensors").stat().st_mtime_ns == built  # reused, not retrained
    monkeypatch.setattr(offline, "REFERENCE_LM", dict(offline.REFERENCE_LM, steps=5))
    offline.build_reference_lm(tmp_path / "cache", progress=False)
    assert json.loads((ref / "COMPLETE").read_text())["recipe"]["steps"] == 5  # another recipe: rebuilt
    with pytest.raises(FileNotFoundError, match="offline SFT"):
        offline.build_reference_lm(tmp_path / "empty", progress=False)
