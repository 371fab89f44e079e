"""What `make demo` shows at the end: the comparison tables (objects, styles, sequential), a line plot of sequential
unlearning and a grid of original and erased samples.

All read only the evaluations' `results.json` and the unlearning runs' `manifest.jsonl`, so they can be rebuilt
from the run folders at any time.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from statistics import mean
from typing import Any

import torch
from matplotlib.figure import Figure  # a Figure without pyplot needs no display backend
from PIL import Image

from datamodules.images import ImageRecord, load_image, read_manifest
from saemnesia.concepts import NO_ERASURE
from saemnesia.io import atomic_write_bytes
from saemnesia.metrics import Scores


def no_erasure_scores(reference: Mapping[str, Any]) -> dict[str, float]:
    """UA / IRA / CRA / TR without erasure (docs/method.md §6 on the reference images): UA_c = 1 − acc(c) and IRA_c is
    the other objects' mean accuracy, so their means over c are 1 − and + the mean object accuracy; TR_c is the style
    accuracy of c's styled images."""
    object_accuracy = mean(reference["per_object"].values())
    return {"UA": 1 - object_accuracy, "IRA": object_accuracy, "CRA": mean(reference["per_style"].values()),
            "TR": mean(reference["per_object_style"].values())}


def report_table(results: Mapping[str, Mapping[str, Any]], search_candidates: Mapping[str, int]) -> str:
    """Markdown table, in %: the unerased model (from the first results holding the `none` reference), then each
    eraser's mean object-unlearning scores and the number of candidates its parameter search rated."""
    reference = next(result["reference"] for result in results.values() if result.get("reference"))
    rows = [("no erasure", no_erasure_scores(reference), "–")]
    rows += [(label, result["objects"], str(search_candidates[label])) for label, result in results.items()]
    lines = ["| eraser | UA | IRA | CRA | TR | search candidates |", "|---|---|---|---|---|---|"]
    lines += [f"| {label} | {_percent_cells(scores)} | {runs} |" for label, scores, runs in rows]
    return "\n".join(lines) + "\n"


def style_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table, in %: each eraser's mean style-unlearning scores (UA and IRA by style, CRA by object, TR the
    class accuracy of the erased style's own images)."""
    lines = ["| eraser | UA | IRA | CRA | TR |", "|---|---|---|---|---|"]
    lines += [f"| {label} | {_percent_cells(result['styles'])} |" for label, result in results.items()]
    return "\n".join(lines) + "\n"


def sequential_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table, in %: per eraser and number n of erased objects, UA over the erased, IRA over the rest, CRA,
    TR over the erased."""
    lines = ["| eraser | objects erased | UA | IRA | CRA | TR |", "|---|---|---|---|---|---|"]
    lines += [f"| {label} | {len(row['erased'])} | {_percent_cells(row)} |"
              for label, result in results.items() for row in result["sequential"]]
    return "\n".join(lines) + "\n"


def _percent_cells(scores: Mapping[str, Any]) -> str:
    return " | ".join("–" if scores[key] is None else f"{100 * scores[key]:.1f}" for key in Scores._fields)


def write_sequential_plot(path: Path, results: Mapping[str, Mapping[str, Any]]) -> Path:
    """PNG: UA, IRA and CRA (%) against the number of objects erased at once, one line per eraser."""
    figure = Figure(figsize=(10, 3.2))
    axes = figure.subplots(1, 3, sharex=True)
    for label, result in results.items():
        counts = [len(row["erased"]) for row in result["sequential"]]
        for axis, key in zip(axes, ("UA", "IRA", "CRA")):
            axis.plot(counts, [100 * (row[key] if row[key] is not None else float("nan"))
                               for row in result["sequential"]], marker="o", label=label)
    for axis, key in zip(axes, ("UA", "IRA", "CRA")):
        axis.set(title=key, xlabel="objects erased", ylim=(0, 102))
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("%")
    axes[0].legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def sample_prompts(records: list[ImageRecord]) -> dict[str, tuple[str | None, int]]:
    """For each object of the unerased images, one (style, seed) to show: the objects take the styles in turn, so
    the grid shows every palette it can."""
    reference = [record for record in records if record.target == NO_ERASURE]
    objects = sorted({record.object for record in reference})
    chosen = {}
    for row, obj in enumerate(objects):
        options = sorted({(record.style, record.seed) for record in reference if record.object == obj},
                         key=lambda option: (option[0] is None, option[0] or "", option[1]))
        chosen[obj] = options[row % len(options)]
    return chosen


def load_samples(images: Path, prompts: Mapping[str, tuple[str | None, int]], erased: bool) -> list[torch.Tensor]:
    """The image of each object's chosen (style, seed), generated erasing that object or not, `[3, H, W]` uint8."""
    files = {(record.target, record.object, (record.style, record.seed)): record.file
             for record in read_manifest(images)}
    return [load_image(images / files[obj if erased else NO_ERASURE, obj, prompt]) for obj, prompt in prompts.items()]


def write_sample_grid(path: Path, reference_images: Path, erased_images: Mapping[str, Path], scale: int = 4) -> Path:
    """PNG grid: one row per object; columns the unerased image, then the same prompt and seed with that object
    erased by each eraser (`erased_images`: label → unlearning image folder), enlarged `scale` times."""
    prompts = sample_prompts(read_manifest(reference_images))
    columns = [load_samples(reference_images, prompts, erased=False)]
    columns += [load_samples(folder, prompts, erased=True) for folder in erased_images.values()]
    rows = [torch.cat(images, dim=2) for images in zip(*columns)]  # one per object, each [3, H, W·columns]
    grid = torch.cat(rows, dim=1)  # [3, H·objects, W·columns]
    grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)  # nearest-neighbour enlargement
    buffer = io.BytesIO()
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(buffer, format="PNG")  # [H', W', 3]
    atomic_write_bytes(path, buffer.getvalue())
    return path
