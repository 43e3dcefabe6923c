"""The offline preset: a synthetic IMDb stand-in built from nothing, on the CPU, deterministically.

The real preset aligns `lvwerra/gpt2-imdb` on `stanfordnlp/imdb`. Where the Hub or a GPU is missing (tests,
CI, a laptop on a train) the notebooks use this preset instead, and nothing is downloaded at run time:

1. `make_reviews`: a labelled movie-review corpus generated from word pools and sentence templates written
   here (train and test from independent random streams; about half positive).
2. `train_tokenizer`: a byte-level BPE tokenizer learned on the train reviews, GPT-2 style.
3. `pretrain_sft`: a tiny GPT-2 trained from scratch on the reviews, which plays the role of the SFT model.
4. `sft_quality`: checks the SFT before anything builds on it (held-out loss, and whether a completion keeps
   the sentiment of its prompt, scored by `lexicon_sentiment`, an oracle built from the generator's pools).
5. `build_offline_assets`: runs 1-4 once per seed into a cache folder in the same formats as the real assets
   (IMDb-style JSON lines; a `save_pretrained` folder), so both presets share one loading path:
   `load_dataset("json", ...)` and `AutoModelForCausalLM.from_pretrained(folder)`.

The trap this file is calibrated against (SPEC section 6): a small GPT-2 that has not trained long enough
sits on a loss plateau where it writes fluent reviews whose sentiment ignores the prompt. RL from such a model
is slow and noisy, so the SFT is trained for a fixed number of steps that is known to pass the plateau, and
its prompt/completion sentiment agreement is measured and stored next to it.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm

import utils

# Bump whenever the generator, tokenizer or SFT recipe changes: a cache built by another version is rebuilt.
OFFLINE_VERSION = "offline-v1"
EOS = "<|endoftext|>"


# ----------------------------------------------------------------------------------------------------------
# Word pools
#
# Polarity words live in exactly one pool per sign, and the lexicon scorer below is built from these same
# pools, so the generator and its oracle cannot disagree about what a word means. Neutral pools (aspects,
# names, genres, titles) never contain a polarity word.
# ----------------------------------------------------------------------------------------------------------

POS_ADJ = (
    "brilliant superb wonderful excellent outstanding terrific marvelous stunning gorgeous moving powerful "
    "delightful charming gripping captivating engaging hilarious clever witty thoughtful beautiful memorable "
    "fantastic magnificent touching inspired fresh compelling riveting heartfelt masterful sublime splendid "
    "remarkable enjoyable impressive elegant lovely great amazing exquisite breathtaking dazzling uplifting "
    "funny smart assured graceful haunting vivid absorbing luminous exhilarating original convincing "
    "authentic satisfying tender playful inventive"
).split()
NEG_ADJ = (
    "awful terrible dreadful boring dull tedious lifeless clumsy bland forgettable horrible atrocious weak "
    "lazy pointless messy incoherent wooden flat stale tiresome painful ugly shallow predictable silly "
    "pathetic embarrassing sloppy mediocre disappointing bad poor dire laughable unbearable annoying "
    "confusing cheap hollow generic derivative sluggish grating insufferable miserable muddled overlong "
    "pretentious limp vapid awkward tepid joyless contrived clunky amateurish"
).split()
# Adjectives that read naturally after a negator ("never boring", "not exactly convincing").
NEGATABLE_NEG = "boring dull bad tedious predictable clumsy awful terrible forgettable weak bland".split()
NEGATABLE_POS = "great good convincing memorable original funny clever engaging impressive exciting".split()
POS_EXTRA = ("good", "exciting")  # positive words that only appear in negatable/other slots
POS_NOUN = "masterpiece gem triumph delight treasure joy classic winner revelation marvel pleasure".split()
NEG_NOUN = "disaster mess failure bore letdown dud chore flop shambles slog catastrophe".split()
POS_VERB = "loved adored enjoyed admired cherished relished savored treasured".split()
NEG_VERB = "hated loathed detested disliked despised resented".split()
POS_FEEL = "delighted thrilled moved uplifted enchanted satisfied elated charmed grateful".split()
NEG_FEEL = "bored annoyed frustrated disappointed exhausted irritated cheated restless underwhelmed".split()
POS_SUPER = "best finest greatest strongest".split()
NEG_SUPER = "worst weakest dullest poorest".split()
POS_ADV = "thankfully happily luckily wonderfully beautifully".split()  # sentence openers / manner
NEG_ADV = "sadly unfortunately regrettably painfully woefully".split()
POS_REC = ("Highly recommended.", "Recommended without hesitation.", "A must-see.", "Worth every minute.")
NEG_REC = ("Avoid it.", "Skip this one.", "Not recommended.", "Not worth your time.", "A waste of time.")
# Lexicon-only words that appear inside fixed phrases above.
POS_PHRASE_WORDS = ("recommended", "must-see", "worth", "gladly")
NEG_PHRASE_WORDS = ("avoid", "skip", "waste", "regret", "regretted")

INTENSIFIERS = (
    "very really truly utterly absolutely incredibly remarkably genuinely thoroughly deeply extremely "
    "quite rather simply downright consistently surprisingly"
).split()
NEGATORS = ("not", "never", "no", "hardly", "barely", "nothing", "neither", "nor", "without")

# (noun phrase, is plural) so the verb agrees.
ASPECTS = (
    ("acting", False), ("plot", False), ("story", False), ("script", False), ("screenplay", False),
    ("score", False), ("soundtrack", False), ("music", False), ("cinematography", False),
    ("camera work", False), ("editing", False), ("dialogue", False), ("pacing", False), ("ending", False),
    ("finale", False), ("opening act", False), ("characters", True), ("cast", False),
    ("lead performance", False), ("supporting cast", False), ("direction", False), ("visuals", True),
    ("special effects", True), ("production design", False), ("costumes", True), ("humor", False),
    ("action scenes", True), ("twist", False), ("premise", False), ("romance", False), ("villain", False),
    ("climax", False), ("atmosphere", False), ("set pieces", True), ("writing", False),
    ("sound design", False), ("lighting", False), ("chemistry between the leads", False),
    ("final act", False), ("middle section", False), ("fight choreography", False), ("voice acting", False),
)  # fmt: skip
GENRES = (
    "thriller comedy drama western musical romance documentary mystery biopic fantasy noir satire melodrama "
    "adventure"
).split() + [
    "horror film", "sci-fi epic", "war film", "animated feature", "crime drama", "period piece",
    "superhero movie", "family film", "road movie", "courtroom drama", "heist movie", "spy thriller",
    "coming-of-age story", "romantic comedy", "disaster movie", "monster movie", "space opera",
    "political thriller", "sports drama", "ghost story",
]  # fmt: skip
FIRST_NAMES = (
    "Anna Ben Clara David Elena Frank Grace Henry Iris Jack Karen Leo Maria Nathan Olivia Paul Rosa Sam "
    "Tessa Victor Wendy Yusuf Zoe Hugo Mei Omar Priya Ravi Sofia Tom Nina Igor Lena Marco Ada Felix"
).split()
LAST_NAMES = (
    "Adams Becker Castillo Dawson Ellis Fischer Garcia Hayes Ivanova Jensen Kowalski Lambert Moreno Novak "
    "Okafor Park Quinn Russo Sato Turner Ueda Vargas Walsh Young Zimmer Bishop Carter Doyle Engel Foster "
    "Grant Holm Khan Lindqvist Mercer Nakamura"
).split()
TITLE_A = (
    "Silent Broken Last Crimson Hidden Distant Iron Golden Midnight Winter Burning Paper Glass Shadow "
    "Northern "
    "Velvet Hollow Electric Savage Quiet Forgotten Scarlet Endless Wild Frozen Restless Second Copper"
).split()
TITLE_B = (
    "River Garden Horizon Kingdom Letter Road City Mirror Promise Harbor Summer Empire Signal Orchard "
    "Station "
    "Island Frontier Season Witness Voyage Engine Echo Crown Tide Circus Machine Lighthouse Dynasty"
).split()
ROLES = (
    "detective", "young widow", "retired boxer", "small-town sheriff", "ambitious lawyer", "lonely pilot",
    "con artist", "war veteran", "village teacher", "rookie cop", "aging rock star", "rebel princess",
    "grieving father", "runaway teenager", "ship captain", "jazz singer", "scientist", "reluctant hero",
)  # fmt: skip
COMPANIONS = "my sister|my brother|a friend|my parents|my wife|my husband|my kids|a colleague|my roommate"
COMPANIONS = COMPANIONS.split("|")
TIMES = ("halfway point", "final act", "end credits", "second hour", "last twenty minutes", "midpoint")
VERDICT_OPENERS = ("Overall,", "In the end,", "All in all,", "Bottom line:", "In short,", "Ultimately,")


# ----------------------------------------------------------------------------------------------------------
# Review generator
# ----------------------------------------------------------------------------------------------------------


def _pools(p: int) -> dict[str, list[str] | tuple[str, ...]]:
    """Polarity pools for sign p (+1 positive, -1 negative)."""
    pos = p > 0
    return {
        "adj": POS_ADJ if pos else NEG_ADJ,
        "negated": NEGATABLE_NEG if pos else NEGATABLE_POS,  # "never boring" reads positive
        "noun": POS_NOUN if pos else NEG_NOUN,
        "verb": POS_VERB if pos else NEG_VERB,
        "feel": POS_FEEL if pos else NEG_FEEL,
        "super": POS_SUPER if pos else NEG_SUPER,
        "adv": POS_ADV if pos else NEG_ADV,
        "rec": POS_REC if pos else NEG_REC,
    }


def _article(word: str) -> str:
    """'a' or 'an' for the word that follows."""
    return "an" if word[0].lower() in "aeiou" else "a"


class _Writer:
    """Fills sentence templates from the pools with one random stream (one per split)."""

    def __init__(self, rng: random.Random):
        self.r = rng

    def pick(self, seq):
        return self.r.choice(seq)

    def name(self) -> str:
        return f"{self.pick(FIRST_NAMES)} {self.pick(LAST_NAMES)}"

    def title(self) -> str:
        return f"{self.r.choice(['', 'The '])}{self.pick(TITLE_A)} {self.pick(TITLE_B)}"

    def adj(self, p: int, intensify: float = 0.35) -> str:
        """A polarity adjective, sometimes with an intensifier in front."""
        a = self.pick(_pools(p)["adj"])
        return f"{self.pick(INTENSIFIERS)} {a}" if self.r.random() < intensify else a

    def neg_adj(self, p: int) -> str:
        """A negated adjective of the opposite sign, reading as sign p ("never boring" for p=+1)."""
        neg = self.pick(("not", "never", "hardly", "not exactly", "not once", "far from", "not at all"))
        return f"{neg} {self.pick(_pools(p)['negated'])}"

    def a_adj(self, p: int) -> str:
        """'a/an' + adjective phrase."""
        a = self.adj(p)
        return f"{_article(a)} {a}"

    # -- openers: the sentiment shows in the first few words, because RL prompts are the first 8 tokens --
    def opener(self, p: int, title: str) -> str:
        P, g = _pools(p), self.pick(GENRES)
        k = self.r.randrange(16)
        if k == 0:
            return f"{title} is {self.a_adj(p)} {g}."
        if k == 1:
            return f"What {self.a_adj(p)} {g}!"
        if k == 2:
            return f"I {self.pick(P['verb'])} this {g} from start to finish."
        if k == 3:
            return f"This is one of the {self.pick(P['super'])} {g}s I have seen in years."
        if k == 4:
            return f"{self.adj(p, 0.2).capitalize()} from the first scene to the last."
        if k == 5:
            return f"I {self.pick(P['verb'])} every minute of {title}."
        if k == 6:
            return f"Simply put, this {g} is {_article(n := self.pick(P['noun']))} {n}."
        if k == 7:
            a, b = self.pick(P["adj"]), self.pick(P["adj"])
            return (
                f"{_article(a).capitalize()} {a}, {b} {g} with {_article(c := self.name())} {c} in the lead."
            )
        if k == 8:
            return f"{self.neg_adj(p).capitalize()} for a second, this {g} is {self.adj(p)}."
        if k == 9:
            return f"I came out of {title} {self.pick(P['feel'])}."
        if k == 10:
            return f"{self.pick(P['adv']).capitalize()}, {title} is {self.adj(p)} from beginning to end."
        if k == 11:
            a = self.pick(P["adj"])
            return f"{_article(a).capitalize()} {a} {g}, and {self.adj(p)} in every way."
        if k == 12:
            b, c = self.r.sample(P["adj"], 2)
            return f"{self.adj(p, 0.5).capitalize()}, {b} and {c}."
        if k == 13:
            return f"My {self.pick(P['super'])} movie night in ages: {title}, {self.a_adj(p)} {g}."
        if k == 14:
            return f"{self.name()}'s {self.adj(p)} new {g} is {_article(n := self.pick(P['noun']))} {n}."
        return f"{self.pick(P['noun']).capitalize()}. There is no other word for {title}."

    # -- body: aspect sentences, actors, feelings --
    def body(self, p: int) -> str:
        P = _pools(p)
        asp, plural = self.pick(ASPECTS)
        is_ = "are" if plural else "is"
        was = "were" if plural else "was"
        k = self.r.randrange(16)
        if k == 0:
            return f"The {asp} {is_} {self.adj(p)}."
        if k == 1:
            return f"The {asp} {is_} {self.neg_adj(p)}."
        if k == 2:
            return f"{self.name()} gives {self.a_adj(p)} performance as the {self.pick(ROLES)}."
        if k == 3:
            a, b = self.name(), self.name()
            return f"{a} is {self.adj(p)} as the {self.pick(ROLES)}, and {b} is {self.adj(p)} too."
        if k == 4:
            return f"I found the {asp} {self.adj(p)} and {self.pick(P['adj'])}."
        if k == 5:
            return f"Even the {asp} {was} {self.adj(p)}."
        if k == 6:
            return f"Every scene with {self.name()} is {self.adj(p)}."
        if k == 7:
            asp2 = self.pick(ASPECTS)[0]
            return f"The {asp} and the {asp2} are both {self.adj(p)}."
        if k == 8:
            return f"By the {self.pick(TIMES)}, I was {self.pick(P['feel'])}."
        if k == 9:
            return f"{self.pick(P['adv']).capitalize()}, the {asp} {is_} {self.adj(p)}."
        if k == 10:
            return f"It is the kind of {self.pick(GENRES)} that leaves you {self.pick(P['feel'])}."
        if k == 11:
            return f"I watched it with {self.pick(COMPANIONS)} and we were both {self.pick(P['feel'])}."
        if k == 12:
            return (
                f"The {asp} {is_} {self.adj(p)}, and the {self.pick(ASPECTS)[0]} is no better."
                if p < 0
                else (f"The {asp} {is_} {self.adj(p)}, and the {self.pick(ASPECTS)[0]} is even better.")
            )
        if k == 13:
            return (
                f"{self.name()} directs with {self.a_adj(p)} eye for detail."
                if p > 0
                else (f"{self.name()} directs as if {self.pick(NEG_FEEL[:2])}, and it shows.")
            )
        if k == 14:
            return f"The {asp} {was} {self.adj(p)}, the {self.pick(ASPECTS)[0]} {self.adj(p)}."
        return f"There is {self.adj(p)} work from {self.name()} and {self.name()}."

    def contrast(self, p: int) -> str:
        """One aspect of the opposite sign, framed so the review's sign p still wins."""
        asp, plural = self.pick(ASPECTS)
        is_ = "are" if plural else "is"
        if p > 0:
            return self.pick((
                f"My only complaint is the {asp}, which {is_} {self.adj(-p, 0)}.",
                f"The {asp} {is_} {self.adj(-p, 0)}, but that hardly matters.",
                f"Sure, the {asp} {is_} a little {self.pick(NEG_ADJ)}.",
            ))  # fmt: skip
        return self.pick((
            f"The one redeeming feature is the {asp}, which {is_} {self.adj(-p, 0)}.",
            f"The {asp} {is_} {self.adj(-p, 0)}, but it cannot save the film.",
            f"Sure, the {asp} {is_} {self.pick(POS_ADJ)} at times.",
        ))  # fmt: skip

    def verdict(self, p: int, title: str) -> str:
        P, g = _pools(p), self.pick(GENRES)
        k = self.r.randrange(9)
        if k == 0:
            return f"{self.pick(VERDICT_OPENERS)} {self.a_adj(p)} {g}."
        if k == 1:
            return f"{self.pick(VERDICT_OPENERS)} {title} is {_article(n := self.pick(P['noun']))} {n}."
        if k == 2:
            return self.pick(P["rec"])
        if k == 3:
            n = self.r.randint(7, 10) if p > 0 else self.r.randint(1, 4)
            return f"I give it {n} out of 10."
        if k == 4:
            return "I would gladly watch it again." if p > 0 else "I regret buying a ticket."
        if k == 5:
            return f"{self.pick(VERDICT_OPENERS)} {self.adj(p)} and {self.pick(P['adj'])}."
        if k == 6:
            return f"{self.pick(VERDICT_OPENERS)} it is {self.neg_adj(p)}, and {self.adj(p)}."
        if k == 7:
            return "I do not regret a minute of it." if p > 0 else "I want those two hours back."
        return f"{self.pick(VERDICT_OPENERS)} one of the {self.pick(P['super'])} films of the year."

    def review(self, p: int) -> str:
        """One review of sign p, 3-6 sentences: opener, body (maybe one contrasting aspect), verdict."""
        title = self.title()
        u = self.r.random()
        has_verdict = u < 0.14 or self.r.random() < 0.75
        n_body = self.r.randint(2 if has_verdict else 3, 4)
        body = [self.body(p) for _ in range(n_body)]
        if u < 0.08:
            # late-verdict review: it opens against its own sign, the rest and the verdict decide
            asp, plural = self.pick(ASPECTS)
            first = f"The {asp} {'are' if plural else 'is'} {self.adj(-p)}."
            body[0] = (
                f"{self.pick(('But', 'Still,', 'Yet'))} {self.pick(('everything else', 'the rest'))} "
                f"is {self.adj(p)}."
            )
        elif u < 0.14:
            # neutral opener: the sentiment shows only later
            first = (
                f"I saw {title} with {self.pick(COMPANIONS)} last {self.pick(('weekend', 'night', 'week'))}."
            )
        else:
            first = self.opener(p, title)
            if self.r.random() < 0.25:
                # mixed review: one aspect goes the other way, the rest and the verdict decide
                body.insert(self.r.randrange(1, n_body + 1), self.contrast(p))
        sents = [first, *body] + ([self.verdict(p, title)] if has_verdict else [])
        return " ".join(sents[:6])


