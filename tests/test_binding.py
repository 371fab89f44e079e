"""The binding diagnostic against a naive float64 reading of docs/method.md §3.2-3.3."""

from __future__ import annotations

import json

import pytest
import torch

from saemnesia.binding import latent_bindings, main
from saemnesia.stats import ConceptStats


def naive_scores(means: torch.Tensor, counts: list[int], concept: int, step: int) -> list[float]:
    """docs/method.md §3.2 with plain loops: own normalised mean minus the image-weighted mean of the others,
    normalised."""
    num_latents = means.shape[2]
    own = [float(means[concept, step, j]) for j in range(num_latents)]
    others = [sum(counts[c] * float(means[c, step, j]) for c in range(len(counts)) if c != concept)
              / sum(counts[c] for c in range(len(counts)) if c != concept) for j in range(num_latents)]
    return [o / (sum(own) + 1e-8) - r / (sum(others) + 1e-8) for o, r in zip(own, others)]


def test_bindings_match_a_naive_ranking_of_the_importance_scores():
    generator = torch.Generator().manual_seed(0)
    means = torch.rand(4, 5, 6, generator=generator, dtype=torch.float64).float()  # [C, T, L]
    counts = [3, 1, 2, 2]
    stats = ConceptStats(["A", "B", "C", "D"], means, torch.tensor(counts))
    assigned = {"A": 0, "B": 1, "C": 2, "D": 3}
    for binding in latent_bindings(stats, assigned):
        concept = "ABCD".index(binding.concept)
        ranks, tops = [], []
        for step in range(5):
            scores = naive_scores(means, counts, concept, step)
            ranks.append(1 + sum(score > scores[binding.latent] for score in scores))
            tops.append(max(range(6), key=scores.__getitem__))  # p = 99.999 of 6 latents selects the top one
        assert binding.selected_steps == sum(top == binding.latent for top in tops)
        assert binding.ranks == (min(ranks), max(ranks))
        codes = means[concept, :, binding.latent]
        assert binding.mean_codes == pytest.approx((codes.min().item(), codes.max().item()))
        assert set(binding.selected_instead) == set(tops) - {binding.latent}
        for latent, owners in binding.selected_instead.items():
            assert owners == [name for name, own in assigned.items() if own == latent]


def handmade_stats() -> ConceptStats:
    """X's latent 0 wins both steps; Y's latent 1 wins step 0, and X's latent 0 wins step 1 for Y too."""
    means = torch.tensor([[[4.0, 0.0, 1.0], [4.0, 0.0, 1.0]],   # X
                          [[0.0, 4.0, 1.0], [3.0, 0.5, 0.0]],   # Y
                          [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]])  # Z, unassigned  [C=3, T=2, L=3]
    return ConceptStats(["X", "Y", "Z"], means, torch.ones(3, dtype=torch.int64))


def test_a_concept_whose_selection_falls_on_another_concepts_latent():
    x, y = latent_bindings(handmade_stats(), {"X": 0, "Y": 1})
    assert (x.selected_steps, x.ranks, x.selected_instead) == (2, (1, 1), {})
    assert (y.selected_steps, y.ranks, y.selected_instead) == (1, (1, 2), {0: ["X"]})
    assert y.mean_codes == (0.5, 4.0)


def test_command_line_prints_the_table_and_refuses_unassigned_concepts(tmp_path, capsys):
    handmade_stats().save(tmp_path / "stats.safetensors")
    (tmp_path / "concept_latents.json").write_text(json.dumps({"X": 0, "Y": 1}))
    files = ["--stats", str(tmp_path / "stats.safetensors"),
             "--concept-latents", str(tmp_path / "concept_latents.json")]
    bindings = main(files)
    table = capsys.readouterr().out
    assert [binding.concept for binding in bindings] == ["X", "Y"]  # Z has no latent
    assert "| Y | 1 | 1/2 steps | 1–2 | 0.50–4.00 | 0 (X) |" in table
    with pytest.raises(ValueError, match=r"Concepts \['Z'\] have no latent in .*concept_latents.json\.$"):
        main([*files, "--concepts", "Z"])
    with pytest.raises(SystemExit):
        main([*files, "--percentile", "150"])
    assert r"--percentile must lie in [0, 100]; got 150.0." in capsys.readouterr().err
