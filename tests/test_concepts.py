"""Concept→latent assignment (docs/method.md §2.2) and `concept_latents.json` I/O."""

from __future__ import annotations

import json

import pytest
import torch

from saemnesia.concepts import (
    ConceptVocabulary,
    assign_latents,
    check_concept_latents,
    load_concept_latents,
    save_concept_latents,
)

VOCABULARY = ConceptVocabulary(objects=("Bears", "Cats"), styles=("Cubism",))


def naive_assignment(scores: list[list[float]], vocabulary: ConceptVocabulary) -> dict[str, int]:
    """Plain-Python reading of docs/method.md §2.2: sort by (max + 1 for objects), then each takes its best free
    latent."""
    names = vocabulary.concepts
    priority = {c: max(scores[c]) + (1.0 if names[c] in vocabulary.objects else 0.0) for c in range(len(names))}
    served = sorted(range(len(names)), key=lambda c: -priority[c])
    taken: set[int] = set()
    result = {}
    for c in served:
        free = [j for j in range(len(scores[c])) if j not in taken]
        best = max(free, key=lambda j: scores[c][j])
        taken.add(best)
        result[names[c]] = best
    return result


def test_assignment_serves_strongest_concepts_and_objects_first() -> None:
    # Everyone wants latent 1. Cats (max 0.9) outranks Bears (0.5); Cubism has the highest max (0.95) but is
    # a style, so it is served last. Serving in vocabulary order would give Bears 1, Cats 2, Cubism 3 instead.
    scores = torch.tensor(
        [
            [0.1, 0.5, 0.0, 0.0],  # Bears
            [0.0, 0.9, 0.8, 0.0],  # Cats
            [0.0, 0.95, 0.2, 0.1],  # Cubism
        ]
    )
    assert assign_latents(scores, VOCABULARY) == {"Bears": 0, "Cats": 1, "Cubism": 2}


def test_object_priority_outweighs_a_larger_style_score() -> None:
    # Bears takes latent 1 although Monet scores it higher; Monet (max 0.99) then beats Cubism to latent 2.
    scores = torch.tensor([[0.0, 0.3, 0.0], [0.05, 0.2, 0.1], [0.0, 0.99, 0.5]])
    assignment = assign_latents(scores, ConceptVocabulary(objects=("Bears",), styles=("Cubism", "Monet")))
    assert assignment == {"Bears": 1, "Cubism": 0, "Monet": 2}


@pytest.mark.parametrize("seed", range(5))
def test_assignment_matches_naive_implementation(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    vocabulary = ConceptVocabulary(objects=("A", "B", "C"), styles=("S1", "S2", "S3", "S4"))
    # Few latents so that concepts compete for the same ones.
    scores = torch.randn(7, 9, generator=generator)
    assignment = assign_latents(scores, vocabulary)
    assert assignment == naive_assignment(scores.tolist(), vocabulary)
    assert list(assignment) == vocabulary.concepts
    assert len(set(assignment.values())) == 7


def test_assignment_rejects_bad_scores() -> None:
    with pytest.raises(ValueError, match=r"Cannot give 3 concepts distinct latents with only 2 latents"):
        assign_latents(torch.rand(3, 2), VOCABULARY)
    with pytest.raises(ValueError, match=r"expects scores of shape \[3 concepts, latents\]; got \(2, 5\)"):
        assign_latents(torch.rand(2, 5), VOCABULARY)
    with pytest.raises(ValueError, match="NaN or infinite"):
        assign_latents(torch.tensor([[0.0, float("nan"), 1.0]] * 3), VOCABULARY)


def test_concept_latents_json_round_trip(tmp_path) -> None:
    path = tmp_path / "run" / "concept_latents.json"
    mapping = {"Bears": 7, "Cats": 0, "Cubism": 3}
    save_concept_latents(path, mapping)
    assert json.loads(path.read_text()) == mapping
    assert load_concept_latents(path, VOCABULARY, num_latents=8) == mapping
    assert [p.name for p in path.parent.iterdir()] == ["concept_latents.json"]  # no temporary left behind


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"Bears": 1, "Cats": 1, "Cubism": 2}, r"same latents \[1\]"),
        ({"Bears": 1, "Cats": 2}, r"missing \['Cubism'\], unknown \[\]"),
        ({"Bears": 1, "Cats": 2, "Cubism": 3, "Monet": 4}, r"missing \[\], unknown \['Monet'\]"),
        ({"Bears": 1, "Cats": 2, "Cubism": 8}, r"outside \[0, 8\): \{'Cubism': 8\}"),
        ({"Bears": 1, "Cats": 2, "Cubism": "3"}, "must map concept names to integer latent indices"),
        (["Bears", 1], "must map concept names to integer latent indices"),
        ({"Bears": 1, "Cats": 2, "Cubism": True}, "must map concept names to integer latent indices"),
    ],
)
def test_load_concept_latents_rejects_bad_files(tmp_path, mapping, message: str) -> None:
    path = tmp_path / "concept_latents.json"
    path.write_text(json.dumps(mapping))
    with pytest.raises(ValueError, match=message):
        load_concept_latents(path, VOCABULARY, num_latents=8)


def test_load_concept_latents_missing_or_broken_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.json does not exist"):
        load_concept_latents(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        load_concept_latents(broken)


def test_save_refuses_a_mapping_with_repeated_latents(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"same latents \[4\]"):
        save_concept_latents(tmp_path / "concept_latents.json", {"Bears": 4, "Cats": 4})
    assert not any(tmp_path.iterdir())


def test_check_concept_latents_accepts_a_valid_mapping_without_vocabulary() -> None:
    check_concept_latents({"anything": 0, "else": 5}, source="config", num_latents=6)