def make_reviews(n_train: int = 12000, n_test: int = 2000, seed: int = 0) -> datasets.DatasetDict:
    """Synthetic labelled movie reviews (IMDb columns `text`, `label`; 1 = positive), train and test."""
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        # independent streams per split: str seeds hash with SHA-512, stable across runs and platforms
        rng = random.Random(f"warp-imdb/{OFFLINE_VERSION}/{split}/{seed}")
        writer = _Writer(rng)
        labels = [i % 2 for i in range(n)]  # exactly balanced, then shuffled
        rng.shuffle(labels)
        texts = [writer.review(1 if y else -1) for y in labels]
        splits[split] = datasets.Dataset.from_dict({"text": texts, "label": labels})
    return datasets.DatasetDict(splits)


def duplicate_rate(train_texts: list[str], test_texts: list[str]) -> float:
    """Share of test texts that also occur verbatim in train."""
    seen = set(train_texts)
    return sum(t in seen for t in test_texts) / max(len(test_texts), 1)


# ----------------------------------------------------------------------------------------------------------
# Lexicon oracle
# ----------------------------------------------------------------------------------------------------------

_LEXICON: dict[str, float] = {
    **{w: 1.0 for w in POS_ADJ + list(POS_EXTRA) + POS_NOUN + POS_VERB + POS_FEEL + POS_SUPER + POS_ADV},
    **{w: 1.0 for w in POS_PHRASE_WORDS},
    **{w: -1.0 for w in NEG_ADJ + NEG_NOUN + NEG_VERB + NEG_FEEL + NEG_SUPER + NEG_ADV},
    **{w: -1.0 for w in NEG_PHRASE_WORDS},
}
_TOKEN = re.compile(r"[a-z]+(?:[-'][a-z]+)*|\d+|[.,!?;:]")
_RATING = re.compile(r"(\d+)\s*(?:/|out of)\s*10\b")
_NEGATION_WINDOW = 3  # a negator flips the next polarity word at most this many words later
_INTENSITY = 1.5  # an intensifier right before a polarity word
_NEGATED = 0.75  # "not bad" is weaker than "good"
_VERDICT_WEIGHT = 2.0  # "Overall, ..." sentences carry the reviewer's decision


