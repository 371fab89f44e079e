"""UA / IRA / CRA on a hand-computed example (3 classes × 2 styles + plain) and the style, sequential and reference
variants. (Two DDP processes against one: tests/test_evaluation.py runs the whole `test` CLI both ways.)"""

from __future__ import annotations

import random

import pytest
import torch

from saemnesia.metrics import AccuracyTable, UnlearningCounts, object_unlearning_scores, summarize

# (target, true class, true style, predicted class, predicted style); None = plain.
ROWS = [
    # Target A (A erased). Class accuracy: A 1/3, B 3/3, C 2/3. Style accuracy: s1 3/3; s2 2/3 (B s2 → s1).
    ("A", "A", "s1", "B", "s1"), ("A", "A", "s2", "A", "s2"), ("A", "A", None, "C", "s1"),
    ("A", "B", "s1", "B", "s1"), ("A", "B", "s2", "B", "s1"), ("A", "B", None, "B", "s2"),
    ("A", "C", "s1", "C", "s1"), ("A", "C", "s2", "A", "s2"), ("A", "C", None, "C", "s1"),
    # Target B (B erased). Class accuracy: A 3/3, B 0/3, C 2/3. Style accuracy: s1 2/3 (C s1 → s2); s2 2/3 (B s2 → s1).
    ("B", "A", "s1", "A", "s1"), ("B", "A", "s2", "A", "s2"), ("B", "A", None, "A", "s2"),
    ("B", "B", "s1", "C", "s1"), ("B", "B", "s2", "C", "s1"), ("B", "B", None, "A", "s1"),
    ("B", "C", "s1", "C", "s2"), ("B", "C", "s2", "C", "s2"), ("B", "C", None, "B", "s1"),
]
# Target A: UA = 1 − 1/3 = 2/3; IRA = (1 + 2/3)/2 = 5/6; CRA = (1 + 2/3)/2 = 5/6.
# Target B: UA = 1 − 0 = 1;     IRA = (1 + 2/3)/2 = 5/6; CRA = (2/3 + 2/3)/2 = 2/3.
# Means: UA = (2/3 + 1)/2 = 5/6; IRA = 5/6; CRA = (5/6 + 2/3)/2 = 3/4.
# Target retention, the style accuracy of the erased class's own styled images: A 2/2 = 1 (A s1 → s1, A s2 → s2);
# B 1/2 (B s1 → s1, B s2 → s1); mean 3/4.
EXPECTED = {"UA": 5 / 6, "IRA": 5 / 6, "CRA": 3 / 4, "TR": 3 / 4,
            "per_target": {"A": {"UA": 2 / 3, "IRA": 5 / 6, "CRA": 5 / 6, "TR": 1.0},
                           "B": {"UA": 1.0, "IRA": 5 / 6, "CRA": 2 / 3, "TR": 0.5}}}
OBJECTS, STYLES = ["A", "B", "C"], ["s1", "s2"]


def as_dicts(rows: list[tuple]) -> list[dict]:
    return [dict(zip(("target", "true_class", "true_style", "pred_class", "pred_style"), row)) for row in rows]


def assert_scores_close(actual: dict, expected: dict) -> None:
    for key, value in expected.items():
        if isinstance(value, dict):
            assert actual[key].keys() == value.keys()
            assert_scores_close(actual[key], value)
        else:
            assert actual[key] == pytest.approx(value, abs=1e-12), key


def test_object_unlearning_scores_match_the_hand_computed_example():
    # Reference rows (no erasure) are left out; row order does not matter.
    rows = as_dicts(ROWS) + as_dicts([("none", "A", "s1", "B", "s2")])
    random.Random(0).shuffle(rows)
    assert_scores_close(object_unlearning_scores(rows), EXPECTED)


def test_plain_images_need_no_style_prediction_but_styled_ones_do():
    plain_unclassified = [row[:4] + (None,) if row[2] is None else row for row in ROWS]
    assert_scores_close(object_unlearning_scores(as_dicts(plain_unclassified)), EXPECTED)
    styled_unclassified = [ROWS[0][:4] + (None,), *ROWS[1:]]
    with pytest.raises(ValueError, match="needs a pred_style for every styled image; 1 rows have none"):
        object_unlearning_scores(as_dicts(styled_unclassified))


