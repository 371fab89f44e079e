"""`ImageFolderDataModule`: the images of an unlearning run and their `manifest.jsonl`, for the `test` run.

Layout (written by the unlearning `predict` run, `callbacks.image_writer`): `root/{target}/{Style}_{Object}_seed
{seed}.jpg` and plain `root/{target}/{Object}_seed{seed}.jpg`, where `{target}` labels the erased set (a concept name,
`none` for no erasure, `first_{n:02d}` for the first n concepts of a sequence), under `root/{candidate}/` in a
parameter search, and `root/manifest.jsonl` with one JSON object per image: `file` (relative to root), `target`,
`erased` (concept names), `candidate` (`{percentile, multiplier}` or null), `prompt_id`, `prompt`, `object`, `style`
(null for plain), `seed`. `root/generation.json` records the generation settings.

Under DDP every process reads a strided share of the images without padding, so no image is counted twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from saemnesia.class_params import Candidate
from saemnesia.concepts import NO_ERASURE

MANIFEST = "manifest.jsonl"
SETTINGS = "generation.json"
"""Generation settings of the images, written by `callbacks.image_writer.ImageWriter`."""
RECORD_KEYS = ("file", "target", "erased", "prompt_id", "prompt", "object", "style", "seed")


class ImageRecord(NamedTuple):
    """One line of `manifest.jsonl`."""

    file: str
    """Path relative to the images root, e.g. `Bears/Cubism_Bears_seed188.jpg`."""
    target: str
    """Folder label of the erased set."""
    erased: tuple[str, ...]
    """Concepts erased while generating the image (empty for the reference)."""
    prompt_id: str
    """Prompt identity, shared by the images of the same prompt under every target."""
    prompt: str
    object: str
    style: str | None
    """`None` for a plain prompt."""
    seed: int
    candidate: Candidate | None = None
    """The search candidate the image was erased with; `None` outside a search."""


def read_manifest(root: Path) -> list[ImageRecord]:
    """The records of `root/manifest.jsonl`, checked: every file exists, each target has one erased set."""
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"data.root {root} has no {MANIFEST}; expected the folder written by the unlearning "
                                "run (images + manifest.jsonl).")
    records: dict[str, ImageRecord] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if not isinstance(entry["erased"], list):
                raise TypeError("'erased' must be a list of concept names")
            candidate = entry.get("candidate")  # absent in manifests written before searches ran as one run
            record = ImageRecord(**{key: entry[key] for key in RECORD_KEYS})._replace(
                erased=tuple(entry["erased"]),
                candidate=None if candidate is None else Candidate.from_params(candidate, f"{path} line {number}"))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path} line {number} is not a JSON object with keys {list(RECORD_KEYS)} "
                             f"({error!r}).") from error
        # A resumed run may list an image again; only a contradicting repeat is an error.
        if records.setdefault(record.file, record) != record:
            raise ValueError(f"{path} lists {record.file} twice with different metadata (line {number}).")
    if not records:
        raise ValueError(f"{path} lists no images.")
    missing = [name for name in records if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} lists {len(missing)} missing image files, e.g. {missing[:3]}.")
    erased: dict[str, tuple[str, ...]] = {}
    for record in records.values():
        if erased.setdefault(record.target, record.erased) != record.erased:
            raise ValueError(f"{path}: target {record.target!r} has images with erased sets "
                             f"{list(erased[record.target])} and {list(record.erased)}; expected one per target.")
    return list(records.values())


def read_settings(path: Path) -> dict[str, Any] | None:
    """The generation settings recorded next to the images, if any."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); expected the images' generation settings.") from error


def load_image(path: Path) -> Tensor:
    """An image file as uint8 RGB `[3, H, W]`."""
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)  # [3, H, W]


class ImageFolder(Dataset):
    def __init__(self, root: Path, records: list[ImageRecord]):
        self.root, self.records = root, records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Tensor, ImageRecord]:
        record = self.records[index]
        return load_image(self.root / record.file), record


def collate(items: list[tuple[Tensor, ImageRecord]]) -> tuple[Tensor, list[ImageRecord]]:
    """Images `[B, 3, H, W]` and their records; the images of a batch must share one size."""
    sizes = {tuple(image.shape) for image, _ in items}
    if len(sizes) > 1:
        raise ValueError(f"Images of one batch have different sizes {sorted(sizes)} (e.g. {items[0][1].file}); "
                         "generate every image at one size.")
    return torch.stack([image for image, _ in items]), [record for _, record in items]


class ImageFolderDataModule(pl.LightningDataModule):
    """Generated images with their manifest; `erased_by_target` tells the evaluator what each target erased."""

    def __init__(self, root: str, targets: list[str] | None = None, batch_size: int = 32, num_workers: int = 0):
        """
        Args:
            root: Images folder of an unlearning run (with `manifest.jsonl`).
            targets: Evaluate only these targets (folder labels); `None` = all.
            batch_size: Images per batch and process.
            num_workers: DataLoader worker processes decoding images.
        """
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be a positive integer, got {batch_size}.")
        self.root, self.batch_size, self.num_workers = Path(root), batch_size, num_workers
        records = read_manifest(self.root)
        unknown = sorted(set(targets or ()) - {record.target for record in records})
        if unknown:
            raise ValueError(f"data.targets {unknown} have no images in {self.root / MANIFEST}.")
        self.records = [record for record in records if targets is None or record.target in targets]
        erased = {record.target: record.erased for record in self.records}
        # The reference first, then single erasures, then longer sequences: the order of the report.
        self.erased_by_target = {target: list(erased[target]) for target in
                                 sorted(erased, key=lambda t: (t != NO_ERASURE, len(erased[t]), t))}
        self.settings = read_settings(self.root / SETTINGS)

    def test_dataloader(self) -> DataLoader:
        world_size = 1 if self.trainer is None else self.trainer.world_size
        if len(self.records) < world_size:
            raise ValueError(f"Only {len(self.records)} images for {world_size} processes; every process needs one.")
        sampler = None
        if world_size > 1:  # Lightning's default sampler would pad with repeated images
            sampler = UnrepeatedDistributedSampler(self.records, num_replicas=world_size,
                                                   rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(ImageFolder(self.root, self.records), batch_size=self.batch_size, sampler=sampler,
                          num_workers=self.num_workers, collate_fn=collate)
