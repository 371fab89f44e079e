"""The writer bases (`callbacks.writer`): each writer's preconditions, the skip of stored items, the order of the
resume steps across ranks, and the image manifest's merge (one record per existing file)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest

from callbacks import ActivationShardWriter, ConceptStatsCallback, ImageWriter
from callbacks.image_writer import MANIFEST, image_file, manifest_record
from callbacks.writer import ResumableWriter
from datamodules.prompts import PromptDataModule
from saemnesia.concepts import ConceptVocabulary
from saemnesia.generation import CaptureConfig, HookedDiffusion, PromptItem

VOCABULARY = ConceptVocabulary(objects=("Bears", "Cats"), styles=("Cubism",))


def fake_trainer(datamodule: object, rank: int = 0, return_predictions: bool = False,
                 events: list[str] | None = None) -> SimpleNamespace:
    """The parts of a `pl.Trainer` the writers use; `events` records the barriers."""
    barrier = (lambda name: events.append(f"barrier {name}")) if events is not None else (lambda name: None)
    return SimpleNamespace(datamodule=datamodule, global_rank=rank, is_global_zero=rank == 0,
                           predict_loop=SimpleNamespace(return_predictions=return_predictions),
                           strategy=SimpleNamespace(barrier=barrier))


def model(**options: object) -> HookedDiffusion:
    """A `HookedDiffusion` that is never set up (no pipeline is loaded)."""
    return HookedDiffusion("no-pipeline", num_steps=3, **options)


@pytest.mark.parametrize("writer, module, message", [
    (ActivationShardWriter("shards"), model(), "ActivationShardWriter needs a HookedDiffusion model with "
                                               "model.capture set."),
    (ImageWriter("images"), model(capture=CaptureConfig()), "ImageWriter needs a HookedDiffusion model with "
                                                            "model.output_type: image."),
    (ImageWriter("images"), pl.LightningModule(), "ImageWriter needs a HookedDiffusion model with "
                                                  "model.output_type: image."),
    (ConceptStatsCallback("sae", "stats.safetensors"), model(capture=CaptureConfig(every=2)),
     'ConceptStatsCallback needs a HookedDiffusion model with model.capture: {"halves": "cond", "every": 1, '
     '"steps": null}.'),
])
def test_a_writer_refuses_a_model_without_what_it_needs_in_one_sentence(tmp_path, monkeypatch, writer, module,
                                                                        message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as error:
        writer.setup(fake_trainer(PromptDataModule(VOCABULARY)), module, "predict")
    assert str(error.value) == message
    assert not list(tmp_path.iterdir())  # refused before the output folder exists


def test_a_writer_refuses_other_data_and_erasure_where_it_describes_generation_without_it(tmp_path):
    writer = ActivationShardWriter(str(tmp_path / "shards"))
    with pytest.raises(ValueError) as error:
        writer.setup(fake_trainer(pl.LightningDataModule()), model(capture=CaptureConfig()), "predict")
    assert str(error.value) == ("ActivationShardWriter needs a PromptDataModule (data.class_path), got "
                                "LightningDataModule.")
    stats = ConceptStatsCallback("sae", "stats.safetensors")
    with pytest.raises(ValueError, match="^ConceptStatsCallback describes generation without erasure; remove "
                                         "data.targets and data.sequential.$"):
        stats.setup(fake_trainer(PromptDataModule(VOCABULARY, targets=["Cats"])), model(capture=CaptureConfig()),
                    "predict")


class RecordingWriter(ResumableWriter):
    """Stores nothing; says which items it holds and records the steps the base takes."""

    manifest_suffix = ".json"

    def __init__(self, output_dir: str, stored: set[str], events: list[str]):
        super().__init__(output_dir)
        self.stored, self.events = stored, events

    def resume(self, trainer: pl.Trainer, pl_module: HookedDiffusion) -> set[str]:
        self.events.append("resume")
        return self.stored

    def claim(self, pl_module: HookedDiffusion) -> None:
        self.events.append("claim")

    def merge(self, rank_manifests: list[Path]) -> None:
        self.events.append(f"merge {[path.name for path in rank_manifests]}")


@pytest.mark.parametrize("rank", [0, 1])
def test_resuming_reads_on_every_rank_then_rank_0_claims_and_stored_items_are_left_out(tmp_path, rank):
    data = PromptDataModule(VOCABULARY)
    stored = {item.prompt_id for item in data.items[:2]}
    events: list[str] = []
    writer = RecordingWriter(str(tmp_path / "out"), stored, events)
    trainer = fake_trainer(data, rank, events=events)
    with pytest.warns(UserWarning, match="RecordingWriter writes every batch, but Trainer.predict also keeps them"):
        writer.setup(fake_trainer(data, rank, return_predictions=True, events=events), model(), "predict")
    assert events == ["resume", "barrier RecordingWriter-read", *(["claim"] if rank == 0 else [])]
    assert data.remaining == data.items[2:]

    (tmp_path / "out/manifest-r1.json").touch()
    (tmp_path / "out/manifest-r0.json").touch()
    (tmp_path / "out/manifest-r0.jsonl").touch()  # another writer's suffix
    events.clear()
    writer.on_predict_end(trainer, model())
    merged = ["merge ['manifest-r0.json', 'manifest-r1.json']"] if rank == 0 else []
    assert events == ["barrier RecordingWriter-written", *merged, "barrier RecordingWriter-merged"]


def test_nothing_left_to_generate_merges_during_setup(tmp_path):
    """Lightning skips the predict loop and its hooks when no item remains, so the merge cannot wait for them."""
    data = PromptDataModule(VOCABULARY)
    events: list[str] = []
    writer = RecordingWriter(str(tmp_path / "out"), {item.prompt_id for item in data.items}, events)
    writer.setup(fake_trainer(data, events=events), model(), "predict")
    assert data.remaining == []
    assert events[-3:] == ["barrier RecordingWriter-written", "merge []", "barrier RecordingWriter-merged"]


def test_the_image_manifest_keeps_one_record_per_existing_file_sorted(tmp_path):
    items = [PromptItem(f"{obj}-plain-000-s0", f"An image of {obj}.", obj, None, 0, ("Cats",), "Cats")
             for obj in ("Cats", "Bears", "Dogs")]
    for item in items[:2]:  # the Dogs image was listed, then its run crashed before writing it
        (tmp_path / image_file(item)).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / image_file(item)).write_bytes(b"jpeg")
    line = {item.object: json.dumps(manifest_record(item)) + "\n" for item in items}
    (tmp_path / "manifest-r0.jsonl").write_text(line["Cats"] + line["Dogs"] + line["Bears"][:15])  # torn last line
    (tmp_path / "manifest-r1.jsonl").write_text(line["Bears"] + line["Cats"])  # Cats listed again by a rerun
    ImageWriter(str(tmp_path)).merge_manifests(fake_trainer(None))
    expected = [line["Bears"], line["Cats"]]  # by file: Cats/Bears_seed0.jpg, Cats/Cats_seed0.jpg
    assert (tmp_path / MANIFEST).read_text().splitlines(keepends=True) == expected
