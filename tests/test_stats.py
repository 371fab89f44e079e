"""Concept statistics: importance scores, latent selection, file formats and streaming accumulation (docs/method.md §3,
§7)."""

from __future__ import annotations

import math
import pickle
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

from saemnesia import stats as stats_module
from saemnesia.stats import ConceptStats, ConceptStatsAccumulator, above_quantile

CONCEPTS = ["Bears", "Cats", "Cubism", "Monet"]
IMAGES_PER_CONCEPT = [3, 1, 5, 2]
NUM_STEPS, NUM_LATENTS = 3, 16


def random_images(seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-image token-averaged codes `{concept: [n_images, T, L]}`, non-negative like TopK codes."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.rand(n, NUM_STEPS, NUM_LATENTS, generator=generator, dtype=torch.float64)
        for name, n in zip(CONCEPTS, IMAGES_PER_CONCEPT)
    }


def stats_of(images: dict[str, torch.Tensor]) -> ConceptStats:
    return ConceptStats(
        concepts=list(images),
        means=torch.stack([codes.mean(0) for codes in images.values()]),
        counts=torch.tensor([len(codes) for codes in images.values()]),
    )


def naive_importance(images: dict[str, torch.Tensor], concept: str, step: int) -> torch.Tensor:
    """docs/method.md §3.2 in float64, with μ_¬c the mean over the pooled images of all other concepts."""
    own = images[concept][:, step].mean(0)
    others = torch.cat([codes[:, step] for name, codes in images.items() if name != concept]).mean(0)
    return own / (own.sum() + 1e-8) - others / (others.sum() + 1e-8)


def naive_above_quantile(scores: torch.Tensor, percentile: float) -> torch.Tensor:
    """Linear-interpolation quantile from a sorted copy, in float64."""
    ordered = sorted(scores.double().tolist())
    position = percentile / 100 * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    threshold = ordered[below] + (position - below) * (ordered[above] - ordered[below])
    return scores.double() > threshold


