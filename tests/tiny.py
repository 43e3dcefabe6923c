"""Tiny, random, download-free models saved like Hub checkpoints, for fast tests of the real loading code."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = (
    "the film movie plot acting was is a an and but great good wonderful superb awful bad boring terrible "
    "dull fun I loved hated it this story cast ending not very really"
).split()


def corpus(n: int = 200) -> list[str]:
    """Short deterministic sentences from WORDS."""
    g = torch.Generator().manual_seed(0)
    return [
        " ".join(WORDS[i] for i in torch.randint(len(WORDS), (8,), generator=g).tolist()) for _ in range(n)
    ]


def save_tiny_policy(path: str | Path, n_layer: int = 2, n_embd: int = 32, seed: int = 0) -> str:
    """A random tiny GPT-2 with a byte-level BPE tokenizer (EOS = pad = <|endoftext|>), saved to `path`."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus(), vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tok.pad_token = tok.eos_token
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=64,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=2,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def save_tiny_reward(path: str | Path, seed: int = 0, arch: str = "bert") -> str:
    """A random tiny BERT or DistilBERT sequence classifier with one output and a WordPiece tokenizer."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertTokenizerFast,
        DistilBertConfig,
        DistilBertForSequenceClassification,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS))]
    vocab_file = path / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    # from the folder: transformers 5 ignores `vocab_file=` and would build a 5-token, all-[UNK] tokenizer
    tok = BertTokenizerFast.from_pretrained(str(path), do_lower_case=True)
    assert len(tok) == len(vocab), "the tiny reward model's tokenizer lost its vocabulary"
    torch.manual_seed(seed)
    if arch == "bert":
        cfg = BertConfig(
            vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=128, num_labels=1,
        )  # fmt: skip
        model = BertForSequenceClassification(cfg)
    else:
        cfg = DistilBertConfig(
            vocab_size=len(vocab), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
            max_position_embeddings=128, num_labels=1,
        )  # fmt: skip
        model = DistilBertForSequenceClassification(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


POSITIVE_WORDS = "great good wonderful superb fun loved".split()
NEGATIVE_WORDS = "awful bad boring terrible dull hated".split()


def save_tiny_reviews(path: str | Path, n_train: int = 64, n_test: int = 32, seed: int = 0) -> str:
    """A folder in IMDb's format (train.jsonl, test.jsonl with `text`, `label`; 1 = positive), words from
    WORDS only, half positive; some reviews carry IMDb's `<br /><br />` line breaks."""
    import json

    g = torch.Generator().manual_seed(seed)
    neutral = [w for w in WORDS if w not in POSITIVE_WORDS + NEGATIVE_WORDS]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        with open(path / f"{split}.jsonl", "w") as f:
            for i in range(n):
                label = i % 2
                polar = POSITIVE_WORDS if label else NEGATIVE_WORDS
                words = []
                for _ in range(10):  # about 4 in 10 words carry the review's sentiment
                    pool = polar if torch.rand((), generator=g) < 0.4 else neutral
                    words.append(pool[int(torch.randint(len(pool), (), generator=g))])
                text = " ".join(words[:5]) + (" <br /><br /> " if i % 3 == 0 else " ") + " ".join(words[5:])
                f.write(json.dumps({"text": text, "label": label}) + "\n")
    return str(path)


def save_tiny_assets(folder: str | Path, **reviews) -> dict[str, str]:
    """A tiny SFT, reward model and review folder under `folder`, as WarpConfig's sft, reward_model, data;
    `reviews` goes to `save_tiny_reviews` (n_train, n_test, seed)."""
    folder = Path(folder)
    return {
        "sft": save_tiny_policy(folder / "sft"),
        "reward_model": save_tiny_reward(folder / "rm"),
        "data": save_tiny_reviews(folder / "data", **reviews),
    }
