"""The embedded task: synthetic sentiment sentences that dpft generates itself.

Deterministic from a seed, so every machine builds the same dataset offline. Labels need more than
keyword spotting: negation flips polarity ("not bad" is positive), and in contrast sentences the
clause after "but" decides ("dull at first but superb overall" is positive).
"""

from __future__ import annotations

import random

POS = ["good", "great", "superb", "moving", "charming", "brilliant", "delightful", "gripping",
       "wonderful", "clever", "warm", "funny", "beautiful", "memorable", "fresh", "engaging"]
NEG = ["bad", "dull", "awful", "boring", "clumsy", "tedious", "bland", "weak", "messy",
       "forgettable", "lifeless", "painful", "silly", "flat", "predictable", "shallow"]
SUBJECTS = ["the film", "the movie", "the plot", "the acting", "the script", "the score",
            "the ending", "the cast", "the dialogue", "the direction", "this picture", "the story"]
VERBS = ["is", "was", "feels", "seemed", "turned out"]
INTENS = ["", "", "really ", "very ", "truly ", "quite "]
NEGATIONS = ["not", "never", "hardly"]


def _clause(rng: random.Random, polarity: int) -> str:
    subj, verb, inten = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(INTENS)
    if rng.random() < 0.3:  # negated opposite word: "not bad" → positive
        word = rng.choice(NEG if polarity else POS)
        return f"{subj} {verb} {rng.choice(NEGATIONS)} {inten}{word}"
    word = rng.choice(POS if polarity else NEG)
    return f"{subj} {verb} {inten}{word}"


def make_example(rng: random.Random) -> tuple[str, int]:
    label = rng.randint(0, 1)
    if rng.random() < 0.35:  # contrast: the second clause decides
        first = _clause(rng, 1 - label)
        return f"{first}, but {_clause(rng, label)} .", label
    return f"{_clause(rng, label)} .", label


def make_split(n: int, seed: int) -> tuple[list[tuple[str]], list[int]]:
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        text, label = make_example(rng)
        texts.append((text,))
        labels.append(label)
    return texts, labels
