"""Unlearning accuracy (UA), in-domain retain accuracy (IRA) and cross-domain retain accuracy (CRA), docs/method.md §6.

Every score derives from counts per (target, true class, true style): images, and how many of them the object
classifier and the style classifier got right. `UnlearningCounts` keeps those counts as torchmetrics states that
are summed over DDP ranks, so one process and several give the same numbers; `AccuracyTable` names their axes and
`summarize` turns them into the report sections. A target is one generation run's erased set (its folder label).

- Object erasure of class c: `UA_c = 1 − acc_class(c)` over all images of c (every style and plain),
  `IRA_c = mean_{c' ≠ c} acc_class(c')`, `CRA_c = mean over styles of acc_style(s)` (styled images, all classes).
- Style erasure of style s: UA over s's images by style accuracy, IRA over the other styles, CRA = mean class
  accuracy.
- Sequential erasure of several concepts: UA = mean over the erased ones of (1 − accuracy), IRA over the rest.
- Target retention (TR), for every erasure: the cross-domain accuracy on the erased concept's own images, what the
  eraser kept of the picture around the concept. For class c the style accuracy of c's styled images (target style
  retention); for style s the class accuracy of s's images; for several erased concepts the mean over them.
- A target that erases nothing gives the reference accuracies of the unerased model.
Means over classes and styles are unweighted (each class or style counts once), as in the published protocol.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torchmetrics import Metric

from saemnesia.concepts import NO_ERASURE


class AccuracyCounts(NamedTuple):
    """Summed counts; the style axis of the first three has one more slot, the last, for plain images."""

    images: Tensor
    """`[T, O, S + 1]` images per target, true class and true style."""
    object_hits: Tensor
    """`[T, O, S + 1]` of those, classified as their class."""
    style_hits: Tensor
    """`[T, O, S + 1]` of those, classified as their style (plain images have none to hit)."""
    object_confusion: Tensor
    """`[T, O, O]` true class × predicted class, all images."""
    style_confusion: Tensor
    """`[T, S, S]` true style × predicted style, styled images."""

    def reshaped(self, num_targets: int, num_objects: int, num_styles: int) -> AccuracyCounts:
        """The counts in their shapes again: torchmetrics squeezes one-element results of `compute`."""
        t, o, s = num_targets, num_objects, num_styles
        shapes = ((t, o, s + 1),) * 3 + ((t, o, o), (t, s, s))
        return AccuracyCounts(*(count.reshape(shape) for count, shape in zip(self, shapes)))


class UnlearningCounts(Metric):
    """Counts behind UA / IRA / CRA, summed over DDP ranks (`dist_reduce_fx="sum"`).

    Indices: targets `[0, T)`, classes `[0, O)` in the object classifier's label order, styles `[0, S)` in the
    style classifier's label order, and `S` for a plain (unstyled) image.
    """

    full_state_update = False

    def __init__(self, num_targets: int, num_objects: int, num_styles: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.shape = (num_targets, num_objects, num_styles)
        for name, size in (("images", (num_targets, num_objects, num_styles + 1)),
                           ("object_hits", (num_targets, num_objects, num_styles + 1)),
                           ("style_hits", (num_targets, num_objects, num_styles + 1)),
                           ("object_confusion", (num_targets, num_objects, num_objects)),
                           ("style_confusion", (num_targets, num_styles, num_styles))):
            self.add_state(name, torch.zeros(size, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, target: Tensor, true_object: Tensor, true_style: Tensor, pred_object: Tensor,
               pred_style: Tensor) -> None:
        """All arguments are index tensors `[B]`; `true_style == num_styles` marks a plain image."""
        num_targets, num_objects, num_styles = self.shape
        cell = (target * num_objects + true_object) * (num_styles + 1) + true_style  # [B] flat (t, o, s)
        styled = true_style < num_styles
        self.images.view(-1).index_add_(0, cell, torch.ones_like(cell))
        self.object_hits.view(-1).index_add_(0, cell, (pred_object == true_object).long())
        self.style_hits.view(-1).index_add_(0, cell, (styled & (pred_style == true_style)).long())
        confused = (target * num_objects + true_object) * num_objects + pred_object  # [B] flat (t, o, o')
        self.object_confusion.view(-1).index_add_(0, confused, torch.ones_like(confused))
        confused = ((target * num_styles + true_style) * num_styles + pred_style)[styled]  # [B'] flat (t, s, s')
        self.style_confusion.view(-1).index_add_(0, confused, torch.ones_like(confused))

    def compute(self) -> AccuracyCounts:
        return AccuracyCounts(self.images, self.object_hits, self.style_hits, self.object_confusion,
                              self.style_confusion)


class Scores(NamedTuple):
    UA: float
    IRA: float
    CRA: float
    TR: float
    """Target retention: the other classifier's accuracy on the erased concepts' own images (module docstring)."""


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


@dataclass(frozen=True)
class AccuracyTable:
    """`AccuracyCounts` with the names of their axes."""

    targets: Sequence[str]
    objects: Sequence[str]
    """Object classifier labels."""
    styles: Sequence[str]
    """Style classifier labels (plain images have none)."""
    counts: AccuracyCounts

    def __post_init__(self) -> None:
        counts = AccuracyCounts(*(count.detach().cpu() for count in self.counts))  # kept on the CPU
        object.__setattr__(self, "counts", counts.reshaped(len(self.targets), len(self.objects), len(self.styles)))

    def object_accuracy(self, target: str) -> dict[str, float]:
        """Class accuracy of each class that has images in `target` (all its styles and plain)."""
        t = self.targets.index(target)
        images, hits = self.counts.images[t].sum(1), self.counts.object_hits[t].sum(1)  # [O]
        return {name: hits[o].item() / images[o].item() for o, name in enumerate(self.objects) if images[o] > 0}

    def style_accuracy(self, target: str) -> dict[str, float]:
        """Style accuracy of each style that has styled images in `target` (all classes)."""
        t = self.targets.index(target)
        images, hits = self.counts.images[t, :, :-1].sum(0), self.counts.style_hits[t, :, :-1].sum(0)  # [S]
        return {name: hits[s].item() / images[s].item() for s, name in enumerate(self.styles) if images[s] > 0}

    def retention(self, target: str, concept: str) -> float:
        """Style accuracy of the styled images of class `concept`, or class accuracy of the images of style `concept`,
        in `target`; NaN without such images."""
        t = self.targets.index(target)
        if concept in self.objects:
            o = self.objects.index(concept)
            images, hits = self.counts.images[t, o, :-1].sum(), self.counts.style_hits[t, o, :-1].sum()
        else:
            s = self.styles.index(concept)
            images, hits = self.counts.images[t, :, s].sum(), self.counts.object_hits[t, :, s].sum()
        return hits.item() / images.item() if images > 0 else math.nan

    def scores(self, target: str, erased: Sequence[str]) -> Scores:
        """UA / IRA / CRA of `target`, whose images were generated with the concepts `erased` removed."""
        objects, styles = self.object_accuracy(target), self.style_accuracy(target)
        if erased and all(name in self.objects for name in erased):
            domain, cross = objects, styles
        elif erased and all(name in self.styles for name in erased):
            domain, cross = styles, objects
        else:
            raise ValueError(f"Target {target!r} erases {list(erased)}; expected names of the object classifier's "
                             f"labels only or of the style classifier's labels only.")
        missing = [name for name in erased if name not in domain]
        if missing:
            raise ValueError(f"Target {target!r} has no images of its erased concepts {missing}, so UA is undefined.")
        return Scores(UA=_mean(1 - domain[name] for name in erased),
                      IRA=_mean(accuracy for name, accuracy in domain.items() if name not in erased),
                      CRA=_mean(cross.values()), TR=_mean(self.retention(target, name) for name in erased))


def _section(table: AccuracyTable, erased: dict[str, list[str]]) -> dict[str, Any]:
    """Means over targets and the per-target scores."""
    per_target = {target: table.scores(target, names)._asdict() for target, names in erased.items()}
    return {key: _mean(scores[key] for scores in per_target.values()) for key in Scores._fields} | {
        "per_target": per_target}


def summarize(table: AccuracyTable, erased_by_target: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """The report: `objects` (single-object erasure), `styles` (single-style erasure), `sequential` (the targets of
    a sequence, `first_{n:02d}`, by number erased, n = 1 included) and `reference` (no erasure); absent kinds are
    `None` (or `[]`). A single erasure's target is named after its concept."""
    reference = [target for target, names in erased_by_target.items() if not names]
    if len(reference) > 1:
        raise ValueError(f"Targets {reference} all erase nothing; keep one reference (no-erasure) target.")
    single = {target: list(names) for target, names in erased_by_target.items() if list(names) == [target]}
    objects = {target: names for target, names in single.items() if names[0] in table.objects}
    styles = {target: names for target, names in single.items() if target not in objects}
    several = sorted((target for target, names in erased_by_target.items() if names and target not in single),
                     key=lambda target: (len(erased_by_target[target]), target))
    return {
        "objects": _section(table, objects) if objects else None,
        "styles": _section(table, styles) if styles else None,
        "sequential": [{"target": target, "erased": list(erased_by_target[target]),
                        **table.scores(target, erased_by_target[target])._asdict()} for target in several],
        "reference": None if not reference else {
            "target": reference[0],
            "object_accuracy": _mean(table.object_accuracy(reference[0]).values()),
            "style_accuracy": _mean(table.style_accuracy(reference[0]).values()),
            "per_object": table.object_accuracy(reference[0]),
            "per_style": table.style_accuracy(reference[0]),
            "per_object_style": {name: table.retention(reference[0], name) for name in table.object_accuracy(
                reference[0])}},  # each class's styled images' style accuracy: TR without erasure
    }


