"""The concept → latent assignment of supervised fine-tuning (docs/method.md §2.2 steps 1-3), estimated with the
starting SAE on training batches before the first step."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import Tensor

from saemnesia.concepts import NO_STYLE, ConceptVocabulary, assign_latents
from saemnesia.sae import SparseAutoencoder
from saemnesia.stats import ConceptStats, ConceptStatsAccumulator


@torch.no_grad()
def estimate_concept_latents(sae: SparseAutoencoder, batches: Iterable[dict[str, Tensor]],
                             vocabulary: ConceptVocabulary, num_steps: int, num_batches: int | None = None
                             ) -> dict[str, int]:
    """docs/method.md §2.2 steps 1-3 on at most `num_batches` batches (`None`: all), summed over DDP ranks: importance
    of every concept per step with the starting SAE, averaged over the steps every concept was seen at, then the greedy
    assignment. Images per (concept, step) can differ (a cap stops mid-pass), so each step's statistics weight the
    concepts by that step's own counts."""
    num_objects, device = len(vocabulary.objects), sae.W_dec.device
    stats = ConceptStatsAccumulator(vocabulary.concepts, num_steps, sae.num_latents, device)
    for batch in itertools.islice(batches, num_batches):
        codes = sae.mean_code(batch["act"].to(device, sae.W_dec.dtype))  # [B, L], from float16 as stored
        objects, styles, steps = (batch[key].to(device) for key in ("object", "style", "step"))
        styled = styles != NO_STYLE
        stats.update(objects, steps, codes)
        stats.update(num_objects + styles[styled], steps[styled], codes[styled])
    stats.all_reduce()
    seen = (stats.images > 0).all(0)  # [T]: steps at which every concept has samples
    if not seen.any():
        raise ValueError(f"The assignment batches (model.objective.assignment_batches={num_batches}) do not show "
                         f"every concept of {vocabulary.concepts} at one step; raise it or give concept_latents.")
    scores = torch.stack([  # s_c[t] of docs/method.md §3.2, with step t's own image counts
        ConceptStats(vocabulary.concepts, (stats.sums[:, t] / stats.images[:, t, None])[:, None],
                     stats.images[:, t]).importance_all()[:, 0]
        for t in seen.nonzero().flatten().tolist()])  # [T', C, L]
    return assign_latents(scores.mean(0), vocabulary)  # ā_c [C, L], averaged over the steps
