"""The imdb preset's real shapes without the Hub: GPT-2 small and a DistilBERT-base-shaped encoder built from
their configs with random weights, GPT-2's real tokenizer and real IMDb reviews, all from `../shared/data`
(beside the checkout, as CI has it) or another folder with the same files. Each builder writes into a
folder it is given; nothing from the shared folder is copied into the repository. Used by
`bench/gpu_check.py` and `tests/test_imdb_shaped.py`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
EOS = "<|endoftext|>"
EOS_ID = 50256
BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def missing_shared(shared: Path = SHARED) -> str | None:
    """Why the shared assets cannot be used (a reason for pytest.skip), or None when they are all there."""
    needed = [shared / "gpt2_tokenizer" / "encoder.json", shared / "gpt2_tokenizer" / "vocab.bpe"]
    needed.append(shared / "imdb_train_4k.jsonl")
    absent = [str(p) for p in needed if not p.exists()]
    return f"shared IMDb/GPT-2 assets not found: {', '.join(absent)}" if absent else None


def gpt2_tokenizer(folder: Path = SHARED / "gpt2_tokenizer"):
    """GPT-2's byte-level BPE tokenizer from encoder.json + vocab.bpe, as the Hub's `gpt2` has it:
    <|endoftext|> (50256) is eos, bos and unk, there is no pad token, at most 1024 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE.from_file(str(folder / "encoder.json"), str(folder / "vocab.bpe")))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, unk_token=EOS, model_max_length=1024
    )
    assert tok("Hello world")["input_ids"] == [15496, 995], "not GPT-2's tokenizer"
    assert len(tok) == 50257 and tok.eos_token_id == EOS_ID and tok.pad_token is None
    return tok


def save_gpt2_small(path: str | Path, shared: Path = SHARED, seed: int = 0) -> str:
    """A random-weight GPT-2 small (`GPT2Config()`: 12 layers, 768 wide, 50,257 tokens, 1,024 positions)
    with GPT-2's real tokenizer, saved like a Hub SFT checkpoint (`save_pretrained`)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(bos_token_id=EOS_ID, eos_token_id=EOS_ID))
    model.save_pretrained(path)
    gpt2_tokenizer(shared / "gpt2_tokenizer").save_pretrained(path)
    return str(path)


def review_wordpiece_vocab(texts: list[str], vocab_size: int = 30_522) -> list[str]:
    """A lower-cased WordPiece vocabulary (BERT's special tokens first) learned on `texts` by the
    `tokenizers` WordPiece trainer: frequent words whole, the rest in ## pieces, so no word is [UNK]."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.train_from_iterator(
        texts,
        trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIAL, show_progress=False),
    )
    vocab = wp.get_vocab()
    return sorted(vocab, key=vocab.get)


def save_distilbert_base(path: str | Path, texts: list[str], seed: int = 0) -> str:
    """A random-weight DistilBERT-base-shaped encoder (`DistilBertConfig()`: 6 layers, 768 wide, 512
    positions) saved like the Hub's `distilbert-base-*` (a masked-LM checkpoint, so 01 adds a fresh
    one-output head), with a WordPiece tokenizer learned on `texts` (vocab_size matches it)."""
    from transformers import BertTokenizerFast, DistilBertConfig, DistilBertForMaskedLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab_file = path / "vocab.txt"
    vocab = review_wordpiece_vocab(texts)
    vocab_file.write_text("\n".join(vocab) + "\n")
    # transformers 5 ignores `vocab_file=` (a 5-token tokenizer results): pass the file as `vocab`
    tok = BertTokenizerFast(vocab=str(vocab_file), do_lower_case=True, model_max_length=512)
    assert len(tok) == len(vocab) and tok.pad_token_id == 0 and tok.unk_token_id == 1
    torch.manual_seed(seed)
    DistilBertForMaskedLM(DistilBertConfig(vocab_size=len(vocab), pad_token_id=0)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def read_reviews(source: Path = SHARED / "imdb_train_4k.jsonl") -> list[dict]:
    """The rows (`text`, `label`) of a JSON-lines review file, raw text (IMDb's `<br />` breaks kept)."""
    return [json.loads(line) for line in source.read_text().splitlines() if line.strip()]


def save_imdb_folder(path: str | Path, rows: list[dict], n_train: int = 3000) -> str:
    """A data folder in IMDb's format: the first `n_train` rows as train.jsonl, the rest as test.jsonl."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", rows[:n_train]), ("test", rows[n_train:])):
        lines = (json.dumps({"text": r["text"], "label": int(r["label"])}) for r in part)
        (path / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return str(path)


def build_assets(root: str | Path, shared: Path = SHARED) -> dict[str, str]:
    """Everything the imdb preset needs, under `root`: `sft` (GPT-2 small), `reward_base` (DistilBERT-base
    shaped) and `data` (IMDb-format folder, 3,000 train / 1,000 test reviews)."""
    root = Path(root)
    rows = read_reviews(shared / "imdb_train_4k.jsonl")
    data = save_imdb_folder(root / "imdb", rows)
    train_texts = [r["text"] for r in rows[:3000]]
    return {
        "sft": save_gpt2_small(root / "gpt2", shared),
        "reward_base": save_distilbert_base(root / "distilbert", train_texts),
        "data": data,
    }
