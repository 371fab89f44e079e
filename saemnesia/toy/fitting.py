"""What the three ToyCanvas training runs share: the optimiser schedule and the export of their product.

Each ToyCanvas LightningModule has an `export(folder)` method writing what the rest of the project reads
(classifier folders, a VAE folder, a diffusers pipeline folder); the `ToyExport` callback calls it once
fitting ends, after `WarmupEMA` has copied the averaged weights in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor, nn


class ToyExport(pl.Callback):
    """Calls `pl_module.export(dirpath)` on the main process when fitting ends."""

    def __init__(self, dirpath: str):
        """
        Args:
            dirpath: Folder the module exports to (replaced as a whole), e.g. `saemnesia/toy/assets/pipeline`.
        """
        self.dirpath = Path(dirpath)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            pl_module.export(self.dirpath)


class WarmupEMA(WeightAveraging):
    """Exponential moving average of the weights with diffusers' warm-up: update `n` uses the decay
    `min(decay, (1 + n) / (10 + n))`.

    With a fixed decay of 0.999 the random initial weights still make up 0.999^600 = 55 % of the average after
    600 steps, so snapshots of a short run are useless; the warm-up lets the average follow the fast early
    changes and settle to `decay` later. The averaged weights replace the trained ones for validation, in
    checkpoints (`state_dict`) and when fitting ends (`WeightAveraging`).
    """

    def __init__(self, decay: float = 0.999):
        """
        Args:
            decay: Largest decay of the average (reached after ~9,000 updates at 0.999).
        """
        super().__init__(multi_avg_fn=self._update)
        self.decay = decay

    @torch.no_grad()
    def _update(self, averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        decay = min(self.decay, (1 + num_averaged.item()) / (10 + num_averaged.item()))
        for average, value in zip(averaged, current):
            if average.is_floating_point():
                average.lerp_(value, 1 - decay)
            else:  # integer buffers (e.g. position ids) are not averaged
                average.copy_(value)


def adamw_warmup_cosine(parameters: Iterable[nn.Parameter], lr: float, weight_decay: float, total_steps: int,
                        warmup_steps: int, final_lr_fraction: float) -> dict[str, Any]:
    """AdamW whose learning rate rises linearly for `warmup_steps`, then follows a cosine from `lr` down to
    `final_lr_fraction * lr` at `total_steps` (Lightning's `configure_optimizers` format)."""
    if total_steps <= 0:
        raise ValueError(f"trainer.max_steps is {total_steps}; the cosine schedule needs a positive step count.")
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_lr_fraction + (1 - final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
