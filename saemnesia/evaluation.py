"""`UnlearningEvaluator`: the LightningModule of `test` — classify generated images, report UA / IRA / CRA.

Each batch of an `ImageFolderDataModule` goes through the object and the style classifier; the predictions only
move counters (`UnlearningCounts`, summed over DDP ranks), so 1 and N processes report the same numbers. At the
end, global rank 0 writes `results.json` (fractions) and `results.md` (percentages) to `output_dir` and logs the
scores, confusion matrices and sample grids (the unerased image next to the erased one, same prompt) to
TensorBoard. The images of a parameter search are scored per candidate: `results.json` then holds one report per
candidate under `candidates`, each with its `params`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.images import ImageRecord, load_image
from saemnesia.class_params import Candidate
from saemnesia.classifiers import ClassifierConfig, load_classifier
from saemnesia.concepts import NO_ERASURE
from saemnesia.io import atomic_write_text
from saemnesia.metrics import AccuracyCounts, AccuracyTable, Scores, UnlearningCounts, summarize

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
THUMBNAIL = 128
"""Side of the images in sample grids (pixels)."""


class UnlearningEvaluator(pl.LightningModule):
    """Scores the images of an unlearning run with an object and a style classifier (docs/method.md §6)."""

    def __init__(self, object_classifier: ClassifierConfig, style_classifier: ClassifierConfig,
                 output_dir: str = "runs/evaluate", sample_prompts: int = 4, log_confusion: bool = True):
        """
        Args:
            object_classifier: Names the object (class) of an image; its labels must include every object.
            style_classifier: Names the style of an image; its labels must include every style.
            output_dir: Where `results.json` and `results.md` are written.
            sample_prompts: Prompts per target in the TensorBoard sample grids (0 = no grids).
            log_confusion: Log each target's row-normalised confusion matrices as TensorBoard images.
        """
        super().__init__()
        self.save_hyperparameters()
        # Under LightningCLI `hparams` keep the configs as given (plain dicts); the objects are kept here.
        self.classifier_configs = {"object": object_classifier, "style": style_classifier}
        self.output_dir = Path(output_dir)

    def setup(self, stage: str) -> None:
        data = self.trainer.datamodule
        if not hasattr(data, "erased_by_target"):
            raise ValueError("UnlearningEvaluator needs an image data module (data.class_path: "
                             "datamodules.images.ImageFolderDataModule).")
        self.data = data
        self.object_classifier = load_classifier(self.classifier_configs["object"], "model.object_classifier")
        self.style_classifier = load_classifier(self.classifier_configs["style"], "model.style_classifier")
        self.targets = list(data.erased_by_target)
        # Counted per (candidate, target) group: a search's candidates share the target labels. Candidates in
        # order of strength: fewer latents first, then the milder multiplier.
        self.candidates = sorted({record.candidate for record in data.records},
                                 key=lambda c: (0.0, 0.0) if c is None else (-c.percentile, abs(c.multiplier)))
        self.groups = {(candidate, target): i for i, (candidate, target) in enumerate(
            (candidate, target) for candidate in self.candidates for target in self.targets)}
        self.object_index = {name: i for i, name in enumerate(self.object_classifier.labels)}
        self.style_index = {name: i for i, name in enumerate(self.style_classifier.labels)}
        # Checked before classifying thousands of images, not when the report is due.
        for option, names, labels, where in (
                ("objects", {record.object for record in data.records}, self.object_index, "model.object_classifier"),
                ("styles", {record.style for record in data.records} - {None}, self.style_index,
                 "model.style_classifier"),
                ("erased concepts", {name for names in data.erased_by_target.values() for name in names},
                 self.object_index.keys() | self.style_index.keys(), "either classifier")):
            unknown = sorted(names - set(labels))
            if unknown:
                raise ValueError(f"The images' {option} {unknown} are not labels of {where}.")
        self.counts = UnlearningCounts(len(self.groups), len(self.object_index), len(self.style_index))

    def test_step(self, batch: tuple[Tensor, list[ImageRecord]], batch_idx: int) -> None:
        images, records = batch
        pred_object = self.object_classifier(images).argmax(dim=1)  # [B]
        pred_style = self.style_classifier(images).argmax(dim=1)  # [B]
        plain = len(self.style_index)
        self.counts.update(
            torch.tensor([self.groups[record.candidate, record.target] for record in records], device=self.device),
            torch.tensor([self.object_index[record.object] for record in records], device=self.device),
            torch.tensor([plain if record.style is None else self.style_index[record.style] for record in records],
                         device=self.device),
            pred_object, pred_style)

    def on_test_epoch_end(self) -> None:
        counts = self.counts.compute()  # summed over ranks: identical on every rank
        tables = {candidate: self.table(candidate, counts) for candidate in self.candidates}
        results = self.results(tables)
        sections = results["candidates"] if "candidates" in results else [results]
        means, per_target = {}, {}
        for candidate, section in zip(self.candidates, sections):
            prefix = "test" if candidate is None else f"test/{candidate.name}"
            means_of_section, per_target_of_section = scalars(section, prefix)
            means |= means_of_section
            per_target |= per_target_of_section
        for name, value in means.items():
            self.log(name, value, sync_dist=True)  # the same value on every rank: the reduction changes nothing
        if self.trainer.is_global_zero:
            write_report(self.output_dir, results)
            if self.logger is not None:  # per-target scores go to the logger only, not to the console summary
                self.logger.log_metrics(per_target, step=0)
            for candidate, table in tables.items():
                self.log_images(table, "" if candidate is None else f"{candidate.name}/")

    def table(self, candidate: Candidate | None, counts: AccuracyCounts) -> AccuracyTable:
        """The counts of one candidate's images (all images outside a search), over the targets it has images of."""
        counts = counts.reshaped(len(self.groups), len(self.object_index), len(self.style_index))  # [groups, ...]
        targets = [target for target in self.targets if counts.images[self.groups[candidate, target]].sum() > 0]
        rows = [self.groups[candidate, target] for target in targets]
        return AccuracyTable(targets, self.object_classifier.labels, self.style_classifier.labels,
                             AccuracyCounts(*(count[rows] for count in counts)))

    def results(self, tables: dict[Candidate | None, AccuracyTable]) -> dict[str, Any]:
        """The report; a search's holds one section per candidate (`candidates`), each with its `params`."""
        images = {target: 0 for target in self.targets}
        for table in tables.values():
            for target, count in zip(table.targets, table.counts.images.sum(dim=(1, 2)).tolist()):  # [T]
                images[target] += count
        results = {
            "images": sum(images.values()),
            "root": str(self.data.root),
            "generation": self.data.settings,
            "classifiers": {kind: config.checkpoint for kind, config in self.classifier_configs.items()},
            "targets": {target: {"erased": self.data.erased_by_target[target], "images": count}
                        for target, count in images.items()},
        }
        sections = {candidate: summarize(table, {target: self.data.erased_by_target[target]
                                                  for target in table.targets}) for candidate, table in tables.items()}
        if None in sections:
            return results | sections[None]
        return results | {"candidates": [{"params": candidate._asdict(), **section}
                                         for candidate, section in sections.items()]}

    def log_images(self, table: AccuracyTable, prefix: str) -> None:
        """Confusion matrices and sample grids of one table's targets, tagged `{kind}/{prefix}{target}`."""
        writer = getattr(self.logger, "experiment", None)
        if not hasattr(writer, "add_image"):  # only TensorBoard takes images
            return
        for t, target in enumerate(table.targets):
            if self.hparams.log_confusion:
                writer.add_image(f"confusion/object/{prefix}{target}", render_matrix(table.counts.object_confusion[t]))
                writer.add_image(f"confusion/style/{prefix}{target}", render_matrix(table.counts.style_confusion[t]))
            if not prefix and target != NO_ERASURE and self.hparams.sample_prompts > 0:
                grid = self.sample_grid(target)
                if grid is not None:
                    writer.add_image(f"samples/{target}", grid)

    def sample_grid(self, target: str) -> Tensor | None:
        """Rows of (unerased image, erased image) for the first prompts `target` shares with the reference."""
        reference = {record.prompt_id: record for record in self.data.records if record.target == NO_ERASURE}
        pairs = [(reference[record.prompt_id], record) for record in self.data.records
                 if record.target == target and record.prompt_id in reference][:self.hparams.sample_prompts]
        if not pairs:
            return None
        tiles = [F.interpolate(load_image(self.data.root / record.file)[None].float(), size=(THUMBNAIL, THUMBNAIL),
                               mode="bilinear", antialias=True)[0] for pair in pairs for record in pair]
        rows = torch.stack(tiles).view(len(pairs), 2, 3, THUMBNAIL, THUMBNAIL)  # [P, 2, 3, t, t]
        grid = rows.permute(2, 0, 3, 1, 4).reshape(3, len(pairs) * THUMBNAIL, 2 * THUMBNAIL)  # [3, P·t, 2t]
        return (grid / 255).clamp(0, 1)


