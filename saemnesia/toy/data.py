"""`ToyRenderDataModule`: ToyCanvas renders with their labels and prompts, drawn on the fly.

Sample `i` of a dataset is a pure function of `(seed, i)`: its object and style cycle through every
(object, style-or-plain) pair, so any window of consecutive indices is balanced, and its placement comes from
the seed `(seed << 32) + i`. Nothing is stored; a batch is rendered at once (`__getitems__`).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

from saemnesia.concepts import NO_STYLE
from saemnesia.toy.renderer import render_seeds
from saemnesia.toy.vocabulary import TOY_OBJECTS, TOY_STYLES, toy_prompt

STYLE_CHOICES = (*range(len(TOY_STYLES)), NO_STYLE)
"""Style indices a sample cycles through: every style, then plain."""


def placement_seed(seed: int, index: int) -> int:
    """Seed of sample `index` of the dataset with seed `seed`: distinct for every pair with `index < 2**32`."""
    return (seed << 32) + index


class ToyRenderDataset(Dataset):
    """`num_samples` renders; item `i` is a dict `image` `[3, H, W]` in [0, 1], `object`, `style` (indices;
    `NO_STYLE` for plain) and `prompt`."""

    def __init__(self, num_samples: int, seed: int, image_size: int = 32):
        self.num_samples, self.seed, self.image_size = num_samples, seed, image_size

    def __len__(self) -> int:
        return self.num_samples

    def labels(self, index: int) -> tuple[int, int]:
        """(object, style) of sample `index`; the style cycles slower, so pairs repeat every 8 × 9 samples."""
        return index % len(TOY_OBJECTS), STYLE_CHOICES[(index // len(TOY_OBJECTS)) % len(STYLE_CHOICES)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """Render the whole batch at once (the DataLoader calls this with a batch's indices)."""
        objects, styles = zip(*(self.labels(index) for index in indices))
        seeds = [placement_seed(self.seed, index) for index in indices]
        images = render_seeds(objects, styles, seeds, self.image_size)  # [B, 3, H, W]
        return [
            {"image": image, "object": obj, "style": style,
             "prompt": toy_prompt(TOY_OBJECTS[obj], None if style == NO_STYLE else TOY_STYLES[style])}
            for image, obj, style in zip(images, objects, styles)
        ]


class ToyRenderDataModule(pl.LightningDataModule):
    """Training renders (shuffled, one seed) and held-out validation renders (another seed)."""

    def __init__(self, batch_size: int = 128, train_size: int = 1_000_000, val_size: int = 1152, seed: int = 0,
                 val_seed: int = 1, image_size: int = 32, num_workers: int = 0):
        """
        Args:
            batch_size: Renders per batch.
            train_size: Distinct training renders. Training stops at `trainer.max_steps`, so this only needs to
                exceed the samples a run draws for every render to be new.
            val_size: Held-out renders; a multiple of 72 (8 objects × 9 styles) keeps every pair equally often.
            seed: Seed of the training placements.
            val_seed: Seed of the validation placements; must differ from `seed` for a held-out set.
            image_size: Image side in pixels (32 for the shipped model).
            num_workers: DataLoader worker processes; rendering is cheap, so 0 is usually fastest on a CPU.
        """
        super().__init__()
        if seed == val_seed:
            raise ValueError(f"data.seed and data.val_seed are both {seed}; validation renders must be held out.")
        self.save_hyperparameters()
        self.train_set = ToyRenderDataset(train_size, seed, image_size)
        self.val_set = ToyRenderDataset(val_size, val_seed, image_size)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)