def lexicon_sentiment(text: str) -> float:
    """Polarity score from the generator's own word pools: > 0 positive, < 0 negative, 0 none found."""
    score = 0.0
    for sentence in re.split(r"(?<=[.!?])\s+", text.lower()):
        toks = _TOKEN.findall(sentence)
        weight = (
            _VERDICT_WEIGHT
            if any(sentence.startswith(v.lower().rstrip(",:")) for v in VERDICT_OPENERS)
            else 1
        )
        negate_until, boost = -1, 1.0
        for i, t in enumerate(toks):
            if t in ".,!?;:" or t == "but":
                negate_until = -1  # negation does not cross a clause boundary
            elif t in NEGATORS or t.endswith("n't") or (t == "from" and i and toks[i - 1] == "far"):
                negate_until = i + _NEGATION_WINDOW
            elif t in INTENSIFIERS:
                boost = _INTENSITY
                continue
            elif t in _LEXICON:
                s = _LEXICON[t] * boost * weight
                if i <= negate_until:
                    s, negate_until = -_NEGATED * s, -1
                score += s
            boost = 1.0
        for m in _RATING.finditer(sentence):
            score += weight * (int(m.group(1)) - 5.5) / 2  # 10/10 -> +2.25, 1/10 -> -2.25
    return score


