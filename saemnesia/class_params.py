"""Per-concept erasing parameters, `class_params` (docs/method.md §5, §7): `{concept: {"percentile": p, "multiplier":
m}}`.

Two file formats, chosen by suffix: `.pth` is the published one (`torch.save` of the plain dict) and `.json` is
the same dict as text. Published `.pth` files may carry extra per-concept keys (UA, IRA, score, ...) whose values
may be numpy scalars; loading keeps only the two parameters and never unpickles arbitrary objects.
"""

from __future__ import annotations

import io
import json
import numbers
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from saemnesia.hub import local_path
from saemnesia.io import atomic_write_bytes, atomic_write_text

ConceptParams = dict[str, float]
"""`{"percentile": p, "multiplier": m}` for one concept."""

PARAM_KEYS = ("percentile", "multiplier")
"""The two keys every concept entry must have."""

SAEMNESIA_PERCENTILE = 99.999
"""SAEmnesia's fixed percentile: with L = 20480 latents it selects exactly the top-1 latent (docs/method.md §3.3)."""

SAEMNESIA_MULTIPLIERS = (-1.0, -5.0, -10.0, -15.0, -20.0, -25.0, -30.0)
"""The multipliers both methods search (docs/method.md §5)."""

SAEURON_PERCENTILES = (99.99, 99.995, 99.999)
"""SAeUron's percentiles (top-3, top-2, top-1 latents at L = 20480), searched together with the multipliers."""

# A `.pth` written where the metric values were numpy scalars pickles them as `scalar(dtype, bytes)`; numpy 1 and 2
# name that function differently, so both names are allowed for the weights-only unpickler.
_numpy_scalar = np.float64(0).__reduce__()[0]
_NUMPY_SCALAR_GLOBALS = [
    (_numpy_scalar, "numpy.core.multiarray.scalar"),
    (_numpy_scalar, "numpy._core.multiarray.scalar"),
    np.dtype,
    *{type(np.dtype(code)) for code in "efdbhilqBHILQ?"},
]


class Candidate(NamedTuple):
    """One `{percentile, multiplier}` of a parameter search, applied to every concept an image erases."""

    percentile: float
    multiplier: float

    @classmethod
    def from_params(cls, params: Mapping[str, Any], source: str) -> Candidate:
        """A candidate from a `{percentile, multiplier}` mapping, checked as a class_params entry; `source` names
        it in errors."""
        return cls(**validate_class_params({"candidate": params}, source)["candidate"])

    @property
    def name(self) -> str:
        """Folder name of its images, e.g. `p99.999_m-5`."""
        return f"p{self.percentile:g}_m{self.multiplier:g}"


def top_latents_percentile(num_latents: int, count: int) -> float:
    """The percentile whose threshold (`saemnesia.stats.above_quantile`) keeps exactly the `count` highest of
    `num_latents` distinct scores: SAeUron's percentiles at L = 20480 translated to another dictionary size.

    The threshold interpolates at sorted position `p / 100 · (L − 1)`; any position strictly between
    `L − 1 − count` and `L − count` keeps `count` scores, so the middle one is returned.
    """
    if not 0 < count < num_latents:
        raise ValueError(f"count must lie in 1..{num_latents - 1} (num_latents - 1), got {count}.")
    return 100 * (num_latents - count - 0.5) / (num_latents - 1)


def validate_class_params(params: Mapping[str, Any], source: str = "class_params") -> dict[str, ConceptParams]:
    """Check `{concept: {"percentile", "multiplier", ...}}` and return it with exactly those two keys, as floats.

    Extra keys per concept are dropped. `source` names the file or option in error messages.
    """
    if not isinstance(params, Mapping):
        raise ValueError(f"{source} must be a dict {{concept: {{'percentile': p, 'multiplier': m}}}}; "
                         f"got {type(params).__name__}.")
    checked = {}
    for concept, entry in params.items():
        if not isinstance(entry, Mapping) or any(key not in entry for key in PARAM_KEYS):
            keys = sorted(entry) if isinstance(entry, Mapping) else type(entry).__name__
            raise ValueError(f"{source}: the entry of {concept!r} must have 'percentile' and 'multiplier'; got {keys}.")
        values = {key: _as_float(entry[key], f"{source}: {concept!r} {key}") for key in PARAM_KEYS}
        if not 0 <= values["percentile"] <= 100:
            raise ValueError(f"{source}: {concept!r} percentile must lie in [0, 100]; got {values['percentile']}.")
        checked[str(concept)] = values
    return checked


def _as_float(value: Any, what: str) -> float:
    """A finite real number (Python, numpy or a one-element tensor) as a float; bools and text are refused."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(float(value)):
        raise ValueError(f"{what} must be a finite number; got {value!r}.")
    return float(value)


def entries_for(params: Mapping[str, ConceptParams], concepts: Sequence[str], source: str) -> dict[str, ConceptParams]:
    """The entries of `concepts`, in their order; a ValueError naming `source` (e.g. the file) and the missing ones."""
    missing = [concept for concept in concepts if concept not in params]
    if missing:
        raise ValueError(f"{source} has no entry for {missing} (it covers {sorted(params)}); add them or search "
                         "their parameters first.")
    return {concept: params[concept] for concept in concepts}


def save_class_params(path: str | os.PathLike, params: Mapping[str, Any]) -> None:
    """Write `params` as `.pth` (torch.save, the published format) or `.json`, by suffix, atomically."""
    path = Path(path)
    checked = validate_class_params(params, source=str(path))
    if path.suffix == ".json":
        atomic_write_text(path, json.dumps(checked, indent=2) + "\n")
    elif path.suffix == ".pth":
        buffer = io.BytesIO()
        torch.save(checked, buffer)
        atomic_write_bytes(path, buffer.getvalue())
    else:
        raise ValueError(f"class_params file {path} must end in .pth or .json.")


def load_class_params(path: str | os.PathLike) -> dict[str, ConceptParams]:
    """Read a `.pth` (published) or `.json` class_params file, local or on the Hub (`hf://owner/repo/path`); returns
    only percentile and multiplier per concept."""
    path = local_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class_params file {path} does not exist.")
    if path.suffix == ".json":
        try:
            params = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"class_params file {path} is not valid JSON ({error}).") from error
    elif path.suffix == ".pth":
        try:
            with torch.serialization.safe_globals(_NUMPY_SCALAR_GLOBALS):
                params = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
            raise ValueError(f"class_params file {path} is not a torch.save of plain parameters ({error}).") from error
    else:
        raise ValueError(f"class_params file {path} must end in .pth or .json.")
    return validate_class_params(params, source=str(path))

