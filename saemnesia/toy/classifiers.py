"""ToyCanvas classifiers: small CNNs that name the object and the style of an image, and their file format.

A classifier folder holds `model.safetensors` (the state dict) and `classifier.json`: the module's class path,
its constructor arguments and its label list: the folder layout `saemnesia.classifiers.load_classifier` reads, so
an evaluator takes "a class path plus a checkpoint" without knowing the architecture.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from saemnesia.classifiers import ClassifierConfig, load_classifier
from saemnesia.concepts import NO_STYLE
from saemnesia.io import replace_folder
from saemnesia.toy.fitting import adamw_warmup_cosine
from saemnesia.toy.renderer import render_blobs
from saemnesia.toy.vocabulary import NO_OBJECT_LABEL, PLAIN_LABEL, TOY_OBJECTS, TOY_STYLES

CLASSIFIER_JSON = "classifier.json"
CLASSIFIER_WEIGHTS = "model.safetensors"
OBJECT_LABELS_WITH_NO_OBJECT = (*TOY_OBJECTS, NO_OBJECT_LABEL)
"""Head order of an object classifier that may answer "no object" (`ToyClassifierModule(no_object_fraction > 0)`):
the shapes, then `No_Object`. The plain object classifier's labels are `TOY_OBJECTS`."""
STYLE_LABELS = (*TOY_STYLES, PLAIN_LABEL)
"""Style classifier head order: the styles, then the plain rendering."""


class ToyClassifier(nn.Module):
    """Four conv stages (3×3 conv, batch norm, ReLU, 2× max-pool; widths w, 2w, 4w, 4w) and a linear head on
    the pooled 2×2 features: ~0.25 M parameters at w = 32, cheap enough to train on a CPU in minutes.

    Takes RGB images in [0, 1] of any size (resized to `image_size`) and returns logits `[B, num_classes]`.
    """

    def __init__(self, num_classes: int, width: int = 32, image_size: int = 32):
        super().__init__()
        self.init_args = {"num_classes": num_classes, "width": width, "image_size": image_size}
        self.image_size = image_size
        layers: list[nn.Module] = []
        channels = 3
        for stage_width in (width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(channels, stage_width, 3, padding=1, bias=False), nn.BatchNorm2d(stage_width),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = stage_width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size,) * 2, mode="bilinear", antialias=True)
        features = self.features(images * 2 - 1)  # [B, 4w, H/16, W/16]
        return self.head(features.mean(dim=(2, 3)))  # [B, num_classes]


def save_classifier(folder: str | os.PathLike, model: nn.Module, labels: list[str] | tuple[str, ...],
                    **metadata: Any) -> Path:
    """Write a classifier folder (replacing `folder` atomically). `model` must expose `init_args`, the keyword
    arguments that rebuild it; `metadata` (e.g. held-out accuracy) is stored in the JSON as is."""
    description = {"class_path": f"{type(model).__module__}.{type(model).__qualname__}",
                   "init_args": model.init_args, "labels": list(labels), **metadata}

    def write(staging: Path) -> None:
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
        save_file(state, str(staging / CLASSIFIER_WEIGHTS))
        (staging / CLASSIFIER_JSON).write_text(json.dumps(description, indent=2) + "\n")

    return replace_folder(folder, write)


def load_toy_classifier(classifiers: str | os.PathLike, kind: Literal["object", "style"]) -> nn.Module:
    """The `object` or `style` classifier of a ToyCanvas classifier folder (`classifiers/{kind}`), refused unless
    its labels are the toy vocabulary's, in order (objects: with or without `No_Object` last)."""
    classifier = load_classifier(ClassifierConfig(checkpoint=str(Path(classifiers) / kind)))
    accepted = [list(TOY_OBJECTS), list(OBJECT_LABELS_WITH_NO_OBJECT)] if kind == "object" else [list(STYLE_LABELS)]
    if classifier.labels not in accepted:
        raise ValueError(f"The {kind} classifier in {classifiers} has labels {classifier.labels}; expected "
                         f"{' or '.join(map(str, accepted))}.")
    return classifier


def style_targets(styles: Tensor) -> Tensor:
    """Style indices (`NO_STYLE` for plain) → style classifier targets (plain is the last label)."""
    return torch.where(styles == NO_STYLE, len(TOY_STYLES), styles)


def degrade(images: Tensor, noise_std: float, max_blur: float, max_shift: float) -> Tensor:
    """Random blur, per-channel shift and noise, so the classifiers also judge imperfect generated images."""
    batch = len(images)
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)  # [B, 3, H, W]
    images = images + max_blur * torch.rand(batch, 1, 1, 1) * (blurred - images)
    images = images + max_shift * (2 * torch.rand(batch, 3, 1, 1) - 1)
    images = images + noise_std * torch.rand(batch, 1, 1, 1) * torch.randn_like(images)
    return images.clamp(0, 1)


