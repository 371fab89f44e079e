"""Did supervised fine-tuning bind each concept to its latent? A diagnostic reading the statistics.

SAEmnesia erases the latents that docs/method.md §3.3 selects from the importance scores (p = 99.999: the top one) and
counts on fine-tuning (docs/method.md §2.2) having made that latent the concept's assigned one (`concept_latents.json`).
Where the binding failed, the assigned latent rarely survives the TopK, and the selection falls on other latents,
possibly another concept's, so the eraser removes too little of the concept or too much of the other.

    python -m saemnesia.binding --stats runs/toy/stats/concept_stats.safetensors \\
        --concept-latents runs/toy/sae_supervised/unet.up_blocks.1.attentions.1/concept_latents.json
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import NamedTuple

from saemnesia.class_params import SAEMNESIA_PERCENTILE
from saemnesia.concepts import load_concept_latents
from saemnesia.stats import ConceptStats, above_quantile


class LatentBinding(NamedTuple):
    """How one concept's assigned latent fares in the feature selection over the sampling steps."""

    concept: str
    latent: int
    """The assigned latent."""
    selected_steps: int
    """Steps at which the selection `I_{c,t}` contains the assigned latent."""
    ranks: tuple[int, int]
    """Best and worst rank of its importance score over the steps (1 = the highest)."""
    mean_codes: tuple[float, float]
    """Smallest and largest `μ_c[t, latent]` over the steps: ~0 means it (almost) never survives the TopK."""
    selected_instead: dict[int, list[str]]
    """Other latents selected at some step, each with the concepts assigned to it (often none)."""


def latent_bindings(stats: ConceptStats, concept_latents: dict[str, int], concepts: Sequence[str] | None = None,
                    percentile: float = SAEMNESIA_PERCENTILE,
                    source: str = "the concept→latent mapping") -> list[LatentBinding]:
    """The binding of each of `concepts` (default: every assigned concept that the statistics cover); `source`
    names `concept_latents` in errors."""
    unassigned = [name for name in concepts or [] if name not in concept_latents]
    if unassigned:
        raise ValueError(f"Concepts {unassigned} have no latent in {source}.")
    owners: dict[int, list[str]] = {}
    for name, latent in concept_latents.items():
        owners.setdefault(latent, []).append(name)
    bindings = []
    for concept in concepts or [name for name in concept_latents if name in stats.concepts]:
        latent = concept_latents[concept]
        scores = stats.importance(concept)  # [T, L]
        ranks = 1 + (scores > scores[:, latent : latent + 1]).sum(dim=1)  # [T]
        selected = above_quantile(scores, percentile)  # [T, L], as `stats.selection_mask` without scoring again
        others = selected.any(dim=0).nonzero().squeeze(1).tolist()
        codes = stats.means[stats.index(concept), :, latent]  # [T]
        bindings.append(LatentBinding(
            concept, latent, int(selected[:, latent].sum()), (int(ranks.min()), int(ranks.max())),
            (float(codes.min()), float(codes.max())),
            {other: owners.get(other, []) for other in others if other != latent},
        ))
    return bindings


def binding_table(bindings: Sequence[LatentBinding], num_steps: int) -> str:
    """A Markdown table, one row per concept."""
    lines = ["| concept | latent | selected at | rank | mean code | selected instead |", "|---|---|---|---|---|---|"]
    for binding in bindings:
        instead = ", ".join(f"{latent} ({'/'.join(names) or 'no concept'})"
                            for latent, names in binding.selected_instead.items()) or "–"
        (best, worst), (low, high) = binding.ranks, binding.mean_codes
        lines.append(f"| {binding.concept} | {binding.latent} | {binding.selected_steps}/{num_steps} steps "
                     f"| {best}–{worst} | {low:.2f}–{high:.2f} | {instead} |")
    return "\n".join(lines)


def main(args: list[str] | None = None) -> list[LatentBinding]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stats", required=True, help="concept statistics computed with the supervised SAE")
    parser.add_argument("--concept-latents", required=True, help="the SAE's concept_latents.json")
    parser.add_argument("--concepts", nargs="+",
                        help="concepts to report (default: the assigned ones that the statistics cover)")
    parser.add_argument("--percentile", type=float, default=SAEMNESIA_PERCENTILE,
                        help="selection percentile (docs/method.md §3.3)")
    options = parser.parse_args(args)
    if not 0 <= options.percentile <= 100:
        parser.error(f"--percentile must lie in [0, 100]; got {options.percentile}.")
    stats = ConceptStats.load(options.stats)
    concept_latents = load_concept_latents(options.concept_latents, num_latents=stats.num_latents)
    bindings = latent_bindings(stats, concept_latents, options.concepts, options.percentile, options.concept_latents)
    print(binding_table(bindings, stats.num_steps))
    return bindings


if __name__ == "__main__":
    main()
