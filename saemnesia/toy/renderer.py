"""Render ToyCanvas images: a shape (the object) at a random place, size and rotation, painted in a style.

Everything is drawn at `SUPERSAMPLE`× the image size with hard masks and averaged down, which anti-aliases
shapes, strokes and textures alike. A batch is rendered at once with tensor operations; each image is a
function of its own (object, style, geometry) only, and the geometry of a seed is fixed
(`sample_geometry`), so a (object, style, seed) triple always gives the same pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from saemnesia.concepts import NO_STYLE
from saemnesia.toy.vocabulary import TOY_OBJECTS, TOY_STYLES

SUPERSAMPLE = 4
"""Sub-pixels per pixel side used for anti-aliasing."""
SCALE_RANGE = (0.45, 0.72)
"""Shape radius as a fraction of half the image side (7 to 11.5 px at 32 px)."""
MAX_TILT = math.pi / 6
"""Largest rotation either way from upright (30°). Shapes stand roughly upright, as photographed objects do:
under any rotation, a 7-px Square and Heart differ by a few pixels, and the classifier called 8 of the 72 Squares
that a model trained for an hour drew (8 seeds) Hearts."""

BLOB_FIELD = 5
"""Side of the uniform random field that `render_blobs` upsamples: blobs are about a fifth of the image wide."""
BLOB_COVERAGE = (0.0, 0.35)
"""Range of the fraction of the image that a no-object image's blobs cover (`render_blobs`); a shape covers
~10–30 %."""

RGB = tuple[float, float, float]


class Geometry(NamedTuple):
    """Placement of one shape per image."""

    center: Tensor
    """`[B, 2]` (x, y) in half-image units, `[-1, 1]`, x to the right and y down."""
    scale: Tensor
    """`[B]` shape radius in half-image units."""
    angle: Tensor
    """`[B]` rotation in radians, in `[-MAX_TILT, MAX_TILT]`."""


def sample_geometry(seeds: Sequence[int]) -> Geometry:
    """The placement drawn from each seed: scale in `SCALE_RANGE`, a tilt within `MAX_TILT`, the shape inside the
    image."""
    draws = [np.random.default_rng(seed).random(4) for seed in seeds]
    draws = torch.tensor(np.array(draws).reshape(len(seeds), 4), dtype=torch.float32)  # [B, 4] uniforms
    low, high = SCALE_RANGE
    scale = low + (high - low) * draws[:, 0]
    # 0.9 keeps the widest shapes (radius ≈ 1 unit) a little away from the border.
    center = (2 * draws[:, 1:3] - 1) * 0.9 * (1 - scale[:, None])
    return Geometry(center=center, scale=scale, angle=MAX_TILT * (2 * draws[:, 3] - 1))


# -- shapes: masks in the shape's own frame, radius ≈ 1 -------------------------------------------------------
def _star(u: Tensor, v: Tensor, points: int = 5, inner: float = 0.45) -> Tensor:
    """A star polygon with outer radius 1: the boundary radius at the folded polar angle is a straight edge
    from an outer vertex (angle 0) to an inner one (angle π/points)."""
    half_sector = math.pi / points
    folded = torch.remainder(torch.atan2(v, u) + half_sector, 2 * half_sector) - half_sector
    folded = folded.abs()  # [B, S, S] in [0, π/points]
    edge_x, edge_y = inner * math.cos(half_sector) - 1, inner * math.sin(half_sector)  # outer → inner vertex
    boundary = edge_y / (folded.cos() * edge_y - folded.sin() * edge_x)  # ray/edge intersection, cross products
    return u.square() + v.square() <= boundary.square()


def _triangle(u: Tensor, v: Tensor) -> Tensor:
    """Equilateral, circumradius 1.1: inside all three edges with outward normals 120° apart."""
    inside = torch.ones_like(u, dtype=torch.bool)
    for k in range(3):
        normal = math.pi / 2 + 2 * math.pi * k / 3
        inside &= u * math.cos(normal) + v * math.sin(normal) <= 0.55
    return inside


def _heart(u: Tensor, v: Tensor) -> Tensor:
    """The quartic heart curve, scaled and centred to fit a radius-1 disc."""
    x, y = 1.15 * u, -1.15 * v + 0.15  # the curve points up for y up; images have y down
    return (x.square() + y.square() - 1) ** 3 - x.square() * y**3 <= 0


SHAPES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Circle": lambda u, v: u.square() + v.square() <= 0.85**2,
    "Square": lambda u, v: torch.maximum(u.abs(), v.abs()) <= 0.72,
    "Triangle": _triangle,
    "Star": _star,
    "Cross": lambda u, v: ((u.abs() <= 0.3) & (v.abs() <= 0.9)) | ((v.abs() <= 0.3) & (u.abs() <= 0.9)),
    "Heart": _heart,
    "Moon": lambda u, v: (u.square() + v.square() <= 0.9**2) & ((u - 0.42).square() + v.square() > 0.72**2),
    "Ring": lambda u, v: (u.square() + v.square() <= 0.9**2) & (u.square() + v.square() >= 0.5**2),
}
"""Mask of each object in its own frame (`u`, `v`: `[B, S, S]` coordinates in shape radii), in `TOY_OBJECTS` order."""


# -- styles ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pattern:
    """A two-colour texture; lengths are pixels of a 32-px image (textures scale with the image size)."""

    kind: Literal["flat", "gradient", "stripes", "dots", "checker", "grid", "hatch"] = "flat"
    """flat: first colour only; gradient: top to bottom; stripes: horizontal bands; dots: a lattice of discs;
    checker: squares; grid: thin lines both ways; hatch: thin diagonal lines."""
    period: float = 4.0
    """Repeat distance of the texture in pixels (checker: the side of one square)."""
    width: float = 1.0
    """Line width (grid, hatch) or disc radius (dots) in pixels."""

    def weight(self, x: Tensor, y: Tensor) -> Tensor:
        """How much of the second colour each sub-pixel takes, `[S, S]` in [0, 1]; `x`, `y` in 32-px pixels."""
        if self.kind == "flat":
            return torch.zeros_like(x)
        if self.kind == "gradient":
            return y / 32
        wrapped_x, wrapped_y = torch.remainder(x, self.period), torch.remainder(y, self.period)
        if self.kind == "stripes":
            return (wrapped_y < self.period / 2).float()
        if self.kind == "dots":
            offset_x, offset_y = wrapped_x - self.period / 2, wrapped_y - self.period / 2
            return (offset_x.square() + offset_y.square() <= self.width**2).float()
        if self.kind == "checker":
            return torch.remainder(torch.floor(x / self.period) + torch.floor(y / self.period), 2)
        if self.kind == "grid":
            return ((wrapped_x < self.width) | (wrapped_y < self.width)).float()
        return (torch.remainder(x + y, self.period) < self.width * math.sqrt(2)).float()  # hatch


@dataclass(frozen=True)
class StyleSpec:
    """How one style paints the background, the shape's inside and its stroke."""

    background: tuple[RGB, RGB]
    """The two background colours mixed by `background_pattern`."""
    fill: tuple[RGB, RGB]
    """The two colours inside the shape, mixed by `fill_pattern`. Every style fills its shapes: an outline alone
    on a textured background (an earlier Blueprint) was the style the model drew worst (81 % of objects right)."""
    background_pattern: Pattern = Pattern()
    """Texture mixing the two background colours (flat: the first only)."""
    fill_pattern: Pattern = Pattern()
    """Texture mixing the two fill colours (flat: the first only)."""
    outline: RGB | None = None
    """Stroke colour along the inside of the shape's edge; `None` for no stroke."""
    outline_width: float = 1.0
    """Stroke width in pixels (at 32 px)."""