class ToyClassifierModule(pl.LightningModule):
    """Trains the object and the style classifier side by side on the same renders."""

    def __init__(self, width: int = 32, lr: float = 2e-3, weight_decay: float = 1e-4, warmup_steps: int = 50,
                 final_lr_fraction: float = 0.05, noise_std: float = 0.08, max_blur: float = 0.8,
                 max_shift: float = 0.05, no_object_fraction: float = 0.0):
        """
        Args:
            width: Channels of the first conv stage (doubled at each of the next two).
            lr: Peak AdamW learning rate.
            weight_decay: AdamW weight decay.
            warmup_steps: Linear warm-up steps before the cosine decay.
            final_lr_fraction: Learning rate at `trainer.max_steps`, as a fraction of `lr`.
            noise_std: Largest standard deviation of the Gaussian noise added to training images.
            max_blur: Largest blend towards a 3×3 box blur of training images (0 = none, 1 = fully blurred).
            max_shift: Largest per-channel brightness shift of training images.
            no_object_fraction: Images with no object (`render_blobs`) added to every batch, as a fraction of its
                renders, under a ninth object label `No_Object`; 1/8 (the toy config) makes them as frequent as
                one shape. 0: eight labels, so every image is named one of the shapes, wrecked ones included.
        """
        super().__init__()
        self.save_hyperparameters()
        self.object_labels = OBJECT_LABELS_WITH_NO_OBJECT if no_object_fraction > 0 else TOY_OBJECTS
        self.object_classifier = ToyClassifier(len(self.object_labels), width)
        self.style_classifier = ToyClassifier(len(STYLE_LABELS), width)

    def _with_no_object_images(self, batch: dict[str, Any], batch_idx: int, stage: str) -> tuple[Tensor, ...]:
        """(images, object targets, style targets) of the batch's renders followed by no-object images in the
        styles of its first renders; validation draws them from fixed seeds, so the held-out set stays fixed."""
        images, objects, styles = batch["image"], batch["object"], batch["style"]
        count = round(self.hparams.no_object_fraction * len(images))
        if count == 0:  # draws nothing from the global RNG either, so the renders-only run is unchanged
            return images, objects, style_targets(styles)
        if stage == "train":
            seeds = torch.randint(2**62, (count,)).tolist()
        else:
            seeds = [2**62 + batch_idx * len(images) + i for i in range(count)]
        blobs = render_blobs(styles[:count].tolist(), seeds, images.shape[-1]).to(images)
        return (torch.cat([images, blobs]), torch.cat([objects, objects.new_full((count,), len(TOY_OBJECTS))]),
                style_targets(torch.cat([styles, styles[:count]])))

    def _losses(self, batch: dict[str, Any], batch_idx: int, stage: str) -> Tensor:
        images, objects, styles = self._with_no_object_images(batch, batch_idx, stage)
        if stage == "train":
            images = degrade(images, self.hparams.noise_std, self.hparams.max_blur, self.hparams.max_shift)
        renders = objects < len(TOY_OBJECTS)
        total = images.new_zeros(())
        for name, model, targets in (("object", self.object_classifier, objects),
                                     ("style", self.style_classifier, styles)):
            logits = model(images)  # [B, classes]
            loss = F.cross_entropy(logits, targets)
            hits = (logits.argmax(1) == targets).float()
            self.log(f"{stage}/{name}_loss", loss, batch_size=len(images), prog_bar=False)
            # The accuracy bar (≥ 98 %) is on the shapes; the no-object images are scored on their own.
            self.log(f"{stage}/{name}_accuracy", hits[renders].mean(), batch_size=int(renders.sum()), prog_bar=True)
            if name == "object" and not renders.all():
                self.log(f"{stage}/no_object_accuracy", hits[~renders].mean(), batch_size=int((~renders).sum()))
            total = total + loss
        return total

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._losses(batch, batch_idx, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._losses(batch, batch_idx, "val")

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_warmup_cosine(self.parameters(), self.hparams.lr, self.hparams.weight_decay,
                                   self.trainer.max_steps, self.hparams.warmup_steps, self.hparams.final_lr_fraction)

    def export(self, folder: Path) -> None:
        """`folder/object` and `folder/style` classifier folders, with the last held-out accuracy if measured."""
        metrics = self.trainer.callback_metrics if self._trainer is not None else {}
        for name, model, labels in (("object", self.object_classifier, self.object_labels),
                                    ("style", self.style_classifier, STYLE_LABELS)):
            accuracy = metrics.get(f"val/{name}_accuracy")
            extra = {} if accuracy is None else {"val_accuracy": round(float(accuracy), 4)}
            save_classifier(Path(folder) / name, model, labels, **extra)