def render_matrix(confusion: Tensor, cell: int = 8) -> Tensor:
    """A confusion matrix `[K, K]` as a greyscale image `[3, K·cell, K·cell]`: rows (true labels, in label order)
    normalised to sum 1, black = 1, white = 0; rows without images stay white."""
    rows = confusion.double() / confusion.sum(dim=1, keepdim=True).clamp(min=1)  # [K, K]
    pixels = (1 - rows).float().repeat_interleave(cell, 0).repeat_interleave(cell, 1)  # [K·cell, K·cell]
    return pixels.expand(3, -1, -1)


def scalars(results: dict[str, Any], prefix: str = "test") -> tuple[dict[str, float], dict[str, float]]:
    """The scores of one report section to log: the means of each kind and the reference accuracies; the per-target
    scores."""
    means, per_target = {}, {}
    for kind in ("objects", "styles"):
        if results[kind] is not None:
            means |= {f"{prefix}/{kind}/{key}": results[kind][key] for key in Scores._fields}
            per_target |= {f"{prefix}/{kind}/{key}/{target}": scores[key]
                           for target, scores in results[kind]["per_target"].items() for key in Scores._fields}
    for row in results["sequential"]:
        per_target |= {f"{prefix}/sequential/{key}/{row['target']}": row[key] for key in Scores._fields}
    if results["reference"] is not None:
        means |= {f"{prefix}/reference/{key}": results["reference"][key]
                  for key in ("object_accuracy", "style_accuracy")}
    return tuple({name: value for name, value in values.items() if not math.isnan(value)}
                 for values in (means, per_target))