# ----------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE learned on `texts`, GPT-2 style: `<|endoftext|>` is bos, eos, unk and pad."""
    tok = Tokenizer(models.BPE())
    # GPT-2's byte-level pre-tokenizer: no text is ever out of vocabulary, and " word" carries its space
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,  # like GPT-2 users do; padding side is left to the caller
        model_max_length=128,
    )


# ----------------------------------------------------------------------------------------------------------
# SFT model: a tiny GPT-2 pretrained on the reviews
# ----------------------------------------------------------------------------------------------------------


def _review_ids(
    texts: list[str], tokenizer: transformers.PreTrainedTokenizerFast, max_len: int
) -> list[list[int]]:
    """Token ids of each review followed by EOS, cut to max_len (the model learns where a review ends)."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [(x + [tokenizer.eos_token_id])[:max_len] for x in ids]


def _pad_batch(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded label positions are -100 so they carry no loss."""
    T = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of lr (nanoGPT's schedule)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain_sft(
    dataset: datasets.Dataset,
    tokenizer: transformers.PreTrainedTokenizerFast,
    *,
    n_layer: int = 2,
    n_embd: int = 128,
    n_head: int = 4,
    steps: int = 900,
    lr: float = 3e-3,
    batch_size: int = 32,
    warmup: int = 60,
    seed: int = 0,
    progress: bool = True,
) -> transformers.GPT2LMHeadModel:
    """Train a tiny GPT-2 from scratch on 'review + EOS' sequences for a fixed number of steps."""
    torch.manual_seed(seed)  # weight init
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,  # reviews are < 100 tokens; RL prompts 8-17 tokens + ~50 new
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        # no dropout: the corpus is large next to the model, and dropout slows the escape from the plateau
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    model = transformers.GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    seqs = _review_ids(list(dataset["text"]), tokenizer, config.n_positions)
    gen = torch.Generator().manual_seed(seed)  # batch order, independent of the global RNG
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)

    model.train()
    batches: list[list[int]] = []
    for step in tqdm(range(steps), desc="SFT pretraining", disable=not progress):
        if not batches:
            # one epoch of random batches of similar-length reviews: little compute goes to padding
            batches = utils.length_buckets([len(s) for s in seqs], batch_size, gen, drop_last=True)
        batch = _pad_batch([seqs[i] for i in batches.pop()], tokenizer.eos_token_id)
        # determine the learning rate
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        # forward, backward, update
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------------------
# SFT quality: held-out loss, and does a completion keep its prompt's sentiment?
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def heldout_loss(
    model: transformers.PreTrainedModel,
    tokenizer: transformers.PreTrainedTokenizerFast,
    texts: list[str],
    batch_size: int = 64,
) -> float:
    """Mean per-token NLL of 'review + EOS' sequences (pads excluded)."""
    seqs = _review_ids(texts, tokenizer, model.config.n_positions)
    total, count = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        batch = _pad_batch(seqs[i : i + batch_size], tokenizer.eos_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # token t predicts t+1
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100, reduction="sum"
        )
        total += nll.item()
        count += (batch["labels"][:, 1:] != -100).sum().item()
    return total / count


