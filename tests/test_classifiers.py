"""Classifier loading: the published ViT-L/16 layout at full size, a tiny ViT against an independent forward (and
timm when importable), a class path + classifier folder with its own preprocessing, and the error sentences."""

from __future__ import annotations

import importlib.abc
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from saemnesia.classifiers import (
    UNLEARNCANVAS_STYLE_LABELS,
    ClassifierConfig,
    VisionTransformer,
    create_vit,
    load_classifier,
)
from saemnesia.concepts import UNLEARNCANVAS_STYLES

REPO = Path(__file__).resolve().parents[1]
TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4}


def timm_vit_large_layout(num_classes: int) -> dict[str, list[int]]:
    """Parameter names and shapes of timm's `vit_large_patch16_224` with a `num_classes` head, written out."""
    d, hidden = 1024, 4096
    layout = {"cls_token": [1, 1, d], "pos_embed": [1, 197, d], "patch_embed.proj.weight": [d, 3, 16, 16],
              "patch_embed.proj.bias": [d]}
    for i in range(24):
        shapes = {"norm1.weight": [d], "norm1.bias": [d], "attn.qkv.weight": [3 * d, d], "attn.qkv.bias": [3 * d],
                  "attn.proj.weight": [d, d], "attn.proj.bias": [d], "norm2.weight": [d], "norm2.bias": [d],
                  "mlp.fc1.weight": [hidden, d], "mlp.fc1.bias": [hidden], "mlp.fc2.weight": [d, hidden],
                  "mlp.fc2.bias": [d]}
        layout |= {f"blocks.{i}.{name}": shape for name, shape in shapes.items()}
    return layout | {"norm.weight": [d], "norm.bias": [d], "head.weight": [num_classes, d], "head.bias": [num_classes]}


def test_style_labels_are_the_alphabetical_51_list():
    assert list(UNLEARNCANVAS_STYLE_LABELS) == sorted([*UNLEARNCANVAS_STYLES, "Seed_Images"])
    rust = UNLEARNCANVAS_STYLE_LABELS.index("Rust")
    assert UNLEARNCANVAS_STYLE_LABELS[rust + 1:rust + 3] == ("Seed_Images", "Sketch")


def test_published_vit_large_checkpoint_loads_and_a_wrong_head_is_refused(tmp_path):
    # Every tensor of the checkpoint is one distinct constant, stored as an expanded 1-element tensor (a tiny file).
    layout = timm_vit_large_layout(51)
    state = {name: torch.full((1,), float(i)).expand(shape) for i, (name, shape) in enumerate(layout.items())}
    path = tmp_path / "style50.pth"
    torch.save({"epoch": 9, "model_state_dict": state}, path)

    # The classifier options of the published evaluation config, pointed at this checkpoint.
    options = yaml.safe_load((REPO / "configs/sd15_unlearncanvas/evaluate.yaml").read_text())["model"]["init_args"]
    classifier = load_classifier(ClassifierConfig(**{**options["style_classifier"], "checkpoint": str(path)}))
    loaded = classifier.model.state_dict()
    assert {name: list(tensor.shape) for name, tensor in loaded.items()} == layout
    assert all(bool((loaded[name] == i).all()) for i, name in enumerate(layout))
    assert classifier.labels == list(UNLEARNCANVAS_STYLE_LABELS)
    assert classifier.image_size == 224 and classifier.mean.flatten().tolist() == [0.5] * 3
    assert classifier.std.flatten().tolist() == [0.5] * 3

    with pytest.raises(ValueError, match=r"style50.pth has a head of 51 classes but model.object_classifier.labels "
                                         r"lists 20\."):
        load_classifier(ClassifierConfig(**{**options["object_classifier"], "checkpoint": str(path)}),
                        "model.object_classifier")


def randomized(model: nn.Module) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(tensor.shape, generator=generator) * 0.3 for name, tensor in model.state_dict().items()}