STYLES: dict[str, StyleSpec] = {
    "Pop_Art": StyleSpec(background=((1.0, 0.85, 0.1),) * 2, fill=((0.9, 0.1, 0.1), (1.0, 1.0, 1.0)),
                         fill_pattern=Pattern("dots", period=5, width=1.3), outline=(0.0, 0.0, 0.0)),
    "Blueprint": StyleSpec(background=((0.08, 0.15, 0.45), (0.35, 0.5, 0.85)), fill=((0.2, 0.33, 0.7),) * 2,
                           background_pattern=Pattern("grid", period=8, width=1), outline=(1.0, 1.0, 1.0),
                           outline_width=1.5),
    "Sunset": StyleSpec(background=((1.0, 0.65, 0.2), (0.75, 0.15, 0.5)), fill=((0.18, 0.05, 0.22),) * 2,
                        background_pattern=Pattern("gradient")),
    "Greenfield": StyleSpec(background=((0.65, 0.88, 0.45),) * 2, fill=((0.1, 0.4, 0.15), (1.0, 0.95, 0.55)),
                            fill_pattern=Pattern("stripes", period=4), outline=(0.1, 0.4, 0.15)),
    "Mosaic": StyleSpec(background=((0.0, 0.45, 0.5),) * 2, fill=((1.0, 0.55, 0.1), (1.0, 1.0, 1.0)),
                        fill_pattern=Pattern("checker", period=4)),
    "Ink_Art": StyleSpec(background=((0.96, 0.93, 0.82),) * 2, fill=((0.96, 0.93, 0.82), (0.05, 0.05, 0.05)),
                         fill_pattern=Pattern("hatch", period=4, width=1), outline=(0.05, 0.05, 0.05)),
    "Neon": StyleSpec(background=((0.05, 0.02, 0.1),) * 2, fill=((0.5, 0.0, 0.45),) * 2, outline=(0.1, 1.0, 0.95),
                      outline_width=2.0),
    "Pastel": StyleSpec(background=((1.0, 0.82, 0.88), (1.0, 1.0, 1.0)), fill=((0.72, 0.62, 0.95),) * 2,
                        background_pattern=Pattern("dots", period=8, width=1.5)),
}
"""Every style, in `TOY_STYLES` order (the renderer addresses both tables by index)."""