@torch.no_grad()
def sft_quality(
    model: transformers.PreTrainedModel,
    tokenizer: transformers.PreTrainedTokenizerFast,
    test_dataset: datasets.Dataset,
    n_prompts: int = 200,
    prompt_tokens: int = 8,
    max_new_tokens: int = 48,
    seed: int = 0,
    n_loss: int = 1000,
) -> dict[str, float]:
    """Held-out loss, and sentiment of completions sampled from the first prompt_tokens of test reviews."""
    model.eval()
    n_loss = min(n_loss, len(test_dataset))
    loss = heldout_loss(model, tokenizer, list(test_dataset.select(range(n_loss))["text"]))

    # prompts: the first prompt_tokens tokens of test reviews (all reviews are longer, so no padding needed)
    rows = test_dataset.select(range(min(n_prompts, len(test_dataset))))
    ids = tokenizer(list(rows["text"]), add_special_tokens=False)["input_ids"]
    keep = [i for i, x in enumerate(ids) if len(x) > prompt_tokens]
    prompts = torch.tensor([ids[i][:prompt_tokens] for i in keep])  # (N, prompt_tokens)
    labels = [rows[i]["label"] for i in keep]

    # sample as RL will: plain ancestral sampling, no truncation of the distribution
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    new = out[:, prompt_tokens:]  # (N, <= max_new_tokens)
    is_eos = new == tokenizer.eos_token_id
    # tokens before the first EOS (generate pads finished rows with EOS)
    n_new = torch.where(is_eos.any(1), is_eos.int().argmax(1), new.shape[1])  # (N,)
    completions = [tokenizer.decode(row[:n].tolist()) for row, n in zip(new, n_new.tolist(), strict=True)]
    scores = [lexicon_sentiment(c) for c in completions]
    agree = [(s > 0 and y == 1) or (s < 0 and y == 0) for s, y in zip(scores, labels, strict=True)]
    return {
        "heldout_loss": loss,
        "positive_share": sum(s > 0 for s in scores) / len(scores),
        "neutral_share": sum(s == 0 for s in scores) / len(scores),
        "agreement": sum(agree) / len(agree),
        "mean_new_tokens": float(n_new.float().mean()),
        "n_prompts": len(keep),
    }


