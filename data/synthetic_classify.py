"""A deterministic synthetic sentiment-classification set: short film reviews of filler words.

The rule a classifier has to find: every sentiment word counts +1 (a word of POSITIVE) or -1 (of
NEGATIVE), flipped when a negator stands right before it ("not great" counts -1, "never dull"
+1); the label is `positive` when the sum is above 0, `negative` below it, and `neutral` for a
review without sentiment words. So the words alone do not decide it: "not great ... dull" and
"great ... not dull" hold the same words, and a negator before a filler word ("not the plot")
flips nothing; a model has to read which word each negator stands before, in reviews of 5 to 60
words (most of them short) that a batch pads to its longest.

Row `i` of a split depends only on (seed, split, i), so the data are the same on every machine,
and a text is in the eval split exactly when its checksum says so: eval never repeats a train text.
"""

from __future__ import annotations

import math
import random
import zlib

LABELS = ("negative", "neutral", "positive")  # in id order: sorted, as labels are discovered

POSITIVE = (
    "good", "great", "excellent", "wonderful", "superb", "brilliant", "delightful", "charming",
    "enjoyable", "fantastic", "lovely", "moving", "clever", "gripping", "beautiful", "solid",
)  # fmt: skip
NEGATIVE = (
    "bad", "awful", "terrible", "boring", "dull", "poor", "weak", "clumsy",
    "tedious", "dreadful", "bland", "messy", "painful", "shallow", "lifeless", "forgettable",
)  # fmt: skip
NEGATORS = ("not", "never", "hardly", "barely")
INTENSIFIERS = ("very", "really", "truly", "quite", "so")
FILLER = (
    "the", "a", "this", "that", "its", "their", "my", "our", "an", "some",
    "film", "movie", "story", "plot", "cast", "actor", "actress", "director", "script", "scene",
    "ending", "music", "score", "camera", "character", "dialogue", "pace", "sequel", "book",
    "version", "studio", "screen", "audience", "crowd", "lead", "role", "performance", "budget",
    "effects", "sound", "colour", "set", "costume", "city", "night", "day", "summer", "winter",
    "was", "is", "felt", "seemed", "looked", "sounded", "became", "stayed", "got", "had",
    "and", "but", "with", "of", "in", "on", "for", "about", "after", "before",
    "during", "then", "also", "still", "overall", "again", "at", "by", "from", "to",
    "we", "i", "they", "it", "he", "she", "you", "everyone", "nobody", "someone",
    "watched", "saw", "heard", "read", "expected", "remembered", "noticed", "thought", "said",
    "saturday", "evening", "theater", "friends", "hour", "minutes", "first", "second", "last",
    "time", "twice", "once", "today", "yesterday", "home", "town", "trip", "ticket", "seat",
)  # fmt: skip

# Sentiment words per review of a positive or negative label, and the weights they are drawn
# with. Both of two agree once negation is read ("great ... not dull"); three, where two would
# outvote one, took a tiny BERT several times longer to get right.
NUM_MENTIONS = (1, 2)
NUM_MENTIONS_WEIGHTS = (2, 1)
NEGATED = 0.35  # share of sentiment words said through a negator ("not dull" counts +1)
INTENSIFIED = 0.3  # share of the other sentiment words with an intensifier ("very good")
DISTRACTOR = 0.15  # share of reviews with a negator before a filler word (it flips nothing)
MIN_WORDS, MAX_WORDS = 5, 60  # review length in words, drawn log-uniformly
EVAL_SHARE = 10  # a text is eval when its CRC-32 is 0 modulo this


def vocabulary() -> list[str]:
    """Every word the reviews use, in a fixed order (the demo's WordPiece vocabulary)."""
    words = [*FILLER, *POSITIVE, *NEGATIVE, *NEGATORS, *INTENSIFIERS]
    return list(dict.fromkeys(words))


def label_of(text: str) -> str:
    """The label the rule gives `text` (the generator checks every row against it)."""
    words = text.rstrip(".").replace(",", "").split()
    total = 0
    for i, word in enumerate(words):
        polarity = (word in POSITIVE) - (word in NEGATIVE)
        if i >= 1 and words[i - 1] in NEGATORS:
            polarity = -polarity
        total += polarity
    return LABELS[(total > 0) - (total < 0) + 1]


def _polarities(rng: random.Random, label: str) -> list[int]:
    """The effective polarity (+1/-1) of each sentiment word of a review of `label`."""
    if label == "neutral":
        return []
    sign = 1 if label == "positive" else -1
    num = rng.choices(NUM_MENTIONS, NUM_MENTIONS_WEIGHTS)[0]
    while True:  # rejection: the sum must have the label's sign
        polarities = [rng.choice((1, -1)) for _ in range(num)]
        if sign * sum(polarities) > 0:
            return polarities


def _mention(rng: random.Random, polarity: int) -> list[str]:
    """One sentiment word of effective `polarity`: "not dull", "very good" or "good"."""
    negated = rng.random() < NEGATED
    word = rng.choice(POSITIVE if (polarity > 0) != negated else NEGATIVE)
    if negated:
        return [rng.choice(NEGATORS), word]
    if rng.random() < INTENSIFIED:
        return [rng.choice(INTENSIFIERS), word]
    return [word]


def _review(rng: random.Random, label: str) -> str:
    mentions = [_mention(rng, p) for p in _polarities(rng, label)]
    if mentions and rng.random() < 0.5:
        rng.shuffle(mentions)
    distractor = rng.random() < DISTRACTOR
    num_words = round(math.exp(rng.uniform(math.log(MIN_WORDS), math.log(MAX_WORDS))))
    num_filler = max(2, num_words - sum(len(m) for m in mentions) - distractor)
    # Phrases: filler words one by one and the mentions whole, in random order.
    phrases: list[list[str]] = [[rng.choice(FILLER)] for _ in range(num_filler)]
    for mention in mentions:
        phrases.insert(rng.randrange(len(phrases) + 1), mention)
    if distractor:
        # A negator before a filler word (before a sentiment word it would flip it).
        slots = [i for i, p in enumerate(phrases) if len(p) == 1 and p[0] in FILLER]
        i = rng.choice(slots)
        phrases[i] = [rng.choice(NEGATORS), phrases[i][0]]
    words = [w for p in phrases for w in p]
    if len(words) > 8 and rng.random() < 0.5:
        cut = rng.randrange(3, len(words) - 3)
        if words[cut - 1] not in NEGATORS and words[cut - 1] not in INTENSIFIERS:
            words[cut - 1] += ","  # a clause break, never inside "not good" or "very good"
    return " ".join(words) + "."


def _is_eval(text: str) -> bool:
    return zlib.crc32(text.encode()) % EVAL_SHARE == 0


def generate_classification(num_rows: int, seed: int, split: str = "train") -> list[dict[str, str]]:
    """`num_rows` reviews of `split` ("train" or "eval"), the labels taking turns (balanced),
    each `{"id", "text", "label"}` with the label a name of LABELS."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"classify-{seed}-{split}")
    rows = []
    for i in range(num_rows):
        label = LABELS[i % len(LABELS)]
        while True:
            text = _review(rng, label)
            if _is_eval(text) == (split == "eval"):
                break
        # The generator and the stated rule must agree on every row it writes.
        assert label_of(text) == label, (text, label)
        rows.append({"id": f"{split}-{i}", "text": text, "label": label})
    return rows
