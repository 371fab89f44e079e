"""Per-concept statistics of SAE codes, importance scores and latent selection (docs/method.md §3, §7).

`ConceptStats` holds, for each concept c and sampling step t, the mean over c's images of the spatially
averaged TopK code, `means[c, t] = μ_c[t]`, and how many images each mean covers. Everything the
intervention needs is derived from these means; the reference stored every image instead.

On disk the statistics are ONE `.safetensors` file: tensors `means` `[C, T, L]` (float32) and `counts` `[C]`
(int64); its header metadata holds `format`, `concepts` (a JSON list, row order of the tensors) and
`metadata` (a JSON object, e.g. hookpoint and SAE path). The published pickle format is read and written
by `from_reference` / `to_reference`.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from saemnesia.hub import local_path
from saemnesia.io import atomic_write_bytes

FORMAT = "saemnesia.concept_stats.v1"
"""Value of the `format` header key that marks a file written by `ConceptStats.save`."""

NORMALISATION_EPS = 1e-8
"""Added to each mean's latent sum before normalising (docs/method.md §3.2)."""

QUANTILE_MAX_NUMEL = 2**24
"""`torch.quantile` refuses inputs with more elements than this, so larger batches are split."""

REFERENCE_SUFFIX = ".pkl"
"""Statistics files with this suffix are the published pickle (`ConceptStats.from_reference`)."""


def concept_index(concepts: Sequence[str], name: str, owner: str = "the statistics") -> int:
    """Row of `name` in `concepts`, or a ValueError listing the known concepts (of `owner`, as named in it)."""
    if name not in concepts:
        raise ValueError(f"Unknown concept {name!r}; {owner} cover {list(concepts)}.")
    return list(concepts).index(name)


