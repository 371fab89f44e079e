"""Image classifiers that judge generated images: the UnlearnCanvas ViT-L/16 pair and any `nn.Module` classifier.

The published object and style classifiers (docs/method.md §6) are timm's `vit_large_patch16_224` with a new head, saved
as `torch.save({"model_state_dict": ...})`. timm needs torchvision, which is not always installable, so
`VisionTransformer` rebuilds that network in plain torch with exactly timm's parameter names and shapes;
`create_vit` uses timm instead when it is importable. Other classifiers (the ToyCanvas CNNs) are a class path plus
a checkpoint, or a folder holding both (`classifier.json` + `model.safetensors`).

An `ImageClassifier` takes uint8 or [0, 1] images `[B, 3, H, W]` of any size and applies its own preprocessing
(resize, normalise), so one batch of images feeds classifiers that expect different inputs.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from saemnesia.concepts import UNLEARNCANVAS_OBJECTS, UNLEARNCANVAS_STYLES

_RUST = UNLEARNCANVAS_STYLES.index("Rust")
UNLEARNCANVAS_STYLE_LABELS = (*UNLEARNCANVAS_STYLES[:_RUST + 1], "Seed_Images", *UNLEARNCANVAS_STYLES[_RUST + 1:])
"""Head order of the published style classifier: the 50 styles alphabetically, `Seed_Images` between Rust and Sketch."""

LABEL_SETS = {"unlearncanvas_objects": tuple(UNLEARNCANVAS_OBJECTS),
              "unlearncanvas_styles": UNLEARNCANVAS_STYLE_LABELS}
"""Label lists a config may name instead of listing them."""

CLASSIFIER_JSON = "classifier.json"
CLASSIFIER_WEIGHTS = "model.safetensors"
PUBLISHED_PREPROCESSING = {"image_size": 224, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
"""Preprocessing of the published ViTs (and the default for checkpoint files): resize to 224², normalise to [-1, 1]."""
FOLDER_PREPROCESSING = {"image_size": None, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
"""Default of a classifier folder whose `classifier.json` names none: [0, 1] images at their own size."""


class Attention(nn.Module):
    """timm's multi-head self-attention: one fused `qkv` projection and an output projection `proj`."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)  # [B, N, 3, h, d/h]
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, h, N, d/h]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, h, N, d/h]
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))  # [B, N, d]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (no layer scale, no drop path: inference only)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # [B, H/p · W/p, d]


class VisionTransformer(nn.Module):
    """timm's `VisionTransformer` with class-token pooling, as `vit_large_patch16_224` builds it (the defaults).

    The state dict has timm's keys and shapes (`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.{i}.…`,
    `norm`, `head`), so published checkpoints load as they are. Takes normalised images `[B, 3, img, img]`.
    """

    def __init__(self, num_classes: int, img_size: int = 224, patch_size: int = 16, embed_dim: int = 1024,
                 depth: int = 24, num_heads: int = 16, mlp_ratio: float = 4.0):
        super().__init__()
        if img_size % patch_size or embed_dim % num_heads:
            raise ValueError(f"VisionTransformer needs img_size divisible by patch_size and embed_dim by num_heads; "
                             f"got {img_size}/{patch_size} and {embed_dim}/{num_heads}.")
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        # Zeros: the weights always come from a checkpoint (this module classifies, it is never trained here).
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch_size) ** 2 + 1, embed_dim))
        self.blocks = nn.Sequential(*(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images)  # [B, N, d]
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed  # [B, 1 + N, d]
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])  # [B, num_classes]


def create_vit(num_classes: int, **sizes: Any) -> nn.Module:
    """timm's `VisionTransformer` when timm is importable, else ours (same state dict); `sizes` as in ours."""
    try:
        from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
    except ImportError:
        return VisionTransformer(num_classes, **sizes)
    except RuntimeError as error:  # timm imports torchvision, whose ops fail to register under another torch build
        warnings.warn(f"timm could not be imported ({error}): its torchvision does not match torch "
                      f"{torch.__version__}; classifying with saemnesia's copy of its VisionTransformer.", stacklevel=2)
        return VisionTransformer(num_classes, **sizes)
    return TimmVisionTransformer(num_classes=num_classes, **sizes)


@dataclass
class ClassifierConfig:
    """Where a classifier's weights are, how to rebuild it and how to feed it."""

    checkpoint: str
    """A classifier folder (`classifier.json` + `model.safetensors`) or a checkpoint file: `.safetensors`, or a
    `torch.save` file (`.pth`, `.pt`) with the weights under `model_state_dict` (the published layout) or bare."""
    labels: list[str] | str | None = None
    """Class name of each logit, in head order, or a named list (`unlearncanvas_objects`, `unlearncanvas_styles`);
    `None` = the labels of the folder's `classifier.json`."""
    class_path: str | None = None
    """Importable `nn.Module` class (or factory) of the network; `None` = the folder's `classifier.json`, or
    `saemnesia.classifiers.create_vit` (ViT-L/16) for a checkpoint file."""
    init_args: dict[str, Any] = field(default_factory=dict)
    """Constructor arguments of `class_path` (for the ViT: `img_size, patch_size, embed_dim, depth, num_heads`);
    `num_classes` defaults to the number of labels."""
    image_size: int | None = None
    """Square size images are resized to; `None` = the folder's `classifier.json` (else no resize), or 224 for a
    checkpoint file."""
    mean: list[float] | None = None
    """Per-channel mean subtracted from [0, 1] images; `None` = `classifier.json` (else 0), or 0.5 for a file."""
    std: list[float] | None = None
    """Per-channel divisor after the mean; `None` = `classifier.json` (else 1), or 0.5 for a file."""
    trust_pickle: bool = False
    """Allow a `torch.save` checkpoint holding objects other than tensors (fully unpickled: trusted files only)."""


