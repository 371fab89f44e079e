"""The concept vocabulary: objects, styles and the "no style" (plain) case.

A sample is labelled by one object and at most one style. Concepts are addressed by name everywhere on
disk (shards, statistics, `concept_latents.json`); integer indices exist only inside a batch.
The module also binds each concept to one SAE latent (docs/method.md §2.2) and reads/writes that binding.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from saemnesia.io import atomic_write_text

NO_STYLE = -1
"""Style index of a plain prompt ("An image of {object}."), which has no style latent."""

NO_ERASURE = "none"
"""Target label of the images generated without erasure (the reference): an unlearning run's folder name."""


@dataclass(frozen=True)
class ConceptVocabulary:
    """Ordered object and style names; objects come first in the flat concept order."""

    objects: tuple[str, ...]
    """Object (class) names, e.g. `("Bears", "Cats", ...)`."""
    styles: tuple[str, ...] = field(default=())
    """Style names, e.g. `("Cubism", "Van_Gogh", ...)`; empty for an objects-only vocabulary."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        object.__setattr__(self, "styles", tuple(self.styles))
        names = self.concepts
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"Concept names must be unique across objects and styles; repeated: {duplicates}.")

    @property
    def concepts(self) -> list[str]:
        """All concept names, objects first then styles."""
        return [*self.objects, *self.styles]

    def object_index(self, name: str) -> int:
        if name not in self.objects:
            raise KeyError(f"Unknown object {name!r}; expected one of {list(self.objects)}.")
        return self.objects.index(name)

    def style_index(self, name: str | None) -> int:
        """Index of a style, or `NO_STYLE` for `None` (a plain prompt)."""
        if name is None:
            return NO_STYLE
        if name not in self.styles:
            raise KeyError(f"Unknown style {name!r}; expected one of {list(self.styles)} or null (plain).")
        return self.styles.index(name)

    def to_dict(self) -> dict[str, list[str]]:
        return {"objects": list(self.objects), "styles": list(self.styles)}

    @classmethod
    def from_dict(cls, data: dict[str, list[str]]) -> ConceptVocabulary:
        return cls(data["objects"], data.get("styles", ()))


UNLEARNCANVAS_OBJECTS = (
    "Architectures Bears Birds Butterfly Cats Dogs Fishes Flame Flowers Frogs Horses Human "
    "Jellyfish Rabbits Sandwiches Sea Statues Towers Trees Waterfalls"
).split()
"""The 20 UnlearnCanvas object classes (docs/method.md §6), in classifier head order."""

UNLEARNCANVAS_STYLES = (
    "Abstractionism Artist_Sketch Blossom_Season Bricks Byzantine Cartoon Cold_Warm Color_Fantasy "
    "Comic_Etch Crayon Cubism Dadaism Dapple Defoliation Early_Autumn Expressionism Fauvism French "
    "Glowing_Sunset Gorgeous_Love Greenfield Impressionism Ink_Art Joy Liquid_Dreams Magic_Cube "
    "Meta_Physics Meteor_Shower Monet Mosaic Neon_Lines On_Fire Pastel Pencil_Drawing Picasso Pop_Art "
    "Red_Blue_Ink Rust Sketch Sponge_Dabbed Structuralism Superstring Surrealism Ukiyoe Van_Gogh "
    "Vibrant_Flow Warm_Love Warm_Smear Watercolor Winter"
).split()
"""The 50 UnlearnCanvas styles (docs/method.md §6). `Seed_Images` (photo-like), the style classifier's 51st label, is
a style only of the published caching's vocabulary (`unlearncanvas_seed_images`)."""

UNLEARNCANVAS = ConceptVocabulary(UNLEARNCANVAS_OBJECTS, UNLEARNCANVAS_STYLES)