def above_quantile(scores: Tensor, percentile: float) -> Tensor:
    """Mask `[..., L]` of scores strictly above their row's `percentile`-th quantile (docs/method.md §3.3).

    Thresholds are `torch.quantile` with linear interpolation, computed on chunks of rows small enough
    for its input-size limit, so any number of rows gives the same answer as one call per row. The percentile
    is validated where it is read (`validate_class_params`, the options of `ErasureConfig` and `binding`).
    """
    rows = scores.reshape(-1, scores.shape[-1])  # [R, L]
    rows_per_chunk = max(1, QUANTILE_MAX_NUMEL // rows.shape[1])
    thresholds = torch.cat(
        [torch.quantile(chunk, percentile / 100, dim=1, keepdim=True) for chunk in rows.split(rows_per_chunk)]
    )  # [R, 1]
    return (rows > thresholds).reshape(scores.shape)  # [..., L]


def _normalise(means: Tensor) -> Tensor:
    """Each mean code divided by its latent sum, `μ / (Σ_j μ_j + ε)`."""
    return means / (means.sum(dim=-1, keepdim=True) + NORMALISATION_EPS)


@dataclass(eq=False)
class ConceptStats:
    """Mean SAE code per concept and sampling step, with the number of images behind each mean."""

    concepts: list[str]
    """Concept names, the row order of `means` and `counts`."""
    means: Tensor
    """`[C, T, L]` float32: `μ_c[t]`, the mean over c's images of the token-averaged TopK code at step t."""
    counts: Tensor
    """`[C]` int64: number of images of each concept (each contributes once to every step)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """JSON-serialisable provenance, e.g. `{"hookpoint": ..., "sae": ...}`; saved with the statistics."""
    source: str | None = None
    """The file they were read from (not saved): their errors name it."""

    def __post_init__(self) -> None:
        self.concepts = [str(name) for name in self.concepts]
        self.means = self.means.to(torch.float32)
        self.counts = self.counts.to(torch.int64)
        if self.means.ndim != 3:
            raise ValueError(f"ConceptStats.means must be [concepts, steps, latents]; got {tuple(self.means.shape)}.")
        if not len(self.concepts) == self.means.shape[0] == self.counts.numel():
            raise ValueError(
                f"ConceptStats needs one row per concept: {len(self.concepts)} names, {self.means.shape[0]} means "
                f"and {self.counts.numel()} counts."
            )
        repeated = sorted({name for name in self.concepts if self.concepts.count(name) > 1})
        if repeated:
            raise ValueError(f"ConceptStats concept names must be unique; repeated: {repeated}.")
        if (self.counts < 1).any():
            raise ValueError(f"Every concept needs at least one image; counts are {self.counts.tolist()}.")

    @property
    def num_steps(self) -> int:
        return self.means.shape[1]

    @property
    def num_latents(self) -> int:
        return self.means.shape[2]

    @property
    def from_source(self) -> str:
        """` <file>` after "statistics" in an error, or nothing for statistics made in memory."""
        return "" if self.source is None else f" {self.source}"

    def index(self, concept: str) -> int:
        return concept_index(self.concepts, concept, f"the statistics{self.from_source}")

    def importance(self, concept: str, step: int | None = None) -> Tensor:
        """Importance scores `s_c[t]` `[L]` at `step`, or `[T, L]` for every step when `step` is None."""
        if step is not None and not 0 <= step < self.num_steps:
            raise ValueError(f"Step {step} is outside the statistics' {self.num_steps} sampling steps.")
        scores = self._importance(torch.tensor([self.index(concept)]))[0]  # [T, L]
        return scores if step is None else scores[step]

    def importance_all(self) -> Tensor:
        """Importance scores of every concept, `[C, T, L]`."""
        return self._importance(torch.arange(len(self.concepts)))

    def _importance(self, rows: Tensor) -> Tensor:
        """docs/method.md §3.2 for the concepts at `rows` `[R]`: `[R, T, L]` float32, computed in float64.

        `μ_¬c` is the image-weighted mean of all other concepts, `(Σ_c' n_c' μ_c' − n_c μ_c) / (N − n_c)`.
        """
        if len(self.concepts) < 2:
            raise ValueError("Importance scores contrast a concept with the others; the statistics hold only one.")
        counts = self.counts.to(self.means.device, torch.float64)
        weighted_total = torch.zeros(self.means.shape[1:], dtype=torch.float64, device=self.means.device)  # [T, L]
        for concept_means, count in zip(self.means, counts):
            weighted_total += count * concept_means
        rows = rows.to(self.means.device)
        own = self.means[rows].to(torch.float64)  # [R, T, L]
        own_counts = counts[rows][:, None, None]  # [R, 1, 1]
        others = (weighted_total - own_counts * own) / (counts.sum() - own_counts)  # [R, T, L]
        return (_normalise(own) - _normalise(others)).to(torch.float32)

    def selection_mask(self, concept: str, percentile: float) -> Tensor:
        """`I_{c,t}` for every step at once, as a boolean mask `[T, L]`."""
        return above_quantile(self.importance(concept), percentile)

    def save(self, path: str | os.PathLike) -> None:
        """Write one safetensors file (layout in the module docstring), atomically."""
        header = {
            "format": FORMAT,
            "concepts": json.dumps(self.concepts),
            "metadata": json.dumps(self.metadata),
        }
        tensors = {"means": self.means.contiguous().cpu(), "counts": self.counts.contiguous().cpu()}
        atomic_write_bytes(path, safetensors_bytes(tensors, metadata=header))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ConceptStats:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Concept statistics file {path} does not exist.")
        try:
            with safe_open(path, framework="pt") as handle:
                header = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except SafetensorError as error:
            raise ValueError(
                f"{path} is not a safetensors file ({error}); read a reference pickle with ConceptStats.from_reference."
            ) from error
        if header.get("format") != FORMAT or set(tensors) != {"means", "counts"}:
            raise ValueError(f"{path} holds no saemnesia concept statistics (expected format {FORMAT!r}).")
        return cls(
            concepts=json.loads(header["concepts"]),
            means=tensors["means"],
            counts=tensors["counts"],
            metadata=json.loads(header["metadata"]),
            source=str(path),
        )

    @classmethod
    def read(cls, path: str | os.PathLike) -> ConceptStats:
        """Our statistics file (`load`), or the published pickle (`from_reference`) when the name ends in `.pkl`;
        either local or on the Hub (`hf://owner/repo[@revision]/path`)."""
        local = local_path(path)
        return cls.from_reference(local) if local.suffix == REFERENCE_SUFFIX else cls.load(local)

    @classmethod
    def from_reference(cls, pickle_path: str | os.PathLike) -> ConceptStats:
        """Import the published pickle `{concept: Tensor[n_images, T, L]}`: means over images, counts = n_images.

        The pickle is unpickled as is, so only open files from a source you trust.
        """
        path = Path(pickle_path)
        if not path.is_file():
            raise FileNotFoundError(f"Reference concept statistics {path} do not exist.")
        with path.open("rb") as handle:
            per_image = pickle.load(handle)
        if not isinstance(per_image, dict) or not per_image:
            raise ValueError(f"{path} must hold a non-empty dict {{concept: Tensor[n_images, T, L]}}.")
        means, counts = [], []
        for concept, codes in per_image.items():
            codes = torch.as_tensor(codes)
            if codes.ndim != 3 or codes.shape[0] == 0 or (means and codes.shape[1:] != means[0].shape):
                raise ValueError(
                    f"{path}: every concept must map to a [n_images ≥ 1, T, L] tensor of one common T and L; "
                    f"{concept!r} has shape {tuple(codes.shape)}."
                )
            means.append(codes.mean(dim=0, dtype=torch.float32))  # [T, L]
            counts.append(codes.shape[0])
        return cls(
            concepts=list(per_image),
            means=torch.stack(means),  # [C, T, L]
            counts=torch.tensor(counts),
            metadata={"reference": str(path)},
            source=str(path),
        )

    def to_reference(self, pickle_path: str | os.PathLike) -> None:
        """Export `{concept: Tensor[1, T, L]}` float16 as the published code reads it (a plain pickle)."""
        if self.counts.unique().numel() > 1:
            warnings.warn(
                f"Image counts differ between concepts ({self.counts.tolist()}) but the reference format keeps one "
                "mean per concept, so code reading it weighs every concept equally in μ_¬c.",
                stacklevel=2,
            )
        per_concept = {
            name: self.means[row].unsqueeze(0).to("cpu", torch.float16)  # [1, T, L]
            for row, name in enumerate(self.concepts)
        }
        atomic_write_bytes(pickle_path, pickle.dumps(per_concept))


class ConceptStatsAccumulator:
    """Streaming sums of token-averaged codes per (concept, step), turned into `ConceptStats` at the end.

    Memory is `O(C·T·L)` whatever the number of images. Updates arrive per (image, step), so images are
    counted per (concept, step); `finalize` checks that every step of a concept saw the same number of images
    and takes that as the concept's count.
    """

    def __init__(
        self, concepts: Sequence[str], num_steps: int, num_latents: int, device: torch.device | str = "cpu"
    ) -> None:
        self.concepts = list(concepts)
        self.sums = torch.zeros(len(self.concepts), num_steps, num_latents, dtype=torch.float64, device=device)
        """`[C, T, L]` float64: sums of token-averaged codes (float64 so long runs lose no precision)."""
        self.images = torch.zeros(len(self.concepts), num_steps, dtype=torch.int64, device=device)
        """`[C, T]`: images recorded per concept and step."""

    def concept_ids(self, names: Sequence[str]) -> Tensor:
        """Rows of `names` as a LongTensor `[B]`, failing on an unknown name."""
        return torch.tensor([concept_index(self.concepts, name) for name in names], device=self.sums.device)

    def update(self, concept_ids: Tensor, step: Tensor | int, codes_mean: Tensor) -> None:
        """Add a batch: image b of concept `concept_ids[b]` at `step` (`[B]` or an int) has mean `codes_mean[b]`."""
        num_concepts, num_steps, num_latents = self.sums.shape
        if codes_mean.ndim != 2 or codes_mean.shape[1] != num_latents:
            raise ValueError(f"codes_mean must be [batch, {num_latents} latents]; got {tuple(codes_mean.shape)}.")
        concept_ids = concept_ids.to(self.sums.device)
        step = torch.as_tensor(step, device=self.sums.device).expand_as(concept_ids)  # [B]
        if concept_ids.shape != codes_mean.shape[:1]:
            raise ValueError(f"concept_ids must be [{codes_mean.shape[0]}]; got {tuple(concept_ids.shape)}.")
        if concept_ids.numel() == 0:
            return
        if concept_ids.min() < 0 or concept_ids.max() >= num_concepts:
            raise ValueError(f"concept_ids must lie in [0, {num_concepts}); got {concept_ids.tolist()}.")
        if step.min() < 0 or step.max() >= num_steps:
            raise ValueError(f"step must lie in [0, {num_steps}); got {step.tolist()}.")
        cell = concept_ids * num_steps + step  # [B] row of (concept, step) in the flattened [C·T, L] sums
        self.sums.view(num_concepts * num_steps, num_latents).index_add_(0, cell, codes_mean.to(self.sums))  # [C·T, L]
        self.images.view(-1).index_add_(0, cell, torch.ones_like(cell))  # [C·T]

    def all_reduce(self) -> None:
        """Sum the accumulators of all DDP ranks in place (a no-op without torch.distributed)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.sums)
            dist.all_reduce(self.images)

    def finalize(self, metadata: dict[str, Any] | None = None) -> ConceptStats:
        """Means per (concept, step); fails if a concept has no images or uneven image counts across steps."""
        fewest, most = self.images.amin(dim=1).tolist(), self.images.amax(dim=1).tolist()
        empty = [name for name, count in zip(self.concepts, most) if count == 0]
        if empty:
            raise ValueError(f"No images were recorded for the concepts {empty}.")
        for name, low, high in zip(self.concepts, fewest, most):
            if low != high:
                raise ValueError(
                    f"Concept {name!r} has between {low} and {high} images per step; every step must see every image."
                )
        means = self.sums / self.images[:, :, None]  # [C, T, L]
        return ConceptStats(self.concepts, means.cpu(), self.images[:, 0].cpu(), dict(metadata or {}))