def test_importance_matches_naive_loop() -> None:
    images = random_images()
    stats = stats_of(images)
    every = stats.importance_all()
    assert every.shape == (len(CONCEPTS), NUM_STEPS, NUM_LATENTS) and every.dtype == torch.float32
    for row, concept in enumerate(CONCEPTS):
        per_step = stats.importance(concept)
        for step in range(NUM_STEPS):
            expected = naive_importance(images, concept, step).float()
            torch.testing.assert_close(every[row, step], expected, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(stats.importance(concept, step), expected, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(per_step[step], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("percentile", [0.0, 37.5, 90.0, 99.0, 100.0])
def test_selection_mask_matches_sort_based_threshold(percentile: float) -> None:
    stats = stats_of(random_images(seed=1))
    for concept in CONCEPTS:
        mask = stats.selection_mask(concept, percentile)
        for step in range(NUM_STEPS):
            assert torch.equal(mask[step], naive_above_quantile(stats.importance(concept, step), percentile))


@pytest.mark.parametrize(("percentile", "top"), [(99.999, 1), (99.995, 2), (99.99, 3)])
def test_published_percentiles_select_the_top_latents(percentile: float, top: int) -> None:
    generator = torch.Generator().manual_seed(2)
    stats = ConceptStats(["Bears", "Cats"], torch.rand(2, 2, 20480, generator=generator), torch.tensor([4, 4]))
    for step in range(2):
        expected = stats.importance("Bears", step).topk(top).indices.sort().values
        assert torch.equal(stats.selection_mask("Bears", percentile)[step].nonzero().flatten(), expected)


def test_above_quantile_splits_rows_like_one_quantile_per_row(monkeypatch) -> None:
    scores = torch.randn(5, 3, 16, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(stats_module, "QUANTILE_MAX_NUMEL", 40)  # two rows of 16 per torch.quantile call
    expected = torch.stack([row > torch.quantile(row, 0.8) for row in scores.reshape(15, 16)]).reshape(5, 3, 16)
    assert torch.equal(above_quantile(scores, 80.0), expected)


def test_reference_pickle_import_and_export(tmp_path) -> None:
    images = {name: codes.half() for name, codes in random_images(seed=4).items()}
    reference = tmp_path / "cls_latents_dict.pkl"
    with reference.open("wb") as handle:
        pickle.dump(images, handle)
    stats = ConceptStats.from_reference(reference)
    assert stats.concepts == CONCEPTS
    assert stats.counts.tolist() == IMAGES_PER_CONCEPT
    expected = torch.stack([codes.double().mean(0) for codes in images.values()]).float()
    torch.testing.assert_close(stats.means, expected, rtol=0, atol=1e-6)

    exported = tmp_path / "export.pkl"
    with pytest.warns(UserWarning, match="weighs every concept equally"):
        stats.to_reference(exported)
    with exported.open("rb") as handle:
        per_concept = pickle.load(handle)
    assert list(per_concept) == CONCEPTS
    for row, codes in enumerate(per_concept.values()):
        assert codes.dtype == torch.float16 and codes.shape == (1, NUM_STEPS, NUM_LATENTS)
        assert torch.equal(codes[0], stats.means[row].half())


def test_reference_export_keeps_importance_when_counts_are_equal(tmp_path) -> None:
    # Means on a 1/64 grid survive float16 exactly, so any difference would come from the format itself.
    means = torch.randint(0, 64, (3, NUM_STEPS, NUM_LATENTS), generator=torch.Generator().manual_seed(5)) / 64
    stats = ConceptStats(["Bears", "Cats", "Monet"], means, torch.tensor([80, 80, 80]))
    stats.to_reference(tmp_path / "export.pkl")
    imported = ConceptStats.from_reference(tmp_path / "export.pkl")
    assert imported.counts.tolist() == [1, 1, 1]
    torch.testing.assert_close(imported.importance_all(), stats.importance_all(), rtol=0, atol=1e-7)


def test_reference_import_rejects_malformed_pickles(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.pkl do not exist"):
        ConceptStats.from_reference(tmp_path / "absent.pkl")
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps([torch.zeros(1, 2, 3)]))
    with pytest.raises(ValueError, match=r"must hold a non-empty dict \{concept: Tensor\[n_images, T, L\]\}"):
        ConceptStats.from_reference(path)
    path.write_bytes(pickle.dumps({"Bears": torch.zeros(2, 3, 8), "Cats": torch.zeros(2, 3, 9)}))
    with pytest.raises(ValueError, match=r"'Cats' has shape \(2, 3, 9\)"):
        ConceptStats.from_reference(path)


def test_save_load_round_trip(tmp_path) -> None:
    stats = stats_of(random_images(seed=6))
    stats.metadata = {"hookpoint": "unet.up_blocks.1.attentions.1", "guidance": 9.0}
    path = tmp_path / "stats" / "concept_stats.safetensors"
    stats.save(path)
    loaded = ConceptStats.load(path)
    assert loaded.concepts == stats.concepts and loaded.metadata == stats.metadata
    assert torch.equal(loaded.means, stats.means) and torch.equal(loaded.counts, stats.counts)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind


def test_load_rejects_other_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.safetensors does not exist"):
        ConceptStats.load(tmp_path / "absent.safetensors")
    pickled = tmp_path / "stats.pkl"
    pickled.write_bytes(pickle.dumps({"Bears": torch.zeros(1, 2, 3)}))
    with pytest.raises(ValueError, match="not a safetensors file .*from_reference"):
        ConceptStats.load(pickled)
    foreign = tmp_path / "sae.safetensors"
    save_file({"W_dec": torch.zeros(2, 2)}, foreign)
    with pytest.raises(ValueError, match="holds no saemnesia concept statistics"):
        ConceptStats.load(foreign)


def test_bad_queries_fail_with_clear_messages() -> None:
    stats = stats_of(random_images())
    with pytest.raises(ValueError, match=r"Unknown concept 'Dogs'; the statistics cover \['Bears', 'Cats'"):
        stats.importance("Dogs", 0)
    with pytest.raises(ValueError, match="Step 3 is outside the statistics' 3 sampling steps"):
        stats.importance("Bears", 3)
    alone = ConceptStats(["Bears"], torch.rand(1, 2, 4), torch.tensor([2]))
    with pytest.raises(ValueError, match="the statistics hold only one"):
        alone.importance("Bears", 0)


def test_inconsistent_statistics_are_refused() -> None:
    with pytest.raises(ValueError, match="2 names, 3 means and 3 counts"):
        ConceptStats(["Bears", "Cats"], torch.rand(3, 2, 4), torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match=r"repeated: \['Bears'\]"):
        ConceptStats(["Bears", "Bears"], torch.rand(2, 2, 4), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"at least one image; counts are \[1, 0\]"):
        ConceptStats(["Bears", "Cats"], torch.rand(2, 2, 4), torch.tensor([1, 0]))


def samples_in_random_batches(images: dict[str, torch.Tensor], seed: int):
    """Every (image, step) of `images`, shuffled, cut into batches of 1-5 samples: (concept_ids, steps, codes)."""
    samples = [
        (row, step, codes[step])
        for row, per_image in enumerate(images.values())
        for codes in per_image
        for step in range(NUM_STEPS)
    ]
    shuffler = random.Random(seed)
    shuffler.shuffle(samples)
    while samples:
        batch_size = shuffler.randint(1, 5)
        batch, samples = samples[:batch_size], samples[batch_size:]
        yield (
            torch.tensor([row for row, _, _ in batch]),
            torch.tensor([step for _, step, _ in batch]),
            torch.stack([codes for _, _, codes in batch]).float(),
        )


def naive_means(images: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([codes.mean(0) for codes in images.values()]).float()


def test_accumulator_matches_mean_over_images() -> None:
    images = random_images(seed=7)
    accumulator = ConceptStatsAccumulator(CONCEPTS, NUM_STEPS, NUM_LATENTS)
    for concept_ids, steps, codes in samples_in_random_batches(images, seed=7):
        accumulator.update(concept_ids, steps, codes)
    stats = accumulator.finalize(metadata={"hookpoint": "h"})
    assert stats.concepts == CONCEPTS and stats.metadata == {"hookpoint": "h"}
    assert stats.counts.tolist() == IMAGES_PER_CONCEPT
    torch.testing.assert_close(stats.means, naive_means(images), rtol=0, atol=1e-6)


def test_accumulator_takes_one_step_for_the_whole_batch() -> None:
    images = random_images(seed=8)
    accumulator = ConceptStatsAccumulator(CONCEPTS, NUM_STEPS, NUM_LATENTS)
    names = [name for name, codes in images.items() for _ in codes]
    for step in range(NUM_STEPS):
        codes = torch.cat([per_image[:, step] for per_image in images.values()])  # [images, L]
        accumulator.update(accumulator.concept_ids(names), step, codes)
    torch.testing.assert_close(accumulator.finalize().means, naive_means(images), rtol=0, atol=1e-6)


def test_accumulator_refuses_bad_updates_and_uneven_steps() -> None:
    accumulator = ConceptStatsAccumulator(["Bears", "Cats"], num_steps=2, num_latents=4)
    with pytest.raises(ValueError, match=r"Unknown concept 'Dogs'"):
        accumulator.concept_ids(["Bears", "Dogs"])
    with pytest.raises(ValueError, match=r"codes_mean must be \[batch, 4 latents\]; got \(1, 5\)"):
        accumulator.update(torch.tensor([0]), 0, torch.rand(1, 5))
    with pytest.raises(ValueError, match=r"concept_ids must lie in \[0, 2\)"):
        accumulator.update(torch.tensor([2]), 0, torch.rand(1, 4))
    with pytest.raises(ValueError, match=r"step must lie in \[0, 2\)"):
        accumulator.update(torch.tensor([0]), 2, torch.rand(1, 4))
    with pytest.raises(ValueError, match=r"No images were recorded for the concepts \['Bears', 'Cats'\]"):
        accumulator.finalize()
    accumulator.update(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1]), torch.rand(4, 4))
    accumulator.update(torch.tensor([1]), 0, torch.rand(1, 4))
    with pytest.raises(ValueError, match="'Cats' has between 1 and 2 images per step"):
        accumulator.finalize()


def _reduce_on_rank(rank: int, init_file: str, images: dict[str, torch.Tensor], result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    accumulator = ConceptStatsAccumulator(CONCEPTS, NUM_STEPS, NUM_LATENTS)
    for index, (concept_ids, steps, codes) in enumerate(samples_in_random_batches(images, seed=9)):
        if index % 2 == rank:  # each rank sees a disjoint half of the batches
            accumulator.update(concept_ids, steps, codes)
    accumulator.all_reduce()
    if rank == 0:
        accumulator.finalize().save(result_file)
    dist.destroy_process_group()


def test_all_reduce_combines_ranks(tmp_path) -> None:
    images = random_images(seed=9)
    result = tmp_path / "stats.safetensors"
    mp.spawn(_reduce_on_rank, args=(str(tmp_path / "init"), images, str(result)), nprocs=2)
    stats = ConceptStats.load(result)
    assert stats.counts.tolist() == IMAGES_PER_CONCEPT
    torch.testing.assert_close(stats.means, naive_means(images), rtol=0, atol=1e-6)