# ----------------------------------------------------------------------------------------------------------
# Build and cache
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OfflineConfig:
    """Sizes of the offline preset; part of the cache marker, so a different config rebuilds."""

    n_train: int = 12000
    """Train reviews: ~3 epochs in `sft_steps` batches; also the reward model's pairs come from here."""
    n_test: int = 2000
    """Test reviews: RL/eval prompts and the SFT held-out loss."""
    vocab_size: int = 4096
    """BPE vocabulary cap; the corpus only needs ~2.2k tokens, so this just means 'every word whole'."""
    n_layer: int = 2
    """2 layers pass the loss plateau sooner than 4 on a CPU budget (SPEC section 6)."""
    n_embd: int = 128
    """Width of the SFT GPT-2."""
    n_head: int = 4
    """Attention heads."""
    sft_steps: int = 900
    """Fixed, not wall-clock. Agreement sits at chance until ~600 steps, then 0.87 at 750 and 0.90 at 900
    (measured at batch 32, lr 3e-3); batch 16 escapes no sooner in steps, so the steps are what matter."""
    sft_lr: float = 3e-3
    """Peak AdamW lr; high for a tiny model, it shortens the plateau (2e-3 gave 0.89 only at ~900)."""
    sft_batch_size: int = 32
    """Reviews per step (~1.6k tokens)."""
    quality_prompts: int = 200
    """Test prompts whose completions `sft_quality` scores."""


