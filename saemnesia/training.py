"""`SAEModule`: the LightningModule of `fit`, training an SAE with a configured objective (docs/method.md §2).

Lightning owns the loop, DDP, precision, clipping, checkpoints and logging; this module owns the SAE, the optimiser
and its schedule, and logs what the objective (saemnesia/objectives.py) computes. The objective decides the rest:
set-up, loss terms, decoder renormalisation and its own state, which `--ckpt_path` restores with the module's.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from saemnesia.concepts import ConceptVocabulary
from saemnesia.objectives import SupervisedObjective, UnsupervisedObjective
from saemnesia.sae import SaeConfig, SparseAutoencoder

# The hyper-parameters stored in Lightning checkpoints include these plain dataclasses; allow them through
# `torch.load(weights_only=True)`, which resuming and the SAE export use.
torch.serialization.add_safe_globals([ConceptVocabulary, SaeConfig])


class SAEModule(pl.LightningModule):
    """Trains a `SparseAutoencoder` on activation batches of an `ActivationDataModule`."""

    def __init__(
        self,
        d_in: int,
        activations_hookpoint: str,
        vocabulary: ConceptVocabulary | None = None,
        objective: UnsupervisedObjective | SupervisedObjective | None = None,
        sae: SaeConfig | None = None,
        init_from: str | None = None,
        lr: float = 4e-4,
        lr_schedule: Literal["constant", "linear_decay", "cosine"] = "linear_decay",
        warmup_steps: int = 0,
    ):
        """
        Args:
            d_in: Activation width; linked from the data manifest (`data.d_in`).
            activations_hookpoint: Block the activations come from; linked from the manifest (`data.hookpoint`),
                names the exported SAE folder. (Not `hookpoint`: that names the block to hook in `predict` runs.)
            vocabulary: Concepts of the data; linked from the manifest. Needed by the supervised objective.
            objective: `UnsupervisedObjective` (docs/method.md §2.1, the default) or `SupervisedObjective`
                (docs/method.md §2.2), with its own options (`class_path` and `init_args` in YAML).
            sae: Architecture of a fresh SAE (ignored with `init_from`). Default: expansion 16, k 32.
            init_from: SAE checkpoint folder to start from (fine-tuning, as published); `None` = fresh init.
            lr: Adam learning rate. Published: 4e-4 (unsupervised), 5e-6 (supervised).
            lr_schedule: `linear_decay` to 0 over `trainer.max_steps` (published unsupervised), `constant`
                (published supervised) or `cosine` to 0.
            warmup_steps: Linear warm-up steps before the schedule (published: none).
        """
        super().__init__()
        self.save_hyperparameters(ignore=["objective"])  # a module: its state is in the state dict
        if lr <= 0:
            raise ValueError(f"model.lr must be positive, got {lr}.")
        if init_from is not None:
            self.sae = SparseAutoencoder.load(init_from, activations_hookpoint)  # the folder or its parent
            if self.sae.d_in != d_in:
                raise ValueError(f"model.init_from {init_from} is an SAE for d_in={self.sae.d_in} but the "
                                 f"activation data has d_in={d_in}.")
        else:
            self.sae = SparseAutoencoder(d_in, sae or SaeConfig())
        self.objective = objective or UnsupervisedObjective()
        self.objective.bind(self.sae, vocabulary)

    @property
    def concept_latents(self) -> dict[str, int] | None:
        """The objective's `{concept: latent}` assignment (supervised), exported with the SAE."""
        return self.objective.concept_latents

    # -- set-up ---------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self.objective.on_fit_start(self)

    def on_after_batch_transfer(self, batch: dict[str, Tensor], dataloader_idx: int) -> dict[str, Tensor]:
        # Batches come as stored (float16): converting here, on the device, halves what the loader moves.
        batch["act"] = batch["act"].to(self.sae.W_dec.dtype)
        return batch

    def on_train_batch_start(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.objective.on_train_batch_start(self, batch, batch_idx)

    # -- steps ----------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step("train", batch)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step("val", batch)

    def _step(self, stage: str, batch: dict[str, Tensor]) -> Tensor:
        """The objective's terms, each scalar logged per step in training and as an epoch mean synced over ranks in
        validation, and its epoch metrics."""
        terms = self.objective(self.sae, batch)
        per_step = stage == "train"
        for name, value in terms._asdict().items():
            if value.ndim == 0:
                self.log(f"{stage}/{name}", value.detach(), prog_bar=name == "loss", on_step=per_step,
                         on_epoch=not per_step, sync_dist=not per_step, batch_size=1)
        for name, metric in self.objective.epoch_metrics(stage).items():
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True)
        return terms.loss

    # -- optimisation ---------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.Adam(self.sae.parameters(), lr=self.hparams.lr)
        total, warmup, schedule = self.trainer.max_steps, self.hparams.warmup_steps, self.hparams.lr_schedule
        if schedule != "constant" and total <= 0:
            raise ValueError(f"model.lr_schedule={schedule} needs trainer.max_steps > 0 (training runs on step "
                             "counts).")

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            if schedule == "linear_decay":
                return 1.0 - progress
            if schedule == "cosine":
                return 0.5 * (1.0 + math.cos(math.pi * progress))
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.objective.renormalises_decoder:
            self.sae.remove_gradient_parallel_to_decoder_directions()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.objective.renormalises_decoder:
            self.sae.set_decoder_norm_to_unit_norm()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Also beside the state dict, for readers of the checkpoint file (SaeExport exports the best one's).
        checkpoint["concept_latents"] = self.concept_latents
