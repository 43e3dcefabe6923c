"""`utils.length_buckets`, the length-bucketed batches of 01's training and of the offline SFT pretraining:
every index once per epoch, batches of similar length (far less padding than random batches on real IMDb
review lengths), a function of the generator's seed, different from epoch to epoch."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import utils

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "imdb_train_4k.jsonl"


def buckets(lengths, batch_size, seed, **kw):
    return utils.length_buckets(lengths, batch_size, torch.Generator().manual_seed(seed), **kw)


def random_lengths(n: int, longest: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(1, longest) for _ in range(n)]


def padding_waste(lengths, batches) -> float:
    """Share of a padded batch's tokens that are padding, over the epoch."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / padded


@pytest.mark.parametrize("n, batch_size", [(1, 4), (16, 4), (1000, 16), (1001, 16), (5000, 16)])
def test_every_index_once_per_epoch(n, batch_size):
    lengths = random_lengths(n, 512, seed=n)
    batches = buckets(lengths, batch_size, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(n))
    assert all(1 <= len(b) <= batch_size for b in batches)
    assert sum(len(b) < batch_size for b in batches) == (n % batch_size != 0)  # at most one short batch


def test_drop_last_keeps_whole_batches_only():
    lengths = list(range(1001))
    batches = buckets(lengths, 16, seed=0, drop_last=True)
    flat = [i for b in batches for i in b]
    assert all(len(b) == 16 for b in batches) and len(set(flat)) == len(flat)
    assert len(flat) >= 1001 - 16 * 2  # at most a partial batch per chunk of 50 batches (here 2 chunks)


def test_deterministic_for_a_seed_and_different_across_epochs():
    lengths = random_lengths(2000, 512, seed=1)
    assert buckets(lengths, 16, seed=7) == buckets(lengths, 16, seed=7)
    assert buckets(lengths, 16, seed=7) != buckets(lengths, 16, seed=8)
    # one generator carried through epochs (offline SFT) gives a new order each epoch
    g = torch.Generator().manual_seed(0)
    first, second = utils.length_buckets(lengths, 16, g), utils.length_buckets(lengths, 16, g)
    assert first != second and sorted(map(sorted, first)) != sorted(map(sorted, second))


def test_batches_are_length_homogeneous_on_synthetic_lengths():
    lengths = random_lengths(1600, 512, seed=2)
    bucketed = buckets(lengths, 16, seed=0)
    random_batches = [list(range(i, i + 16)) for i in range(0, 1600, 16)]  # lengths are random already
    assert padding_waste(lengths, bucketed) < 0.1 < 0.4 < padding_waste(lengths, random_batches)


@pytest.mark.skipif(not REAL.exists(), reason=f"real reviews not found: {REAL}")
def test_far_less_padding_than_random_batches_on_real_reviews():
    """01's case: pairs of real reviews, a pair as long as its longer review, cut at 512 tokens."""
    from transformers import AutoTokenizer

    import config

    rows = [json.loads(line) for line in REAL.read_text(encoding="utf-8").splitlines()]
    pos = [utils.clean_review(r["text"]) for r in rows if r["label"] == 1][:1600]
    neg = [utils.clean_review(r["text"]) for r in rows if r["label"] == 0][:1600]
    tokenizer = AutoTokenizer.from_pretrained(config.minilm_dir())
    ids = tokenizer(pos + neg, truncation=True, max_length=512)["input_ids"]
    lengths = [max(len(ids[i]), len(ids[1600 + i])) for i in range(1600)]
    bucketed = buckets(lengths, 16, seed=0)
    order = torch.randperm(1600, generator=torch.Generator().manual_seed(0)).tolist()
    random_batches = [order[i : i + 16] for i in range(0, 1600, 16)]
    waste, random_waste = padding_waste(lengths, bucketed), padding_waste(lengths, random_batches)
    print(f"padding: {waste:.1%} of tokens with length buckets, {random_waste:.1%} with random batches")
    assert waste < 0.05 and random_waste > 0.3
    # and the tokens a step computes on: most bucketed batches are far shorter than 512
    longest = sorted(max(lengths[i] for i in b) for b in bucketed)
    assert longest[len(longest) // 2] < 400 and sum(lengths) / len(lengths) < 400


def test_drop_last_gives_the_offline_sft_batches_it_replaced():
    """offline.py's former private copy, kept here as the reference: the offline SFT (and its cache
    version) trains on exactly the batches it trained on before."""

    def former(lengths, batch_size, gen):
        order = torch.randperm(len(lengths), generator=gen).tolist()
        pool = batch_size * 50
        batches = []
        for i in range(0, len(order) - batch_size + 1, pool):
            chunk = sorted(order[i : i + pool], key=lengths.__getitem__)
            batches += [chunk[j : j + batch_size] for j in range(0, len(chunk) - batch_size + 1, batch_size)]
        perm = torch.randperm(len(batches), generator=gen).tolist()
        return [batches[k] for k in perm]

    for n in (5, 32, 1000, 3217):
        lengths = random_lengths(n, 100, seed=n)
        assert buckets(lengths, 32, seed=3, drop_last=True) == former(
            lengths, 32, torch.Generator().manual_seed(3)
        )