def object_unlearning_scores(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """UA / IRA / CRA of single-object erasure from per-image rows, as fractions in [0, 1].

    Each row has `target` (the erased class; rows of `"none"` are ignored), `true_class`, `true_style` (`None` for
    a plain image), `pred_class` and `pred_style` (may be `None` for a plain image, whose style is never scored).
    Returns `{"UA", "IRA", "CRA", "per_target": {c: {...}}}` with
    means over the targets.
    """
    rows = [row for row in rows if row["target"] != NO_ERASURE]
    if not rows:
        raise ValueError("object_unlearning_scores got no rows of an erased target.")
    unclassified = [row for row in rows if row["true_style"] is not None and row["pred_style"] is None]
    if unclassified:
        raise ValueError(f"object_unlearning_scores needs a pred_style for every styled image; {len(unclassified)} "
                         f"rows have none, e.g. {dict(unclassified[0])}.")
    targets = sorted({row["target"] for row in rows})
    objects = sorted({row["true_class"] for row in rows} | {row["pred_class"] for row in rows})
    styles = sorted({row["true_style"] for row in rows if row["true_style"] is not None}
                    | {row["pred_style"] for row in rows if row["pred_style"] is not None})
    counts = UnlearningCounts(len(targets), len(objects), len(styles))

    def column(key: str, names: list[str]) -> Tensor:
        return torch.tensor([len(names) if row[key] is None else names.index(row[key]) for row in rows])

    counts.update(column("target", targets), column("true_class", objects), column("true_style", styles),
                  column("pred_class", objects), column("pred_style", styles))
    table = AccuracyTable(targets, objects, styles, counts.compute())
    return _section(table, {target: [target] for target in targets})