def reference_vit(state: dict[str, torch.Tensor], images: torch.Tensor, num_heads: int) -> torch.Tensor:
    """float64 ViT forward written independently: conv patches, `nn.MultiheadAttention`, functional LayerNorm/GELU."""
    state = {name: tensor.double() for name, tensor in state.items()}
    dim = state["cls_token"].shape[-1]
    x = F.conv2d((images.double() / 255 - 0.5) / 0.5, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"],
                 stride=state["patch_embed.proj.weight"].shape[-1])  # [B, d, h, w]
    x = torch.cat([state["cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1) + state["pos_embed"]
    depth = len({name.split(".")[1] for name in state if name.startswith("blocks.")})
    for i in range(depth):
        p = {name.removeprefix(f"blocks.{i}."): tensor for name, tensor in state.items()
             if name.startswith(f"blocks.{i}.")}
        attention = nn.MultiheadAttention(dim, num_heads, batch_first=True, dtype=torch.float64)
        attention.load_state_dict({"in_proj_weight": p["attn.qkv.weight"], "in_proj_bias": p["attn.qkv.bias"],
                                   "out_proj.weight": p["attn.proj.weight"], "out_proj.bias": p["attn.proj.bias"]})
        h = F.layer_norm(x, (dim,), p["norm1.weight"], p["norm1.bias"], eps=1e-6)
        x = x + attention(h, h, h, need_weights=False)[0]
        h = F.layer_norm(x, (dim,), p["norm2.weight"], p["norm2.bias"], eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"],
                         p["mlp.fc2.bias"])
    x = F.layer_norm(x, (dim,), state["norm.weight"], state["norm.bias"], eps=1e-6)
    return F.linear(x[:, 0], state["head.weight"], state["head.bias"])


def test_tiny_vit_from_the_published_layout_matches_an_independent_forward(tmp_path):
    state = randomized(VisionTransformer(3, **TINY_VIT))
    torch.save({"model_state_dict": state}, tmp_path / "tiny.pth")
    classifier = load_classifier(ClassifierConfig(checkpoint=str(tmp_path / "tiny.pth"), labels=["a", "b", "c"],
                                                  init_args=TINY_VIT, image_size=32))
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        logits = classifier(images)
    torch.testing.assert_close(logits.double(), reference_vit(state, images, TINY_VIT["num_heads"]),
                               rtol=1e-4, atol=1e-4)


class BrokenTimm(importlib.abc.MetaPathFinder):
    """Imports of timm fail as they do when its torchvision was built for another torch."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name.split(".")[0] == "timm":
            raise RuntimeError("operator torchvision::nms does not exist")


def test_a_timm_that_fails_to_import_leaves_our_vit(monkeypatch):
    for name in [name for name in sys.modules if name.split(".")[0] == "timm"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [BrokenTimm(), *sys.meta_path])
    with pytest.warns(UserWarning, match=r"timm could not be imported \(operator torchvision::nms does not exist\): "
                                         "its torchvision does not match torch"):
        model = create_vit(5, **TINY_VIT)
    assert type(model) is VisionTransformer and model.head.out_features == 5


def test_our_vit_equals_timm_when_timm_is_installed():
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    ours = VisionTransformer(5, **TINY_VIT).eval()
    theirs = timm_vit.VisionTransformer(num_classes=5, **TINY_VIT).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    state = randomized(ours)
    ours.load_state_dict(state)
    theirs.load_state_dict(state)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), theirs(images))


def test_resizing_is_within_one_grey_level_of_pil_bilinear():
    # The reference preprocessing resizes the PIL image (bilinear, uint8); ours resizes tensors.
    pixels = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    pil = np.asarray(Image.fromarray(pixels).resize((224, 224), Image.BILINEAR)).astype(np.float64)
    ours = F.interpolate(torch.from_numpy(pixels).permute(2, 0, 1)[None].float(), size=(224, 224), mode="bilinear",
                         antialias=True)[0].permute(1, 2, 0).double().numpy()
    assert np.abs(pil - ours).max() <= 1.0


class TinyCNN(nn.Module):
    """A stand-in for the ToyCanvas CNNs: one conv, global pooling, a linear head."""

    def __init__(self, num_classes: int, width: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.conv(images)).mean(dim=(2, 3)))


def write_folder(folder: Path, model: nn.Module, **description) -> None:
    folder.mkdir(parents=True)
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    (folder / "classifier.json").write_text(json.dumps({"class_path": "test_classifiers.TinyCNN", **description}))


def test_classifier_folder_applies_its_own_preprocessing(tmp_path):
    model = TinyCNN(3, width=6).eval()
    write_folder(tmp_path / "cnn", model, init_args={"num_classes": 3, "width": 6}, labels=["x", "y", "z"],
                 image_size=8, mean=[0.1, 0.2, 0.3], std=[0.5, 0.25, 2.0])
    classifier = load_classifier(ClassifierConfig(checkpoint=str(tmp_path / "cnn")))
    assert classifier.labels == ["x", "y", "z"]
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    expected = model.double()((images.double() / 255 - torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1))
                              / torch.tensor([0.5, 0.25, 2.0]).view(3, 1, 1))
    with torch.no_grad():
        torch.testing.assert_close(classifier(images).double(), expected, rtol=1e-5, atol=1e-5)
        # A uniform image resized from 16 to 8 pixels stays uniform, so it must score as its 8-pixel twin (the conv's
        # zero padding would tell the sizes apart without the resize).
        uniform = torch.full((1, 3, 16, 16), 200, dtype=torch.uint8)
        torch.testing.assert_close(classifier(uniform), classifier(uniform[..., :8, :8]))
        assert not torch.allclose(classifier.model(uniform.float() / 255), classifier.model(uniform[..., :8, :8] / 255))

    # Without preprocessing keys a folder feeds [0, 1] images at their own size (what the ToyCanvas CNNs take).
    write_folder(tmp_path / "plain", model, init_args={"width": 6}, labels=["x", "y", "z"])
    plain = load_classifier(ClassifierConfig(checkpoint=str(tmp_path / "plain")))
    with torch.no_grad():
        torch.testing.assert_close(plain(uniform).double(), model(uniform.double() / 255), rtol=1e-5, atol=1e-5)


def test_bad_classifier_options_fail_with_one_sentence(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model.style_classifier.checkpoint .*nowhere does not exist"):
        load_classifier(ClassifierConfig(checkpoint=str(tmp_path / "nowhere")), "model.style_classifier")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"folder .*empty has no classifier.json"):
        load_classifier(ClassifierConfig(checkpoint=str(tmp_path / "empty")))
    write_folder(tmp_path / "cnn", TinyCNN(3), init_args={"num_classes": 3}, labels=["x", "y", "z"])
    with pytest.raises(ValueError, match=r"labels 'imagenet' is not a known label list"):
        load_classifier(ClassifierConfig(checkpoint=str(tmp_path / "cnn"), labels="imagenet"))
    with pytest.raises(ValueError, match=r"does not fit test_classifiers.TinyCNN .*conv.weight \[4, 3, 3, 3\] vs "
                                         r"\[8, 3, 3, 3\]"):
        load_classifier(ClassifierConfig(checkpoint=str(tmp_path / "cnn"), init_args={"width": 8}))
    torch.save({"model_state_dict": TinyCNN(3).state_dict(), "config": Path("x")}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match=r"holds objects other than tensors; if the file is trusted, set "
                                         r"classifier.trust_pickle=true\."):
        load_classifier(ClassifierConfig(checkpoint=str(tmp_path / "pickled.pth"), labels=["x", "y", "z"],
                                         class_path="test_classifiers.TinyCNN"))
