"""Comparing model outputs as float32 arithmetic allows.

oneDNN picks its kernels by CPU and by batch shape, so the same image scored in a batch of 4 and in a
batch of 40, on Spark and locally, or in two processes, differs in the last bits (1e-6 after the
model's rounding was seen on an AMD EPYC). Two answers for the same image are the same answer when
their numbers agree within TOLERANCE, their labels agree unless the top two probabilities are tied
within it, and their neighbours agree unless the similarity scores are tied within it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

TOLERANCE = 1e-4


def close(value: float) -> object:
    """`x == close(y)`: x and y agree within the float32 tolerance."""
    return pytest.approx(value, abs=TOLERANCE)


def assert_same_label(label: str | None, expected: str | None, probabilities: Mapping[str, float]) -> None:
    """The same label, or two labels whose probabilities are tied within the tolerance (either is right)."""
    if label != expected:
        assert label is not None and expected is not None, (label, expected)
        assert probabilities[label] == close(probabilities[expected]), (label, expected, dict(probabilities))


def assert_same_neighbours(ids: Sequence[int], expected: Sequence[Mapping]) -> None:
    """The same similar images in the same order, except where the expected scores are tied within the tolerance."""
    expected_ids = [item["id"] for item in expected]
    assert len(ids) == len(expected_ids), (list(ids), expected_ids)
    scores = {item["id"]: item["score"] for item in expected}
    cut = expected[-1]["score"] if expected else 0.0
    for position, (found, wanted) in enumerate(zip(ids, expected_ids)):
        if found == wanted:
            continue
        # A swap of near-equal neighbours, or one just past the k-th that ties with the last one kept.
        found_score = scores.get(found, cut)
        assert found_score == close(expected[position]["score"]), (position, list(ids), expected_ids)