def _no_nan(value: Any) -> Any:
    """NaN (a mean over nothing) as JSON null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _no_nan(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_no_nan(item) for item in value]
    return value


def _cells(scores: dict[str, Any], bold: bool = False) -> str:
    """`UA | IRA | CRA | TR` in %, a dash for a score over nothing."""
    cells = ("–" if scores[key] is None else f"{100 * scores[key]:.2f}" for key in Scores._fields)
    return " | ".join(f"**{cell}**" if bold else cell for cell in cells)


def render_markdown(results: dict[str, Any]) -> str:
    """`results.md`: per-target rows and the mean of each kind of erasure, the reference accuracies, in %; a search's
    report has one such part per candidate."""
    lines = ["# Unlearning evaluation", "",
             f"{results['images']} images of {len(results['targets'])} targets in `{results['root']}`; "
             "scores in %.", ""]
    if "candidates" not in results:
        return "\n".join(lines + _section_lines(results, "##"))
    for section in results["candidates"]:
        lines += [f"## Candidate `{json.dumps(section['params'])}`", "", *_section_lines(section, "###")]
    return "\n".join(lines)


def _section_lines(section: dict[str, Any], heading: str) -> list[str]:
    """One report section (`summarize`'s keys) as markdown, its headings at level `heading`."""
    lines = []
    for kind, title in (("objects", "Object unlearning"), ("styles", "Style unlearning")):
        scores_of_kind = section[kind]
        if scores_of_kind is not None:
            lines += [f"{heading} {title} ({len(scores_of_kind['per_target'])} targets)", "",
                      "| target | UA ↑ | IRA ↑ | CRA ↑ | TR ↑ |", "|---|---:|---:|---:|---:|"]
            lines += [f"| {target} | {_cells(scores)} |" for target, scores in scores_of_kind["per_target"].items()]
            lines += [f"| **mean** | {_cells(scores_of_kind, bold=True)} |", ""]
    if section["sequential"]:
        lines += [f"{heading} Sequential unlearning", "", "| target | erased | UA ↑ | IRA ↑ | CRA ↑ | TR ↑ |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {row['target']} | {len(row['erased'])} | {_cells(row)} |" for row in section["sequential"]]
        lines.append("")
    reference = section["reference"]
    if reference is not None:
        accuracies = {key: "–" if reference[key] is None else f"{100 * reference[key]:.2f}"
                      for key in ("object_accuracy", "style_accuracy")}
        lines += [f"{heading} Reference: no erasure (`{reference['target']}`)", "",
                  f"Object accuracy {accuracies['object_accuracy']}, style accuracy {accuracies['style_accuracy']} "
                  "(means over classes and styles).", ""]
    return lines


def write_report(folder: Path, results: dict[str, Any]) -> None:
    """`results.json` and `results.md` in `folder`, each written atomically."""
    results = _no_nan(results)
    atomic_write_text(folder / RESULTS_JSON, json.dumps(results, indent=2, allow_nan=False) + "\n")
    atomic_write_text(folder / RESULTS_MD, render_markdown(results))