PLAIN = StyleSpec(background=((0.9, 0.9, 0.9),) * 2, fill=((0.3, 0.3, 0.3),) * 2)
"""The rendering of a prompt without style: a flat grey shape on a light grey background."""

def _mix(colours: tuple[RGB, RGB], weight: Tensor) -> Tensor:
    """`[3, S, S]` colour field: the first colour where `weight` is 0, the second where it is 1."""
    first, second = (torch.tensor(colour).view(3, 1, 1) for colour in colours)
    return first + (second - first) * weight


def _erode(mask: Tensor, radius: int) -> Tensor:
    """Shrink `[B, S, S]` boolean masks by `radius` sub-pixels (square structuring element, separable)."""
    outside = (~mask).float()[:, None]  # [B, 1, S, S]
    size = 2 * radius + 1
    outside = F.max_pool2d(outside, (1, size), stride=1, padding=(0, radius))
    outside = F.max_pool2d(outside, (size, 1), stride=1, padding=(radius, 0))
    return outside[:, 0] == 0


def _paint(style: StyleSpec, mask: Tensor, x: Tensor, y: Tensor, image_size: int) -> Tensor:
    """`[B, 3, S, S]` sub-pixel colours of shapes `mask` `[B, S, S]` in one style."""
    image = _mix(style.background, style.background_pattern.weight(x, y)).expand(len(mask), -1, -1, -1)
    inside = _mix(style.fill, style.fill_pattern.weight(x, y))  # [3, S, S]
    image = torch.where(mask[:, None], inside, image)
    if style.outline is not None:
        radius = max(1, round(style.outline_width * SUPERSAMPLE * image_size / 32))
        stroke = mask & ~_erode(mask, radius)
        image = torch.where(stroke[:, None], torch.tensor(style.outline).view(3, 1, 1), image)
    return image


def _subpixels(image_size: int) -> tuple[Tensor, Tensor]:
    """`(x, y)` `[S, S]`: sub-pixel centres in 32-px pixels, S = `image_size · SUPERSAMPLE`."""
    side = image_size * SUPERSAMPLE
    pixels = (torch.arange(side, dtype=torch.float32) + 0.5) * (32 / side)
    y, x = torch.meshgrid(pixels, pixels, indexing="ij")
    return x, y


def _check_styles(styles: Tensor, caller: str) -> None:
    if not (((0 <= styles) & (styles < len(TOY_STYLES))) | (styles == NO_STYLE)).all():
        raise ValueError(f"{caller} got style indices {styles.tolist()}; expected 0..{len(TOY_STYLES) - 1} or "
                         f"{NO_STYLE} (plain).")


