"""`ImageWriter`: the JPEG images of an unlearning `predict` run and their manifest (docs/method.md §6).

Layout under the root folder `R`: `R/{target}/{Style}_{Object}_seed{seed}.jpg` and, for plain prompts,
`R/{target}/{Object}_seed{seed}.jpg`, where `{target}` labels the erased set (a concept, `first_03`, or `none`); a
parameter search puts each candidate's images under `R/{candidate}/` (e.g. `R/p99.999_m-5/Circle/...`).
`R/manifest.jsonl` lists every image, one JSON object per line: `file` (relative to R), `target`, `erased` (the
concept names), `candidate` (`{percentile, multiplier}`, null outside a search), `prompt_id`, `prompt`, `object`,
`style` (null when plain) and `seed`.

Each rank appends one batch's lines to `manifest-r{rank}.jsonl` in a single write and only then writes the batch's
images, each to a temporary name renamed into place; when predicting ends, rank 0 merges the rank manifests into
`manifest.jsonl` (sorted by file, one line per file that exists). So an image on disk is always complete and listed.
Resuming is re-running the same command (`callbacks.writer.ResumableWriter`): items whose image exists are left out,
and `generation.json` refuses a rerun with other generation settings into the same folder.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from PIL import Image
from torch import Tensor

from callbacks.writer import ResumableWriter
from saemnesia.generation import GenerationOutput, HookedDiffusion, PromptItem
from saemnesia.io import atomic_write_bytes, atomic_write_text

JPEG_QUALITY = 95
"""JPEG quality of every image (Pillow's scale)."""

MANIFEST = "manifest.jsonl"

SETTINGS = "generation.json"
"""The generation settings of the folder's images; a resumed run must match them."""

SETTING_NAMES = ("pipeline", "hookpoint", "num_steps", "guidance_scale", "height", "width", "dtype", "scheduler")
"""`HookedDiffusion` options that change the images (with the erasure config)."""


def image_file(item: PromptItem) -> str:
    """The item's image path relative to the root folder, e.g. `Bears/Cubism_Bears_seed188.jpg`."""
    style = "" if item.style is None else f"{item.style}_"
    candidate = "" if item.candidate is None else f"{item.candidate.name}/"
    return f"{candidate}{item.target}/{style}{item.object}_seed{item.seed}.jpg"


def manifest_record(item: PromptItem) -> dict[str, Any]:
    """The item's `manifest.jsonl` line as a dict."""
    return {"file": image_file(item), "target": item.target, "erased": list(item.erase),
            "candidate": None if item.candidate is None else item.candidate._asdict(), "prompt_id": item.prompt_id,
            "prompt": item.prompt, "object": item.object, "style": item.style, "seed": item.seed}


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """The records of a manifest file, skipping a line torn by a crash during its append."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def generation_settings(module: HookedDiffusion) -> dict[str, Any]:
    """The run's `generation.json` record (`SETTING_NAMES` and the erasure config) as JSON stores it."""
    erasure = module.erasure
    settings = {**{name: module.hparams[name] for name in SETTING_NAMES},
                "erasure": asdict(erasure) if erasure is not None else None}
    return json.loads(json.dumps(settings))  # tuples become lists


def jpeg_bytes(image: Tensor) -> bytes:
    """A `[3, H, W]` image in [0, 1] as JPEG bytes, rounded to 8 bits as diffusers' `numpy_to_pil` does."""
    pixels = (image.permute(1, 2, 0) * 255).round().clamp(0, 255).byte().numpy()  # [H, W, 3]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


class ImageWriter(ResumableWriter):
    """Writes each generated image as a JPEG under its target's folder and keeps `manifest.jsonl` (module docstring)."""

    needs_images = True
    manifest_suffix = ".jsonl"

    def item_key(self, item: PromptItem) -> str:
        return image_file(item)

    def resume(self, trainer: pl.Trainer, pl_module: HookedDiffusion) -> set[str]:
        """Refuse file names shared by several items, or earlier images of other settings; the images on disk."""
        files = [image_file(item) for item in trainer.datamodule.items]
        repeated = sorted(name for name, count in Counter(files).items() if count > 1)
        if repeated:
            raise ValueError(f"Several prompt items map to the image files {repeated[:3]}; file names hold only "
                             "target, style, object and seed, so use one prompt per object and style (template "
                             "prompts, or data.pairing: anchor_i_style_i).")
        self._check_settings(generation_settings(pl_module))
        self._repair_rank_manifest(trainer)
        return {name for name in files if (self.folder / name).is_file()}

    def _check_settings(self, settings: dict[str, Any]) -> None:
        """Refuse to mix runs: the folder's earlier images must come from the same generation settings."""
        path = self.folder / SETTINGS
        if not path.is_file() or next(self.folder.rglob("*.jpg"), None) is None:
            return  # no earlier images (a run that failed before its first batch binds nothing)
        earlier = json.loads(path.read_text(encoding="utf-8"))
        differing = [name for name in settings if earlier.get(name) != settings[name]]
        if differing:
            raise ValueError(f"{path} records images generated with other {differing} than this run's; resume with "
                             "the same model options, or write to another folder (--trainer.callbacks.output_dir).")

    def _repair_rank_manifest(self, trainer: pl.Trainer) -> None:
        """Drop a line that a crash tore off at the end of this rank's manifest, so that appends start a new line."""
        path = self.rank_manifest_path(trainer.global_rank)
        if path.is_file() and not path.read_text(encoding="utf-8").endswith("\n"):
            atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in read_manifest(path)))

    def claim(self, pl_module: HookedDiffusion) -> None:
        atomic_write_text(self.folder / SETTINGS, json.dumps(generation_settings(pl_module), indent=2) + "\n")

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: HookedDiffusion, prediction: GenerationOutput,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        lines = "".join(json.dumps(manifest_record(item)) + "\n" for item in prediction.items)
        # Listed before written: a crash may leave a listed image missing (it is generated again), never the reverse.
        with self.rank_manifest_path(trainer.global_rank).open("a", encoding="utf-8") as manifest:
            manifest.write(lines)
        for item, image in zip(prediction.items, prediction.images):  # image: [3, H, W]
            atomic_write_bytes(self.folder / image_file(item), jpeg_bytes(image))

    def merge(self, rank_manifests: list[Path]) -> None:
        """`manifest.jsonl`: one line per listed file that exists, sorted by file."""
        records = {record["file"]: record for path in rank_manifests for record in read_manifest(path)}
        lines = [json.dumps(records[name]) + "\n" for name in sorted(records) if (self.folder / name).is_file()]
        atomic_write_text(self.folder / MANIFEST, "".join(lines))
