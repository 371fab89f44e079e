"""`SaeExport`: keeps an SAE folder that downstream steps read, next to Lightning's checkpoints.

Lightning checkpoints hold the whole training state; the rest of the workflow (statistics, erasure) and the
published code read the SAE folder format of docs/method.md §7 instead: `<dirpath>/<hookpoint>/cfg.json`,
`sae.safetensors` and, after supervised training, `concept_latents.json`. The folder is rewritten at every
checkpoint, so `<dirpath>/fit_complete.json` tells a finished fit's export from an interrupted one's.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import torch

from saemnesia.concepts import save_concept_latents
from saemnesia.io import atomic_write_text
from saemnesia.sae import SparseAutoencoder
from saemnesia.training import SAEModule

CONCEPT_LATENTS_FILE = "concept_latents.json"
FIT_COMPLETE = "fit_complete.json"
"""Written into `dirpath` after fitting ended and its product was exported; removed when a fit starts."""


class SaeExport(pl.Callback):
    """Export the SAE whenever a checkpoint is saved, and the best checkpoint's SAE when fitting ends."""

    def __init__(self, dirpath: str):
        """
        Args:
            dirpath: Parent folder of the export; the SAE goes to `dirpath/<hookpoint>/` (a parent folder plus
                hookpoint name, as `SparseAutoencoder.load(dirpath, hookpoint)` reads it).
        """
        self.dirpath = Path(dirpath)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: SAEModule) -> None:
        if trainer.is_global_zero:  # from now on the export may be an intermediate one
            (self.dirpath / FIT_COMPLETE).unlink(missing_ok=True)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: SAEModule, checkpoint: dict) -> None:
        if trainer.is_global_zero:
            self.export(pl_module.sae, pl_module.hparams.activations_hookpoint, pl_module.concept_latents)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: SAEModule) -> None:
        if not trainer.is_global_zero:
            return
        sae, concept_latents = pl_module.sae, pl_module.concept_latents
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        if best:  # with a monitored metric (early stopping), the best weights are the product, not the last ones
            checkpoint = torch.load(best, map_location="cpu", weights_only=True)
            sae = SparseAutoencoder(sae.d_in, sae.cfg)
            sae.load_state_dict({name.removeprefix("sae."): tensor for name, tensor in checkpoint["state_dict"].items()
                                 if name.startswith("sae.")})
            concept_latents = checkpoint.get("concept_latents")
        self.export(sae, pl_module.hparams.activations_hookpoint, concept_latents)
        record = {"checkpoint": best or None, "global_step": trainer.global_step}  # what the export is
        atomic_write_text(self.dirpath / FIT_COMPLETE, json.dumps(record) + "\n")

    def export(self, sae: SparseAutoencoder, hookpoint: str, concept_latents: dict[str, int] | None) -> None:
        sae.save(self.dirpath / hookpoint)
        if concept_latents is not None:
            save_concept_latents(self.dirpath / hookpoint / CONCEPT_LATENTS_FILE, concept_latents)