def default_cache_dir() -> Path:
    """Where the offline assets live: $WARP_CACHE, else ~/.cache/warp-imdb."""
    return Path(os.environ.get("WARP_CACHE") or Path.home() / ".cache" / "warp-imdb")


def _marker(seed: int, config: OfflineConfig) -> dict:
    """Contents of the COMPLETE marker: what a cache must match to be reused."""
    return {"version": OFFLINE_VERSION, "seed": seed, "config": asdict(config)}


def _is_complete(cache_dir: Path, marker: dict) -> bool:
    """True when cache_dir holds a finished build with exactly this marker."""
    try:
        return json.loads((cache_dir / "COMPLETE").read_text()) == marker
    except (OSError, ValueError):
        return False


def _write_jsonl(path: Path, ds: datasets.Dataset) -> None:
    """IMDb's format: one {"text": ..., "label": ...} object per line."""
    with open(path, "w", encoding="utf-8") as f:
        for row in ds:
            f.write(json.dumps({"text": row["text"], "label": row["label"]}) + "\n")


def build_offline_assets(
    cache_dir: str | Path,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    config: OfflineConfig | None = None,
) -> dict[str, Path]:
    """Build (or reuse) the offline corpus and SFT in cache_dir; return {"data": folder, "sft": folder}."""
    config = config or OfflineConfig()
    cache_dir = Path(cache_dir).expanduser().resolve()
    paths = {"data": cache_dir / "data", "sft": cache_dir / "sft"}
    marker = _marker(seed, config)
    if not force and _is_complete(cache_dir, marker):
        return paths

    # build everything in a temporary sibling: an interrupted build leaves no folder that looks complete
    start = time.perf_counter()
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.partial-", dir=cache_dir.parent))
    try:
        corpus = make_reviews(config.n_train, config.n_test, seed)
        (tmp / "data").mkdir()
        for split in ("train", "test"):
            _write_jsonl(tmp / "data" / f"{split}.jsonl", corpus[split])

        tokenizer = train_tokenizer(corpus["train"]["text"], vocab_size=config.vocab_size)
        model = pretrain_sft(
            corpus["train"],
            tokenizer,
            n_layer=config.n_layer,
            n_embd=config.n_embd,
            n_head=config.n_head,
            steps=config.sft_steps,
            lr=config.sft_lr,
            batch_size=config.sft_batch_size,
            seed=seed,
            progress=progress,
        )
        model.save_pretrained(tmp / "sft")
        tokenizer.save_pretrained(tmp / "sft")
        quality = sft_quality(model, tokenizer, corpus["test"], n_prompts=config.quality_prompts, seed=seed)
        token_counts = [
            len(x) for x in tokenizer(list(corpus["train"]["text"]), add_special_tokens=False)["input_ids"]
        ]
        quality.update(
            build_seconds=time.perf_counter() - start,
            sft_steps=config.sft_steps,
            vocab_size=len(tokenizer),
            mean_review_tokens=sum(token_counts) / len(token_counts),
            duplicate_rate=duplicate_rate(list(corpus["train"]["text"]), list(corpus["test"]["text"])),
            seed=seed,
            version=OFFLINE_VERSION,
        )
        (tmp / "sft" / "quality.json").write_text(json.dumps(quality, indent=2))
        (tmp / "COMPLETE").write_text(json.dumps(marker, indent=2))  # last: its presence means "finished"

        if _is_complete(cache_dir, marker) and not force:
            return paths  # another process finished the same build meanwhile; keep theirs
        # swap in: move the old cache aside (os.replace cannot overwrite a non-empty folder), then rename
        old = None
        if cache_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.old-", dir=cache_dir.parent))
            os.replace(cache_dir, old / "cache")
        os.replace(tmp, cache_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op after a successful swap
    return paths


# The reference LM for coherence: trained apart from the SFT (another seed, another width), so that it
# judges the fluency of RL's completions without sharing the SFT's own quirks. Its own folder and marker
# inside the cache: building it never invalidates the corpus and SFT that runs already used.
REFERENCE_LM = dict(n_layer=2, n_embd=192, n_head=4, steps=900, seed_offset=1000)


def build_reference_lm(cache_dir: str | Path, seed: int = 0, progress: bool = True) -> Path:
    """Build (or reuse) `cache_dir/reference_lm`: a GPT-2 trained on the offline train reviews with the
    SFT's tokenizer; the offline assets in `cache_dir` must exist (`build_offline_assets`)."""
    cache_dir = Path(cache_dir).expanduser().resolve()
    folder = cache_dir / "reference_lm"
    marker = {"version": OFFLINE_VERSION, "seed": seed, "recipe": REFERENCE_LM}
    if _is_complete(folder, marker):
        return folder
    if not (cache_dir / "sft").exists():
        raise FileNotFoundError(f"{cache_dir} has no offline SFT: build the offline assets first")
    tokenizer = transformers.AutoTokenizer.from_pretrained(cache_dir / "sft")
    train = datasets.load_dataset("json", data_files=str(cache_dir / "data" / "train.jsonl"), split="train")
    recipe = {k: v for k, v in REFERENCE_LM.items() if k != "seed_offset"}
    start = time.perf_counter()
    model = pretrain_sft(
        train, tokenizer, seed=seed + REFERENCE_LM["seed_offset"], progress=progress, **recipe
    )
    test = datasets.load_dataset("json", data_files=str(cache_dir / "data" / "test.jsonl"), split="train")
    loss = heldout_loss(model, tokenizer, list(test["text"][:1000]))
    tmp = Path(tempfile.mkdtemp(prefix=".reference_lm.partial-", dir=cache_dir))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {"heldout_loss": loss, "build_seconds": time.perf_counter() - start, **marker}
        (tmp / "quality.json").write_text(json.dumps(info, indent=2))
        (tmp / "COMPLETE").write_text(json.dumps(marker, indent=2))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build the offline preset's corpus and SFT model once.")
    parser.add_argument(
        "--cache", default=None, help="cache folder (default: $WARP_CACHE or ~/.cache/warp-imdb)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete cache exists")
    args = parser.parse_args()
    built = build_offline_assets(args.cache or default_cache_dir(), seed=args.seed, force=args.force)
    print(json.dumps({k: str(v) for k, v in built.items()}, indent=2))
    print((built["sft"] / "quality.json").read_text())
