"""The pairs the training benchmark trains on: synthetic chat pairs (default), HH-RLHF, or words.

* `synthetic_pairs`: short, realistic user feedback (a question; a friendly, concrete answer chosen
  over a curt or evasive one), built from seeded templates, so the benchmark needs no data files.
* `hh_pairs`: HH-RLHF helpful-base test pairs from the shared data folder (`--pairs hh-rlhf`),
  the shortest ones, so a run stays within minutes on a CPU.
* `word_pairs`: pairs of synthetic words for the random-initialised GPU models, whose tokenizer
  (see bench.training.gpu) maps each word to one token.
"""

from __future__ import annotations

import random
from pathlib import Path

from foundation.pairs import Pair

TOPICS = (
    "sourdough bread", "compound interest", "black holes", "the French Revolution",
    "photosynthesis", "unit testing", "jet lag", "composting", "the stock market", "volcanoes",
    "sleep hygiene", "electric cars", "impressionist painting", "the immune system",
    "solar panels", "chess openings",
    "public speaking", "tea brewing", "plate tectonics", "password managers", "marathon training",
    "coral reefs", "budget travel", "machine learning", "the Roman Empire", "houseplants",
    "noise-cancelling headphones", "climate change", "jazz improvisation", "vaccines", "bees",
    "remote work", "origami", "the water cycle", "credit scores", "meditation", "3D printing",
    "tides", "coffee roasting", "learning a language",
)  # fmt: skip
QUESTIONS = (
    "Can you explain {t} in simple terms?",
    "What is the most important thing to know about {t}?",
    "I'm a beginner. How should I get started with {t}?",
    "Why do people find {t} interesting?",
    "Give me two practical tips about {t}.",
    "What is a common misconception about {t}?",
    "How would you describe {t} to a ten-year-old?",
    "Summarise {t} in a few sentences.",
)
CHOSEN = (
    "Sure! In short, {t} is easier to understand once you see the main idea: it comes down to a "
    "few simple rules that build on each other. A good first step is to look at one concrete "
    "example, then ask what changes when you vary one thing at a time.",
    "Great question. The key point about {t} is that small, steady habits matter more than big "
    "efforts. Start with the basics, write down what you notice, and come back to it after a "
    "week; you will be surprised how much clearer it feels.",
    "Here is a friendly overview of {t}: first, it has a long history; second, the core ideas "
    "are simple even if the details are not; third, trying it yourself is the fastest way to "
    "learn. Let me know if you want a step-by-step plan.",
)
REJECTED = (
    "It's complicated. Look it up.",
    "{t} is just {t}. Not much more to say.",
    "I don't really know much about that, sorry. Maybe ask someone else or search online for "
    "more information.",
    "Well, there are many opinions about {t} and people disagree, so it is hard to say anything.",
)


def synthetic_pairs(count: int, seed: int = 0) -> list[Pair]:
    """`count` distinct short chat pairs (distinct prompts), seeded."""
    rng = random.Random(seed)
    prompts = [(t, q) for t in TOPICS for q in QUESTIONS]
    if count > len(prompts):
        raise ValueError(f"at most {len(prompts)} synthetic pairs")
    rng.shuffle(prompts)
    pairs = []
    for topic, question in prompts[:count]:
        chosen = rng.choice(CHOSEN).format(t=topic)
        rejected = rng.choice(REJECTED).format(t=topic)
        messages = [{"role": "user", "content": question.format(t=topic)}]
        pairs.append(Pair(messages=messages, chosen=chosen, rejected=rejected))
    return pairs


def hh_pairs(data_dir: Path, count: int, seed: int = 0, max_chars: int = 700) -> list[Pair]:
    """`count` HH-RLHF helpful-base test pairs of at most `max_chars` characters, seeded."""
    from bench.forgetting.datasets import read_hh_pairs, seeded_sample

    short = [
        p
        for p in read_hh_pairs(data_dir, "helpful-base")
        if sum(len(m["content"]) for m in p.messages) + len(p.chosen) + len(p.rejected) <= max_chars
    ]
    if len(short) < count:
        raise ValueError(f"only {len(short)} HH-RLHF pairs of at most {max_chars} characters")
    chosen = seeded_sample(short, count, seed, "bench-training")
    return [Pair(messages=list(p.messages), chosen=p.chosen, rejected=p.rejected) for p in chosen]


def word_pairs(
    count: int, vocab_words: int, prompt_words: int, response_words: int, seed: int = 0
) -> list[Pair]:
    """Pairs of random words `w<i>` (one token each with the synthetic tokenizer), seeded."""
    rng = random.Random(seed)

    def text(words: int) -> str:
        return " ".join(f"w{rng.randrange(vocab_words)}" for _ in range(words))

    return [
        Pair(
            messages=[{"role": "user", "content": text(prompt_words)}],
            chosen=text(response_words),
            rejected=text(response_words),
        )
        for _ in range(count)
    ]