def _paint_masks(mask: Tensor, styles: Tensor, x: Tensor, y: Tensor, image_size: int) -> Tensor:
    """Images `[B, 3, image_size, image_size]` of sub-pixel masks `[B, S, S]` painted in `styles` `[B]`; `x`, `y` are
    `_subpixels(image_size)`."""
    image = torch.empty(len(mask), 3, *mask.shape[1:])
    for index, style in [(NO_STYLE, PLAIN), *enumerate(STYLES.values())]:
        chosen = styles == index
        if chosen.any():
            image[chosen] = _paint(style, mask[chosen], x, y, image_size)
    return F.avg_pool2d(image, SUPERSAMPLE)  # [B, 3, image_size, image_size]


def render(objects: Tensor, styles: Tensor, geometry: Geometry, image_size: int = 32) -> Tensor:
    """Images `[B, 3, image_size, image_size]` in [0, 1] of shapes `objects` `[B]` (indices into `TOY_OBJECTS`)
    in `styles` `[B]` (indices into `TOY_STYLES`, `NO_STYLE` for plain) placed by `geometry`."""
    objects, styles = torch.as_tensor(objects).long(), torch.as_tensor(styles).long()
    if not ((0 <= objects) & (objects < len(TOY_OBJECTS))).all():
        raise ValueError(f"render got object indices {objects.tolist()}; expected 0..{len(TOY_OBJECTS) - 1}.")
    _check_styles(styles, "render")
    x, y = _subpixels(image_size)
    # Into each shape's frame: translate, rotate by -angle, divide by the radius.
    dx = x / 16 - 1 - geometry.center[:, 0, None, None]  # [B, S, S] in half-image units
    dy = y / 16 - 1 - geometry.center[:, 1, None, None]
    cos, sin = geometry.angle.cos()[:, None, None], geometry.angle.sin()[:, None, None]
    radius = geometry.scale[:, None, None]
    u, v = (cos * dx + sin * dy) / radius, (cos * dy - sin * dx) / radius  # [B, S, S]

    mask = torch.zeros(len(objects), *x.shape, dtype=torch.bool)
    for index, shape in enumerate(SHAPES.values()):
        chosen = objects == index
        if chosen.any():
            mask[chosen] = shape(u[chosen], v[chosen])
    return _paint_masks(mask, styles, x, y, image_size)


def render_seeds(objects: Sequence[int], styles: Sequence[int], seeds: Sequence[int], image_size: int = 32) -> Tensor:
    """`render` with the geometry of each seed (`sample_geometry`)."""
    return render(torch.tensor(objects), torch.tensor(styles), sample_geometry(seeds), image_size)


def render_blobs(styles: Sequence[int], seeds: Sequence[int], image_size: int = 32) -> Tensor:
    """Images with no object, `[B, 3, image_size, image_size]`: smooth random blobs (a uniform random field upsampled
    bicubically, kept above the quantile that leaves a random `BLOB_COVERAGE` of the image) painted in `styles` like
    a shape, empty canvases included. They teach the object classifier what a failed drawing looks like: trained
    on shapes alone, it named every image of random noise "Cross" (64 of 64), so erasing Cross looked like failing."""
    styles = torch.as_tensor(styles).long()
    _check_styles(styles, "render_blobs")
    x, y = _subpixels(image_size)
    draws = np.array([np.random.default_rng(seed).random(BLOB_FIELD**2 + 1) for seed in seeds])  # field, coverage
    draws = draws.reshape(len(seeds), BLOB_FIELD**2 + 1)  # [B, BLOB_FIELD² + 1], float64
    fields = torch.tensor(draws[:, :-1], dtype=torch.float32).view(-1, 1, BLOB_FIELD, BLOB_FIELD)  # [B, 1, F, F]
    fields = F.interpolate(fields, size=x.shape, mode="bicubic", align_corners=True)[:, 0]  # [B, S, S]
    low, high = BLOB_COVERAGE
    coverage = torch.tensor(low + (high - low) * draws[:, -1], dtype=torch.float32)  # [B], scaled in float64
    flat = fields.flatten(1)  # [B, S²]
    ranks = ((1 - coverage) * (flat.shape[1] - 1)).round().long()  # the value that `coverage` of the field exceeds
    thresholds = flat.sort(dim=1).values.gather(1, ranks[:, None])  # [B, 1]
    return _paint_masks(fields > thresholds[:, :, None], styles, x, y, image_size)
