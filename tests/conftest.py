"""Shared tiny-model fixtures: models and tokenizers built from configs here; nothing is downloaded."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Tests never touch the network: make the Hub libraries fail fast instead of trying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# README's command runs the suite in 2 pytest-xdist workers on 2 cores: one thread each (and in the notebook
# kernels and training processes they start, which inherit it), not two workers of 2 threads fighting.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # import utils from the repo root

# Location of the shared real-IMDb sample (beside the checkout, as CI has it); tests skip when absent.
IMDB_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imdb_sample.jsonl"

# README's command runs the suite with `--dist loadfile`: each file whole in one worker, so that a module
# fixture (a notebook run, trained models, a benchmark's report) is made once. (Not `loadgroup` with marks
# added here: under pytest >= 9.2 pytest-xdist's group suffix no longer reaches the node ids, pytest-xdist
# issue #1386, and every such fixture was built in both workers.) The files that take longest start first,
# so that no worker waits at the end behind a notebook chain that began late.
LONGEST_FIRST = ["test_imdb_shaped.py", "test_series.py", "test_01_reward_model.py", "test_store.py"]


def pytest_collection_modifyitems(config, items):
    """The files of LONGEST_FIRST first, in that order; each file keeps its own order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable


TINY_VOCAB = 50  # small enough to enumerate sequences, large enough for top-k to matter
TINY_EOS = 1

TINY_CORPUS = [
    "A brilliant film with a moving story and superb acting.",
    "An awful movie, boring and far too long; I hated it.",
    "The plot was clever, the cast charming, the music lovely.",
    "Dull, clumsy and forgettable. Avoid this one.",
    'She said "wonderful" twice, and meant it every time.',
    "I went in with low hopes and came out delighted.",
] * 5


def tiny_gpt2(seed: int = 0, vocab_size: int = TINY_VOCAB, tie: bool = True, **kw):
    """A 2-layer, 32-wide GPT-2 LM with random weights, dropout off, in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=TINY_EOS,
        eos_token_id=TINY_EOS,
        pad_token_id=TINY_EOS,
        tie_word_embeddings=tie,
        **kw,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def make_gpt2():
    """Factory of tiny GPT-2 LMs: make_gpt2(seed=0, vocab_size=50, tie=True)."""
    return tiny_gpt2


def write_word_vocab(folder: Path) -> Path:
    """A WordPiece vocab file covering TINY_CORPUS (lower-cased words and punctuation)."""
    import re

    words = sorted({w for t in TINY_CORPUS for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    path = folder / "vocab.txt"
    path.write_text("\n".join(special + words) + "\n")
    return path


@pytest.fixture
def bert_tokenizer(tmp_path):
    """A BertTokenizerFast built from a vocab file written to tmp_path (right padding, as BERT has)."""
    from transformers import BertTokenizerFast

    write_word_vocab(tmp_path)  # from the folder: transformers 5 ignores `vocab_file=` (all words -> [UNK])
    tok = BertTokenizerFast.from_pretrained(str(tmp_path), do_lower_case=True)
    assert tok("brilliant film")["input_ids"][1] != tok.unk_token_id
    return tok


def tiny_reward_model(kind: str, vocab_size: int, seed: int = 0):
    """A 2-layer BERT or DistilBERT sequence classifier with one output (the reward), eval mode."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        DistilBertConfig,
        DistilBertForSequenceClassification,
    )

    torch.manual_seed(seed)
    if kind == "bert":
        cfg = BertConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            num_labels=1,
        )
        return BertForSequenceClassification(cfg).eval()
    cfg = DistilBertConfig(
        vocab_size=vocab_size,
        dim=32,
        n_layers=2,
        n_heads=2,
        hidden_dim=64,
        max_position_embeddings=128,
        num_labels=1,
    )
    return DistilBertForSequenceClassification(cfg).eval()


@pytest.fixture
def make_reward_model():
    """Factory of tiny reward models: make_reward_model('bert' | 'distilbert', vocab_size, seed=0)."""
    return tiny_reward_model


def train_bpe_tokenizer(texts, vocab_size: int = 400):
    """A GPT-2-style byte-level BPE tokenizer learned on `texts` (EOS = pad = <|endoftext|>, left padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.padding_side = "left"
    return fast


@pytest.fixture
def make_bpe_tokenizer():
    """Factory: make_bpe_tokenizer(texts, vocab_size=400) trains a GPT-2-style tokenizer on texts."""
    return train_bpe_tokenizer


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 style) trained on a tiny review corpus, built once per session."""
    return train_bpe_tokenizer(TINY_CORPUS)