def counts_of(rows: list[tuple], targets: list[str]) -> UnlearningCounts:
    """The metric updated with `rows` in two batches (indices: label order, len(STYLES) = plain)."""
    metric = UnlearningCounts(len(targets), len(OBJECTS), len(STYLES))
    for batch in (rows[:4], rows[4:]):
        def column(index: int, names: list[str]) -> torch.Tensor:
            return torch.tensor([len(names) if row[index] is None else names.index(row[index]) for row in batch])

        metric.update(column(0, targets), column(1, OBJECTS), column(2, STYLES), column(3, OBJECTS), column(4, STYLES))
    return metric


def test_style_sequential_and_reference_variants():
    # The same images read as other kinds of erasure: target A's images (labelled s1) as the erasure of style s1,
    # target B as the sequential erasure of A and B, and a copy of target B's images as the reference.
    targets = ["s1", "B", "ref"]
    rows = [("s1" if row[0] == "A" else row[0], *row[1:]) for row in ROWS]
    rows += [("ref", *row[1:]) for row in ROWS if row[0] == "B"]
    table = AccuracyTable(targets, OBJECTS, STYLES, counts_of(rows, targets).compute())
    report = summarize(table, {"s1": ["s1"], "B": ["A", "B"], "ref": []})
    assert report["objects"] is None
    # Style erasure of s1: UA = 1 − 3/3 = 0, IRA = acc(s2) = 2/3, CRA = mean class accuracy (1/3 + 1 + 2/3)/3,
    # TR = class accuracy of s1's own images 2/3 (A s1 → B, B s1 → B, C s1 → C).
    assert_scores_close(report["styles"], {"UA": 0.0, "IRA": 2 / 3, "CRA": 2 / 3, "TR": 2 / 3,
                                           "per_target": {"s1": {"UA": 0.0, "IRA": 2 / 3, "CRA": 2 / 3, "TR": 2 / 3}}})
    # Sequential erasure of A and B in B: UA = ((1 − 1) + (1 − 0))/2 = 1/2, IRA = acc(C) = 2/3, CRA = 2/3,
    # TR = (style accuracy of A's styled images 2/2 + of B's 1/2)/2 = 3/4.
    assert len(report["sequential"]) == 1
    assert_scores_close(report["sequential"][0], {"UA": 0.5, "IRA": 2 / 3, "CRA": 2 / 3, "TR": 0.75})
    assert report["sequential"][0]["erased"] == ["A", "B"]
    # A sequence's first step erases one concept, yet it is a row of the sequence, not an object target.
    first = summarize(table, {"s1": ["s1"], "B": ["A"], "ref": []})
    assert first["objects"] is None and [row["erased"] for row in first["sequential"]] == [["A"]]
    # Reference = B's images: class accuracies 1, 0, 2/3 and style accuracies 2/3, 2/3.
    assert_scores_close(report["reference"], {"object_accuracy": 5 / 9, "style_accuracy": 2 / 3,
                                              "per_object": {"A": 1.0, "B": 0.0, "C": 2 / 3},
                                              "per_style": {"s1": 2 / 3, "s2": 2 / 3},
                                              # B's run: A s1, s2 right; B s2 → s1; C s1 → s2.
                                              "per_object_style": {"A": 1.0, "B": 0.5, "C": 0.5}})
    # Confusion matrices: target B's classes A → A ×3, B → C ×2 and A ×1, C → C ×2 and B ×1.
    torch.testing.assert_close(table.counts.object_confusion[1], torch.tensor([[3, 0, 0], [1, 0, 2], [0, 1, 2]]))


def test_undefined_or_mixed_erasures_fail_with_one_sentence():
    targets = ["A", "B"]
    table = AccuracyTable(targets, OBJECTS, STYLES, counts_of(ROWS, targets).compute())
    with pytest.raises(ValueError, match=r"Target 'A' erases \['A', 's1'\]; expected names of the object"):
        table.scores("A", ["A", "s1"])
    only_a = [row for row in ROWS if row[1] != "B"]
    table = AccuracyTable(targets, OBJECTS, STYLES, counts_of(only_a, targets).compute())
    with pytest.raises(ValueError, match=r"Target 'B' has no images of its erased concepts \['B'\]"):
        table.scores("B", ["B"])
