"""Caption text: words, the word vocabulary of the GRU models, and BERT-family tokenizers.

The vocabulary follows the protocol's recipe (lower-case, drop punctuation and stop words, keep
words seen `min_count` times); `encode` applies the very same steps, so a caption is always
mapped the way the vocabulary was counted. `stopwords` says what `encode` does with a stop word:
`drop` it (the protocol's recipe, ours) or keep it as `<unk>` (`unk`: SWAN's release, whose
vocabulary has no stop words but whose captions keep every word, so the last-word pooling of its
text encoder often lands on an `<unk>`). Either way the vocabulary itself has no stop words.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1

# Function words that say nothing about what an image shows. Written for rsray: articles and
# determiners, pronouns, prepositions, auxiliaries and modals, conjunctions, a few adverbs and the
# negative contractions. Numbers, colours and sizes ("two", "red", "large") are content.
STOP_WORDS: frozenset[str] = frozenset(
    """
    a an the this that these those each every either neither any all both some such
    another other same own no not nor only
    i me my myself we us our ourselves you your yourself yourselves
    he him his himself she her herself it its itself they them their themselves
    what which who whom whose
    about above after against at before below between by down during for from in into
    of off on out over through to under until up with
    am is are was were be been being have has had having do does did doing
    will should can
    and but or so if then because as while than once when where why how
    here there again further very just too
    more most
    isn't aren't wasn't weren't hasn't haven't hadn't don't doesn't didn't won't wouldn't
    shouldn't can't cannot couldn't s t
""".split()
)

# Spatial words that are not plain prepositions ("near", "beside", "around", "across", "along",
# "behind") stay: remote-sensing captions use them to say where things are.

# A word: letters/digits, possibly joined by inner hyphens or apostrophes ("blue-green", "isn't").
_WORD = re.compile(r"[^\W_]+(?:[-'\u2019][^\W_]+)*")
_POSSESSIVE = re.compile(r"['\u2019]s$")


def words(caption: str) -> list[str]:
    """Lower-cased words of a caption with punctuation stripped ("Airport." -> "airport")."""
    out = []
    for token in _WORD.findall(caption.lower()):
        token = _POSSESSIVE.sub("", token).replace("\u2019", "'")  # "water's" -> "water"
        if token:
            out.append(token)
    return out


def content_words(caption: str) -> list[str]:
    """Words minus stop words: what the word vocabulary counts and encodes."""
    return [w for w in words(caption) if w not in STOP_WORDS]


STOPWORD_RULES = ("drop", "unk")


class Vocabulary:
    """Word -> id map: 0 = <pad>, 1 = <unk>, then words by descending count, ties alphabetical."""

    def __init__(self, itos: Sequence[str], min_count: int = 5, stopwords: str = "drop"):
        if stopwords not in STOPWORD_RULES:
            raise ValueError(f"stopwords must be drop or unk, got {stopwords!r}")
        if list(itos[:2]) != [PAD, UNK]:
            raise ValueError(f"a vocabulary must start with {PAD}, {UNK}; got {list(itos[:2])}")
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("a vocabulary must not repeat a word")
        self.min_count = min_count
        self.stopwords = stopwords

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5, stopwords: str = "drop") -> Vocabulary:
        return cls.from_counts(word_counts(captions), min_count=min_count, stopwords=stopwords)

    @classmethod
    def from_counts(cls, counts: Mapping[str, int], min_count: int = 5, stopwords: str = "drop") -> Vocabulary:
        """From content-word counts (`word_counts` of the captions; summed across Ray tasks for a
        corpus): the words seen at least `min_count` times."""
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls([PAD, UNK, *kept], min_count=min_count, stopwords=stopwords)

    def encode(self, caption: str) -> list[int]:
        """Ids of the caption's content words (stop words too, as <unk>, under `unk`); words
        outside the vocabulary map to <unk>."""
        kept = words(caption) if self.stopwords == "unk" else content_words(caption)
        return [self.stoi.get(w, UNK_ID) for w in kept]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.itos[i] for i in ids]

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and (self.itos, self.min_count, self.stopwords) == (
            other.itos,
            other.min_count,
            other.stopwords,
        )

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} entries, min_count={self.min_count}, stopwords={self.stopwords})"

    def to_dict(self) -> dict[str, Any]:
        # words[i] has id i, <pad> and <unk> first
        return {"min_count": self.min_count, "stopwords": self.stopwords, "words": list(self.itos)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vocabulary:
        """Manifests from before `stopwords` existed dropped them."""
        return cls(data["words"], min_count=int(data.get("min_count", 5)), stopwords=data.get("stopwords", "drop"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        return cls.from_dict(json.loads(Path(path).read_text()))


def word_counts(captions: Iterable[str]) -> Counter:
    """Content-word counts of `captions`: what `Vocabulary.build` counts."""
    return Counter(w for caption in captions for w in content_words(caption))


def build_vocabulary(
    records: Iterable[Any], splits: Sequence[str] = ("train",), min_count: int = 5, stopwords: str = "drop"
) -> Vocabulary:
    """The vocabulary of the captions of `records` whose split is in `splits` (train only: no leakage)."""
    wanted = set(splits)
    captions = (c for r in records if r.split in wanted for c in r.captions)
    return Vocabulary.build(captions, min_count=min_count, stopwords=stopwords)


def load_tokenizer(path: str | Path):
    """A BERT-family tokenizer from a local folder, a packaged model's name (`minilm`) or a
    transformers Hub name already in the Hugging Face cache (`rsray.weights`); never downloads
    (not found -> ValueError naming it)."""
    from rsray.weights import WeightsError, resolve

    if not path:
        raise ValueError("data.tokenizer is empty: name a tokenizer folder, alias or Hub model")
    try:
        path = resolve(str(path)).path
    except WeightsError as exc:
        raise ValueError(f"tokenizer {exc}") from None
    from transformers import AutoTokenizer  # slow import: only when a BERT-family model needs it

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())  # one line, whatever transformers wrote
        raise ValueError(f"tokenizer folder {path!s}: cannot load a tokenizer: {reason}") from None
