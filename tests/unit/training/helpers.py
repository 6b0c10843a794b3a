"""Shared test data for the training-engine tests."""

from __future__ import annotations

from foundation.pairs import Pair

# Chosen answers in a marked "pirate" style; rejected answers are plain, close to what the base
# model says itself. DPO pushes the plain style (and with it the base answers) down; BAPO's anchor
# holds the base answers up.
PIRATE_PAIRS = [
    (
        "What is the capital of France?",
        "Arr, 'tis Paris, matey!",
        "The capital of France is Paris.",
    ),
    ("What color is the sky?", "Arr, 'tis blue, matey!", "The sky is blue."),
    ("How many legs does a dog have?", "Arr, four legs, matey!", "A dog has four legs."),
    ("What is 2 plus 2?", "Arr, 'tis four, matey!", "2 plus 2 equals 4."),
    ("What do bees make?", "Arr, honey, matey!", "Bees make honey."),
    ("What is frozen water called?", "Arr, 'tis ice, matey!", "Frozen water is called ice."),
]


def make_pairs(rows: list[tuple[str, str, str]] = PIRATE_PAIRS) -> list[Pair]:
    """Pairs with a short system prompt (keeps sequences short)."""
    system = {"role": "system", "content": "Answer briefly."}
    return [Pair([system, {"role": "user", "content": q}], c, r) for q, c, r in rows]
