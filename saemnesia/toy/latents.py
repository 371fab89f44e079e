"""`ToyLatentDataModule`: ToyCanvas renders encoded once by the model's frozen VAE, so that the diffusion
model's training steps skip both rendering and the VAE encoder.

Rendering and encoding a batch is ~20 % of a training step: in `configs/toy/toy_model.yaml`'s two DDP
processes a step took 747 ms (median of 60) with renders, 588 ms with encoded renders from a pool. This module
renders and encodes a fixed pool once, when fitting starts, and keeps each latent's Gaussian (mean and
standard deviation). Batches draw a fresh latent from each Gaussian, as Stable
Diffusion's training samples the VAE posterior, so a render seen four times is four different latents.

Under DDP every process encodes only its share of the pool (every `world_size`-th render, from its rank on)
and draws batches from that share: the pool costs `pool_size / world_size` encodes per process, and no
sampler has to split it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from diffusers import AutoencoderKL
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from saemnesia.toy.data import ToyRenderDataset
from saemnesia.toy.text_to_image import to_vae_range


class LatentPool(NamedTuple):
    """Encoded renders: the VAE posterior of each (unscaled) and its prompt."""

    mean: Tensor
    """`[N, 4, h, w]` posterior means."""
    std: Tensor
    """`[N, 4, h, w]` posterior standard deviations."""
    prompts: list[str]
    """The N prompts of the renders."""


@torch.no_grad()
def encode_renders(vae: AutoencoderKL, renders: ToyRenderDataset, indices: Sequence[int],
                   batch_size: int = 256) -> LatentPool:
    """Render `indices` of `renders` and encode them, `batch_size` at a time, on the VAE's device."""
    means, stds, prompts = [], [], []
    for start in range(0, len(indices), batch_size):
        samples = renders.__getitems__(list(indices[start:start + batch_size]))
        images = torch.stack([sample["image"] for sample in samples]).to(vae.device)  # [b, 3, H, W]
        posterior = vae.encode(to_vae_range(images)).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
        prompts += [sample["prompt"] for sample in samples]
    return LatentPool(torch.cat(means), torch.cat(stds), prompts)


class PoolBatches(IterableDataset):
    """Batches of a `LatentPool` as dicts `latent_mean`, `latent_std` `[b, 4, h, w]` and `prompt`: endless
    reshuffled passes (`seed` given), or one pass in pool order (`seed=None`, for validation)."""

    def __init__(self, pool: LatentPool, batch_size: int, seed: int | None):
        self.pool, self.batch_size, self.seed = pool, batch_size, seed

    def _batch(self, picked: Tensor) -> dict[str, Any]:
        return {"latent_mean": self.pool.mean[picked], "latent_std": self.pool.std[picked],
                "prompt": [self.pool.prompts[i] for i in picked.tolist()]}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        size = len(self.pool.prompts)
        if self.seed is None:
            for start in range(0, size, self.batch_size):
                yield self._batch(torch.arange(start, min(start + self.batch_size, size)))
            return
        generator = torch.Generator().manual_seed(self.seed)
        while True:  # training runs on `max_steps`, so the stream never has to end
            order = torch.randperm(size, generator=generator)
            for start in range(0, size - self.batch_size + 1, self.batch_size):  # whole batches only
                yield self._batch(order[start:start + self.batch_size])


class ToyLatentDataModule(pl.LightningDataModule):
    """Training and held-out validation pools of encoded renders, encoded with the model's own `vae` (so the
    UNet always learns the latents of the VAE it ships with)."""

    def __init__(self, batch_size: int = 64, pool_size: int = 131_072, val_size: int = 1152, seed: int = 0,
                 val_seed: int = 1, image_size: int = 32, encode_batch_size: int = 256):
        """
        Args:
            batch_size: Latents per batch (per process under DDP).
            pool_size: Distinct training renders, split between the processes. 2^17 renders are seen ~4 times
                each by the shipped model's 4000 steps of 128; with the start-up, encoding them takes ~4 min in
                two processes on 2 CPU cores.
            val_size: Held-out renders; a multiple of 72 (8 objects × 9 styles) keeps every pair equally often.
            seed: Seed of the training placements and of the batch order.
            val_seed: Seed of the validation placements; must differ from `seed` for a held-out set.
            image_size: Image side in pixels (32 for the shipped model).
            encode_batch_size: Renders encoded at once while building the pools.
        """
        super().__init__()
        if seed == val_seed:
            raise ValueError(f"data.seed and data.val_seed are both {seed}; validation renders must be held out.")
        self.save_hyperparameters()
        self.train_pool: LatentPool | None = None
        self.val_pool: LatentPool | None = None

    def _encode(self, vae: AutoencoderKL, size: int, seed: int) -> LatentPool:
        rank, world_size = self.trainer.global_rank, self.trainer.world_size
        renders = ToyRenderDataset(size, seed, self.hparams.image_size)
        return encode_renders(vae, renders, range(rank, size, world_size), self.hparams.encode_batch_size)

    def setup(self, stage: str) -> None:
        vae = getattr(self.trainer.lightning_module, "vae", None)
        if not isinstance(vae, AutoencoderKL):
            raise ValueError(f"data ToyLatentDataModule encodes renders with the model's `vae`, and "
                             f"{type(self.trainer.lightning_module).__name__} has no AutoencoderKL `vae`.")
        vae.to(self.trainer.strategy.root_device)  # encode where the model will run (the strategy moves it anyway)
        if stage == "fit" and self.train_pool is None:
            share = self.hparams.pool_size // self.trainer.world_size  # the smallest process's share
            if share < self.hparams.batch_size:  # `PoolBatches` would never yield a whole batch
                raise ValueError(f"data.pool_size {self.hparams.pool_size} leaves {share} renders to each of "
                                 f"{self.trainer.world_size} processes, fewer than data.batch_size "
                                 f"{self.hparams.batch_size}.")
            self.train_pool = self._encode(vae, self.hparams.pool_size, self.hparams.seed)
        if stage in ("fit", "validate") and self.val_pool is None:
            self.val_pool = self._encode(vae, self.hparams.val_size, self.hparams.val_seed)

    def train_dataloader(self) -> DataLoader:
        seed = self.hparams.seed * 1000 + self.trainer.global_rank  # each process its own batch order
        return DataLoader(PoolBatches(self.train_pool, self.hparams.batch_size, seed), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(PoolBatches(self.val_pool, self.hparams.batch_size, None), batch_size=None)