class ImageClassifier(nn.Module):
    """A classifier network with its label list and preprocessing; returns logits `[B, len(labels)]`."""

    def __init__(self, model: nn.Module, labels: list[str], image_size: int | None,
                 mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.model, self.labels, self.image_size = model.eval(), list(labels), image_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        """`images`: uint8 `[B, 3, H, W]` or floats in [0, 1]."""
        if images.dtype == torch.uint8:
            images = images.float() / 255
        if self.image_size is not None and images.shape[-2:] != (self.image_size, self.image_size):
            # Antialiased bilinear, as PIL's resize of the reference preprocessing (differences below 1/255).
            images = F.interpolate(images, size=(self.image_size,) * 2, mode="bilinear", antialias=True)
        # The buffers follow the module's dtype (e.g. under `precision: bf16-true`); so does the network's input.
        return self.model(((images - self.mean) / self.std).to(self.mean.dtype))


def load_classifier(config: ClassifierConfig, source: str = "classifier") -> ImageClassifier:
    """Build the network of `config`, load its weights and wrap it with its labels and preprocessing.

    `source` names the config option in error messages (e.g. `model.object_classifier`).
    """
    path = Path(config.checkpoint)
    if path.is_dir():
        description_file = path / CLASSIFIER_JSON
        if not description_file.is_file():
            raise FileNotFoundError(f"{source}.checkpoint folder {path} has no {CLASSIFIER_JSON}; expected "
                                    f"{CLASSIFIER_JSON} + {CLASSIFIER_WEIGHTS}.")
        description = json.loads(description_file.read_text(encoding="utf-8"))
        defaults = {key: description.get(key, value) for key, value in FOLDER_PREPROCESSING.items()}
        state = load_file(str(path / CLASSIFIER_WEIGHTS))
    elif path.is_file():
        description, defaults = {}, PUBLISHED_PREPROCESSING
        state = _read_state_dict(path, config.trust_pickle, source)
    else:
        raise FileNotFoundError(f"{source}.checkpoint {path} does not exist; expected a classifier folder or file.")
    mean, std = (tuple(getattr(config, key) or defaults[key]) for key in ("mean", "std"))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"{source}.mean and .std must be 3 numbers each, std positive; got {mean} and {std}.")
    image_size = config.image_size if config.image_size is not None else defaults["image_size"]
    labels = _resolve_labels(config.labels if config.labels is not None else description.get("labels"), source)
    class_path = config.class_path or description.get("class_path") or "saemnesia.classifiers.create_vit"
    factory = _import(class_path, source)
    init_args = {**description.get("init_args", {}), **config.init_args}
    if "num_classes" in inspect.signature(factory).parameters:
        init_args.setdefault("num_classes", len(labels))
    with torch.device("meta"):  # check the checkpoint against the architecture before paying for a real init
        _check_weights(factory(**init_args), state, path, class_path, len(labels), source)
    model = factory(**init_args)
    model.load_state_dict(state)
    return ImageClassifier(model, labels, image_size, mean, std)


def _read_state_dict(path: Path, trust_pickle: bool, source: str) -> dict[str, Tensor]:
    """Tensors of a `.safetensors` file or of a `torch.save` file (under `model_state_dict`, or bare)."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        raw = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{source}.checkpoint {path} holds objects other than tensors; if the file is trusted, "
                         f"set {source}.trust_pickle=true.") from error
    state = raw.get("model_state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not all(isinstance(value, Tensor) for value in state.values()):
        raise ValueError(f"{source}.checkpoint {path} is not a state dict nor a dict with 'model_state_dict'.")
    # Checkpoints written from `nn.DataParallel` prefix every key with `module.`.
    if all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return state


def _resolve_labels(labels: list[str] | str | None, source: str) -> list[str]:
    if isinstance(labels, str):
        if labels not in LABEL_SETS:
            raise ValueError(f"{source}.labels {labels!r} is not a known label list; expected a list of names or "
                             f"one of {sorted(LABEL_SETS)}.")
        return list(LABEL_SETS[labels])
    if not labels or len(set(labels)) != len(labels):
        raise ValueError(f"{source}.labels must be a non-empty list of distinct class names (head order); "
                         f"got {labels}.")
    return list(labels)


def _import(class_path: str, source: str) -> Any:
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"{source}.class_path {class_path!r} cannot be imported ({error}).") from error


def _check_weights(model: nn.Module, state: dict[str, Tensor], path: Path, class_path: str, num_labels: int,
                   source: str) -> None:
    """`state` must have one head row (of the last linear layer) per label and exactly the model's keys and shapes."""
    linear_layers = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    head_weight = state.get(f"{linear_layers[-1]}.weight") if linear_layers else None
    if head_weight is not None and head_weight.shape[0] != num_labels:
        raise ValueError(f"{source}.checkpoint {path} has a head of {head_weight.shape[0]} classes but "
                         f"{source}.labels lists {num_labels}.")
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{key} {list(state[key].shape)} vs {list(expected[key].shape)}"
             for key in sorted(set(state) & set(expected)) if state[key].shape != expected[key].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{source}.checkpoint {path} does not fit {class_path} with init_args "
                         f"({source}.init_args): missing keys {missing[:5]}, unexpected keys {unexpected[:5]}, "
                         f"shapes (checkpoint vs model) {wrong[:5]}.")