def assign_latents(scores: Tensor, vocabulary: ConceptVocabulary) -> dict[str, int]:
    """Bind each concept to one latent (docs/method.md §2.2), greedily and never twice.

    `scores` is `[C, L]`, rows in `vocabulary.concepts` order: the step-averaged importance `ā_c` of the starting
    SAE. Concepts are served in descending `max_j ā_c[j]`, objects before styles (their key gets +1, the reference
    priority), and each takes the unassigned latent it scores highest. The result follows the vocabulary order.
    """
    concepts = vocabulary.concepts
    if scores.ndim != 2 or scores.shape[0] != len(concepts):
        raise ValueError(f"assign_latents expects scores of shape [{len(concepts)} concepts, latents]; got "
                         f"{tuple(scores.shape)}.")
    if scores.shape[1] < len(concepts):
        raise ValueError(f"Cannot give {len(concepts)} concepts distinct latents with only {scores.shape[1]} latents.")
    if not scores.isfinite().all():
        raise ValueError("assign_latents got NaN or infinite importance scores; recompute the concept statistics.")
    scores = scores.detach().to("cpu", torch.float64)
    is_object = torch.arange(len(concepts)) < len(vocabulary.objects)
    priority = scores.amax(dim=1) + is_object.to(torch.float64)  # [C]
    # A stable sort keeps vocabulary order among equal priorities, so the assignment is reproducible.
    order = torch.sort(priority, descending=True, stable=True).indices.tolist()
    taken = torch.zeros(scores.shape[1], dtype=torch.bool)
    chosen: dict[int, int] = {}
    for concept in order:
        latent = int(scores[concept].masked_fill(taken, -torch.inf).argmax())
        taken[latent] = True
        chosen[concept] = latent
    return {concepts[c]: chosen[c] for c in range(len(concepts))}


def check_concept_latents(mapping: dict[str, int], source: str, vocabulary: ConceptVocabulary | None = None,
                          num_latents: int | None = None) -> None:
    """Raise a ValueError naming `source` unless `mapping` gives concepts distinct, in-range latents.

    With a `vocabulary`, the names must be exactly its concepts; with `num_latents`, indices must lie in
    `[0, num_latents)`.
    """
    if not isinstance(mapping, dict) or not all(isinstance(name, str) and type(latent) is int
                                                for name, latent in mapping.items()):  # bool is no index
        raise ValueError(f'{source} must map concept names to integer latent indices, e.g. {{"Bears": 17}}.')
    if vocabulary is not None:
        missing = [name for name in vocabulary.concepts if name not in mapping]
        unknown = [name for name in mapping if name not in vocabulary.concepts]
        if missing or unknown:
            raise ValueError(f"{source} must give a latent to exactly the vocabulary's concepts; missing {missing}, "
                             f"unknown {unknown}.")
    latents = list(mapping.values())
    repeated = sorted({latent for latent in latents if latents.count(latent) > 1})
    if repeated:
        raise ValueError(f"{source} binds several concepts to the same latents {repeated}; each needs its own.")
    if num_latents is not None:
        outside = {name: latent for name, latent in mapping.items() if not 0 <= latent < num_latents}
        if outside:
            raise ValueError(f"{source} has latent indices outside [0, {num_latents}): {outside}.")


def save_concept_latents(path: str | os.PathLike, mapping: dict[str, int]) -> None:
    """Write `concept_latents.json` (`{concept: latent_index}`) atomically."""
    check_concept_latents(mapping, source="The concept→latent mapping to save")
    atomic_write_text(path, json.dumps(mapping, indent=2) + "\n")


def load_concept_latents(path: str | os.PathLike, vocabulary: ConceptVocabulary | None = None,
                         num_latents: int | None = None) -> dict[str, int]:
    """Read `concept_latents.json`, checked against `vocabulary` and `num_latents` when given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Concept→latent file {path} does not exist.")
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}).") from error
    check_concept_latents(mapping, source=str(path), vocabulary=vocabulary, num_latents=num_latents)
    return mapping


def styled_prompt(subject: str, style: str | None) -> str:
    """`"{subject} in {Style with spaces} style."`, or `"{subject}."` for a plain prompt (`style=None`)."""
    return f"{subject}." if style is None else f"{subject} in {style.replace('_', ' ')} style."
