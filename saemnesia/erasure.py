"""Erasure as a config names it: which SAE, concept statistics and per-concept parameters erase a concept set.

`ErasureConfig` is `HookedDiffusion`'s `erasure` argument (`model.init_args.erasure` in YAML). `ErasureBuilder` loads
the SAE and the statistics once per process and hands out one cached `ConceptEraser` per erased set: a single target
(`("Bears",)`) or the first n concepts of a sequential order. The per-concept parameters come from a `class_params`
file (docs/method.md §5, §7), or, in a parameter search, from the prompt item's candidate, applied to every concept it
erases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from saemnesia.class_params import Candidate, ConceptParams, entries_for, load_class_params
from saemnesia.sae import SparseAutoencoder
from saemnesia.stats import ConceptStats
from saemnesia.unlearning import ConceptEraser


@dataclass
class ErasureConfig:
    """Where the erasure's SAE, statistics and per-concept parameters come from, and how the output is rebuilt."""

    sae: str
    """SAE checkpoint folder (`cfg.json` + `sae.safetensors`), or its parent holding `<hookpoint>/` (what
    `SaeExport` writes). It must be the SAE the statistics were computed with."""
    stats: str
    """Concept statistics: our `ConceptStats` safetensors file, or the published pickle
    (`cls_latents_dict_unet.up_blocks.1.attentions.1.pkl`) when the name ends in `.pkl`. Their number of steps T
    must be `model.num_steps`."""
    class_params: str | None = None
    """`{concept: {percentile, multiplier}}` file, `.pth` (published) or `.json`; `None` in a parameter search, whose
    prompt items carry their candidate (`data.candidates`)."""
    error_mode: Literal["reference", "exact", "none"] = "exact"
    """How the SAE error enters the output (docs/method.md §4): `exact` keeps it (`x + r' − r`); `reference` reproduces
    the published code and numbers (`r' + r − x`); `none` returns `r'`."""
    start_step: int = 0
    """Erase only at sampling steps `t ≥ start_step`. Published: 0."""
    use_beta: bool = False
    """Scale selected latents by `m · ‖z‖₂ / ‖W_dec[j]‖₂` instead of `m · μ_c[t, j]`. Published: False."""


class ErasureBuilder:
    """Loads the SAE and statistics of an `ErasureConfig` once and builds one `ConceptEraser` per erased set; the
    erasers check the SAE and the statistics against each other, the builder checks them against the sampling."""

    def __init__(self, config: ErasureConfig, hookpoint: str, num_steps: int) -> None:
        self.config = config
        self.sae = SparseAutoencoder.load(config.sae, hookpoint)
        self.stats = ConceptStats.read(config.stats)
        stats_hookpoint = self.stats.metadata.get("hookpoint")
        if stats_hookpoint not in (None, hookpoint):
            raise ValueError(f"The concept statistics {config.stats} were computed at {stats_hookpoint} but "
                             f"model.hookpoint is {hookpoint}; recompute them at this hookpoint.")
        if num_steps != self.stats.num_steps:
            raise ValueError(f"The concept statistics {config.stats} were computed with {self.stats.num_steps} "
                             f"sampling steps but sampling uses {num_steps} (model.num_steps); recompute them with "
                             "the same number of steps.")
        self.class_params = load_class_params(config.class_params) if config.class_params is not None else None
        self._erasers: dict[tuple[tuple[str, ...], Candidate | None], ConceptEraser] = {}

    def to(self, device: torch.device | str) -> ErasureBuilder:
        """Move the SAE; erasers are built anew on it (their tables live on the SAE's device)."""
        self.sae.to(device)
        self._erasers.clear()
        return self

    def params_for(self, concepts: tuple[str, ...], candidate: Candidate | None = None) -> dict[str, ConceptParams]:
        """Each concept's percentile and multiplier: the candidate's where given, else its `class_params` entry."""
        if candidate is not None:  # the eraser checks the concepts against the statistics
            return {concept: candidate._asdict() for concept in concepts}
        if self.class_params is None:
            raise ValueError(f"Prompt items erase {list(concepts)} without a search candidate and "
                             "model.erasure.class_params is not set; give the class_params file of the search.")
        for concept in concepts:
            self.stats.index(concept)  # a concept the statistics lack is reported as such, listing theirs
        return entries_for(self.class_params, concepts, f"The class_params file {self.config.class_params}")

    def eraser_for(self, concepts: tuple[str, ...], candidate: Candidate | None = None) -> ConceptEraser:
        """The cached eraser of `concepts`, erased at once (a latent shared by several is scaled by the last), with
        the candidate's parameters or each concept's `class_params`."""
        key = (concepts, candidate)
        if key not in self._erasers:
            self._erasers[key] = ConceptEraser(self.sae, self.stats, self.params_for(concepts, candidate),
                                               error_mode=self.config.error_mode, start_step=self.config.start_step,
                                               use_beta=self.config.use_beta)
        return self._erasers[key]
