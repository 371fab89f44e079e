"""`PromptWriter` and `ResumableWriter`: the bases of the callbacks that write what a `predict` run of
`HookedDiffusion` over a `PromptDataModule` yields (activation shards, images, concept statistics).

`PromptWriter` checks the run once in `setup`, against what the writer declares. `ResumableWriter` writes into a
folder that re-running the same command resumes: every process reads what the folder stores (`resume`), rank 0 then
prepares it (`claim`), and the datamodule leaves out the stored items before any dataloader exists. Each rank keeps
its own manifest; when predicting ends and every rank has written, rank 0 merges them into one (`merge`).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import asdict
from pathlib import Path
from typing import ClassVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_warn

from datamodules.prompts import PromptDataModule
from saemnesia.generation import CaptureConfig, HookedDiffusion, PromptItem


class PromptWriter(BasePredictionWriter):
    """Writes every batch (`write_on_batch_end`) of a checked `HookedDiffusion` run over a `PromptDataModule`."""

    needs_capture: ClassVar[bool | CaptureConfig] = False
    """`True`: the model must capture (`model.capture` set); a `CaptureConfig`: it must capture exactly that."""
    needs_images: ClassVar[bool] = False
    """The model must decode images (`model.output_type: image`) rather than return latents."""
    allows_erasure: ClassVar[bool] = True
    """`False`: the prompt items must erase nothing (no `data.targets`, no `data.sequential`)."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        name = type(self).__name__
        self._check_model(pl_module)
        data = trainer.datamodule
        if not isinstance(data, PromptDataModule):
            raise ValueError(f"{name} needs a PromptDataModule (data.class_path), got {type(data).__name__}.")
        if not self.allows_erasure and any(item.erase for item in data.items):
            raise ValueError(f"{name} describes generation without erasure; remove data.targets and "
                             "data.sequential.")
        if trainer.predict_loop.return_predictions:
            rank_zero_warn(f"{name} writes every batch, but Trainer.predict also keeps them all in memory; set "
                           "return_predictions: false in the predict config.")
        super().setup(trainer, pl_module, stage)

    def _check_model(self, module: pl.LightningModule) -> None:
        """Refuse a model that is no `HookedDiffusion` or lacks a setting this writer needs, naming them all."""
        hooked = isinstance(module, HookedDiffusion)
        needs: dict[str, bool] = {}  # setting → whether the model has it
        if self.needs_images:
            needs["model.output_type: image"] = hooked and module.hparams.output_type == "image"
        if self.needs_capture is True:
            needs["model.capture set"] = hooked and module.capture is not None
        elif self.needs_capture:
            needs[f"model.capture: {json.dumps(asdict(self.needs_capture))}"] = (
                hooked and module.capture == self.needs_capture)
        if not hooked or not all(needs.values()):
            settings = f" with {' and '.join(needs)}" if needs else ""
            raise ValueError(f"{type(self).__name__} needs a HookedDiffusion model{settings}.")


class ResumableWriter(PromptWriter):
    """A `PromptWriter` into a folder that a rerun of the same command resumes, with one manifest of all ranks."""

    manifest_suffix: ClassVar[str]
    """Extension of the manifests, e.g. `.json`: rank r keeps `manifest-r{r}.json`, rank 0 merges them."""

    def __init__(self, output_dir: str) -> None:
        """
        Args:
            output_dir: Folder to write, e.g. `runs/toy/unlearn/images`; an interrupted run resumes in it.
        """
        super().__init__()
        self.folder = Path(output_dir)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        stored = self.resume(trainer, pl_module)
        self.folder.mkdir(parents=True, exist_ok=True)  # once the run passed every check
        trainer.strategy.barrier(f"{type(self).__name__}-read")  # every process has read before rank 0 writes
        if trainer.is_global_zero:
            self.claim(pl_module)
        if trainer.datamodule.exclude(stored, key=self.item_key) == 0:
            self.merge_manifests(trainer)  # nothing to generate: Lightning skips the predict loop and its hooks

    def item_key(self, item: PromptItem) -> str:
        """What names a stored item (`resume` returns these keys): its prompt id unless a writer says otherwise."""
        return item.prompt_id

    def resume(self, trainer: pl.Trainer, pl_module: HookedDiffusion) -> Collection[str]:
        """Every process: refuse a folder written with other settings; return the keys of the items it stores."""
        raise NotImplementedError

    def claim(self, pl_module: HookedDiffusion) -> None:
        """Rank 0, once every process has read the folder: prepare it for this run's writes."""

    def merge(self, rank_manifests: list[Path]) -> None:
        """Rank 0, once every rank has written: combine the rank manifests (sorted by name) into the folder's."""
        raise NotImplementedError

    def rank_manifest_path(self, rank: int) -> Path:
        """The manifest that rank `rank` keeps."""
        return self.folder / f"manifest-r{rank}{self.manifest_suffix}"

    def rank_manifests(self) -> list[Path]:
        """The folder's rank manifests, sorted by name (an earlier run may have had other ranks)."""
        return sorted(self.folder.glob(f"manifest-r*{self.manifest_suffix}"))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.merge_manifests(trainer)

    def merge_manifests(self, trainer: pl.Trainer) -> None:
        """Rank 0 merges the rank manifests once every rank has written; no rank goes on before the merge is done."""
        trainer.strategy.barrier(f"{type(self).__name__}-written")
        if trainer.is_global_zero:
            self.merge(self.rank_manifests())
        trainer.strategy.barrier(f"{type(self).__name__}-merged")
