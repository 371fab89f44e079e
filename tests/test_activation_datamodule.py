"""ActivationDataModule: exact round trip, split by shard, fixed epoch length, per-epoch/per-rank streams, errors."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from collections import Counter
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import SyntheticSample, write_synthetic_shards

from datamodules.activations import ActivationDataModule
from saemnesia.concepts import NO_STYLE, ConceptVocabulary
from saemnesia.shards import ShardManifest, shard_keys

D, N = 8, 4


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, SyntheticSample]]:
    """Two writer ranks, 16 prompts × 3 steps = 48 samples in 6 shards of 6–9 samples."""
    folder = tmp_path_factory.mktemp("shards")
    return folder, write_synthetic_shards(folder, num_prompts=16, num_steps=3, ranks=2, samples_per_shard=7)


def attach_trainer(data: ActivationDataModule, epoch: int = 0, rank: int = 0, world: int = 1, reload: int = 1) -> None:
    """Stand-in for the Trainer attributes the datamodule reads (what Lightning sets under DDP)."""
    data.trainer = SimpleNamespace(current_epoch=epoch, global_rank=rank, world_size=world,
                                   reload_dataloaders_every_n_epochs=reload)


def keys_of(loader) -> list[str]:
    return [key for batch in loader for key in batch["key"]]


def check_against_written(batch: dict, samples: dict[str, SyntheticSample], data: ActivationDataModule) -> None:
    """Every sample of a map-level batch equals what the helper wrote (activations exact and float16 as stored,
    labels as indices)."""
    assert batch["act"].dtype == torch.float16 and batch["act"].shape == (len(batch["key"]), N, D)
    for i, key in enumerate(batch["key"]):
        written = samples[key]
        np.testing.assert_array_equal(batch["act"][i].numpy(), written.act)
        assert batch["object"][i] == data.vocabulary.objects.index(written.meta["object"])
        style = written.meta["style"]
        assert batch["style"][i] == (NO_STYLE if style is None else data.vocabulary.styles.index(style))
        assert batch["step"][i] == written.meta["step"]


def test_properties_and_round_trip(shard_folder) -> None:
    folder, samples = shard_folder
    data = ActivationDataModule(str(folder), batch_size=5, steps_per_epoch=4, val_shards=4)
    assert (data.d_in, data.tokens_per_sample, data.num_steps, data.hookpoint) == (D, N, 3, "unet.mid_block")
    assert data.vocabulary == ShardManifest.load(folder).concepts
    val_keys = {key for url in data.val_urls for key in shard_keys(url)}
    val_batches = list(data.val_dataloader())
    assert sorted(keys_of(val_batches)) == sorted(val_keys)
    assert any(batch["style"].eq(NO_STYLE).any() for batch in val_batches)
    train_keys = {key for url in data.train_urls for key in shard_keys(url)}
    train_batches = list(data.train_dataloader())
    assert set(keys_of(train_batches)) <= train_keys
    for batch in val_batches + train_batches:
        assert batch["object"].dtype == batch["style"].dtype == batch["step"].dtype == torch.int64
        check_against_written(batch, samples, data)


def test_split_is_by_shard_disjoint_and_deterministic(shard_folder) -> None:
    folder, _ = shard_folder
    data = ActivationDataModule(str(folder), val_fraction=0.34)
    all_urls = sorted(str(folder / record.name) for record in ShardManifest.load(folder).shards)
    assert len(data.val_urls) == 2 and not set(data.val_urls) & set(data.train_urls)
    assert sorted(data.val_urls + data.train_urls) == all_urls
    again = ActivationDataModule(str(folder), val_fraction=0.34, seed=7)
    assert (again.train_urls, again.val_urls) == (data.train_urls, data.val_urls)
    assert ActivationDataModule(str(folder), val_fraction=0.0).val_dataloader() == []


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exactly_steps_per_epoch_batches(shard_folder, num_workers: int) -> None:
    folder, _ = shard_folder
    data = ActivationDataModule(str(folder), batch_size=4, steps_per_epoch=7, num_workers=num_workers)
    batches = list(data.train_dataloader())
    assert len(batches) == 7 and all(len(batch["key"]) == 4 for batch in batches)


def test_stream_is_a_function_of_seed_epoch_and_rank(shard_folder) -> None:
    folder, _ = shard_folder

    def stream(seed: int = 0, epoch: int = 0, rank: int = 0) -> list[str]:
        data = ActivationDataModule(str(folder), batch_size=4, steps_per_epoch=6, seed=seed)
        attach_trainer(data, epoch=epoch, rank=rank, world=2)
        return keys_of(data.train_dataloader())

    assert stream(epoch=1) == stream(epoch=1)
    assert stream(epoch=1) != stream(epoch=2)
    assert stream(seed=1) != stream(seed=2)
    assert stream(rank=0) != stream(rank=1)
    without_trainer = ActivationDataModule(str(folder), batch_size=4, steps_per_epoch=6)
    loader = without_trainer.train_dataloader()
    assert keys_of(loader) == keys_of(loader) == stream(epoch=0, rank=0)  # re-iterating repeats the epoch


def test_workers_draw_different_streams(shard_folder) -> None:
    folder, _ = shard_folder
    data = ActivationDataModule(str(folder), batch_size=4, steps_per_epoch=2, num_workers=2)
    keys = keys_of(data.train_dataloader())  # batch 0 from worker 0, batch 1 from worker 1
    assert keys[:4] != keys[4:]
    assert keys_of(data.train_dataloader()) == keys


def test_validation_shards_partition_across_ranks_and_workers(shard_folder) -> None:
    folder, _ = shard_folder
    single = ActivationDataModule(str(folder), batch_size=4, val_shards=3)
    everything = keys_of(single.val_dataloader())
    per_rank = []
    for rank in range(2):
        data = ActivationDataModule(str(folder), batch_size=4, val_shards=3, num_workers=2)
        attach_trainer(data, rank=rank, world=2)
        per_rank.append(keys_of(data.val_dataloader()))
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(everything) and len(set(everything)) == len(everything)
    assert keys_of(single.val_dataloader()) == everything  # deterministic: no shuffling, no resampling
    limited = ActivationDataModule(str(folder), batch_size=4, val_shards=3, val_batches=2)
    assert len(list(limited.val_dataloader())) == 2


def test_training_pass_reads_every_training_sample_once(shard_folder) -> None:
    folder, samples = shard_folder
    single = ActivationDataModule(str(folder), batch_size=4, val_shards=2)
    held_out = set(keys_of(single.val_dataloader()))
    everything = keys_of(single.train_pass_dataloader())
    assert sorted(everything) == sorted(set(samples) - held_out)  # each training sample once, no validation sample
    assert keys_of(single.train_pass_dataloader()) == everything  # deterministic: no shuffling, no resampling
    per_rank = []
    for rank in range(2):
        data = ActivationDataModule(str(folder), batch_size=4, val_shards=2, num_workers=2)
        attach_trainer(data, rank=rank, world=2)
        per_rank.append(keys_of(data.train_pass_dataloader()))
    assert not set(per_rank[0]) & set(per_rank[1]) and sorted(per_rank[0] + per_rank[1]) == sorted(everything)
    assert len(list(single.train_pass_dataloader(max_batches=3))) == 3


def test_token_level_batches_hold_exactly_the_stored_tokens(shard_folder) -> None:
    folder, samples = shard_folder
    data = ActivationDataModule(str(folder), batch_size=10, token_level=True, val_shards=2, steps_per_epoch=3,
                                shuffle_buffer=50)
    train = list(data.train_dataloader())
    assert len(train) == 3 and all(set(b) == {"act"} and b["act"].shape == (10, D) for b in train)
    assert all(b["act"].dtype == torch.float16 for b in train)  # as stored: the model converts on its device
    val_rows = torch.cat([batch["act"] for batch in data.val_dataloader()])  # [tokens, d]
    val_keys = [key for url in data.val_urls for key in shard_keys(url)]
    expected = np.concatenate([samples[key].act for key in val_keys])  # [tokens, d]
    assert Counter(map(tuple, val_rows.tolist())) == Counter(map(tuple, expected.tolist()))


def test_steps_subset(shard_folder) -> None:
    folder, samples = shard_folder
    data = ActivationDataModule(str(folder), batch_size=4, val_shards=3, steps=[0, 2])
    kept = keys_of(data.val_dataloader())
    all_val = [key for url in data.val_urls for key in shard_keys(url)]
    assert sorted(kept) == sorted(key for key in all_val if samples[key].meta["step"] in (0, 2))
    with pytest.raises(ValueError, match=r"data.steps must lie in 0..2"):
        ActivationDataModule(str(folder), steps=[3])


def test_brace_pattern_and_pipe_urls_read_the_same_data(shard_folder) -> None:
    folder, _ = shard_folder
    reference = ActivationDataModule(str(folder), batch_size=4, val_shards=2)
    expected = keys_of(reference.val_dataloader())
    manifest = str(folder / "manifest.json")
    names = [record.name for record in ShardManifest.load(folder).shards]
    pattern = f"{folder}/shard-r{{0..1}}-{{000000..000002}}.tar"
    assert len(names) == 6
    pipes = [f"pipe:cat {folder / name}" for name in names]
    for shards in (pattern, "::".join(pipes), pipes):
        data = ActivationDataModule(shards, manifest=manifest, batch_size=4, val_shards=2)
        assert keys_of(data.val_dataloader()) == expected


def test_trainer_without_reloading_dataloaders_gets_a_warning(shard_folder) -> None:
    folder, _ = shard_folder
    data = ActivationDataModule(str(folder))
    attach_trainer(data, reload=0)
    with pytest.warns(UserWarning, match="reload_dataloaders_every_n_epochs=1"):
        data.train_dataloader()


class RecordKeys(pl.LightningModule):
    """Records the keys of each training batch per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(D, 1)
        self.seen: dict[int, list[str]] = {}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.setdefault(self.current_epoch, []).extend(batch["key"])
        return self.layer(batch["act"].float()).mean()  # batches come float16, as stored

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader`")
def test_lightning_fit_reads_the_epoch_from_the_trainer(shard_folder) -> None:
    folder, _ = shard_folder
    model = RecordKeys()
    trainer = pl.Trainer(max_epochs=2, reload_dataloaders_every_n_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, ActivationDataModule(str(folder), batch_size=4, steps_per_epoch=3, val_fraction=0.0))
    for epoch in range(2):
        data = ActivationDataModule(str(folder), batch_size=4, steps_per_epoch=3, val_fraction=0.0)
        attach_trainer(data, epoch=epoch)
        assert model.seen[epoch] == keys_of(data.train_dataloader())


def copy_folder(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_input_errors_are_one_sentence(shard_folder, tmp_path: Path) -> None:
    folder, _ = shard_folder
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        ActivationDataModule(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        ActivationDataModule(str(tmp_path / "empty"))
    broken = copy_folder(folder, tmp_path / "broken")
    (broken / "shard-r1-000000.tar").unlink()
    with pytest.raises(FileNotFoundError, match="lists shard shard-r1-000000.tar, but .* is missing"):
        ActivationDataModule(str(broken))
    empty_manifest = tmp_path / "no-shards"
    replace(ShardManifest.load(folder), shards=[]).save(empty_manifest)
    with pytest.raises(ValueError, match="lists no shards"):
        ActivationDataModule(str(empty_manifest))
    with pytest.raises(ValueError, match="data.val_batches must be a positive integer, got 0"):
        ActivationDataModule(str(folder), val_batches=0)
    with pytest.raises(ValueError, match="data.manifest is required"):
        ActivationDataModule(f"{folder}/shard-r0-{{000000..000002}}.tar")
    with pytest.raises(ValueError, match="must leave at least one of the 6 shards"):
        ActivationDataModule(str(folder), val_shards=6)
    data = ActivationDataModule(str(folder), val_shards=1)
    attach_trainer(data, world=2)
    with pytest.raises(ValueError, match="1 validation shards cannot give each of the 2 processes one"):
        data.val_dataloader()


def test_labels_outside_the_vocabulary_name_the_shard(shard_folder, tmp_path: Path) -> None:
    folder, _ = shard_folder
    narrowed = copy_folder(folder, tmp_path / "narrowed")
    manifest = ShardManifest.load(narrowed)
    manifest.concepts = ConceptVocabulary(objects=("Bears", "Cats"), styles=manifest.concepts.styles)
    manifest.save(narrowed)
    data = ActivationDataModule(str(narrowed), val_shards=5)
    with pytest.raises(ValueError, match=r"Shard .*shard-r0-\d+.tar sample \d+_\d+: Unknown object 'Dogs'"):
        list(data.val_dataloader())


@pytest.mark.parametrize(("cut", "message"), [
    ("inside_a_header", r"could not be read \(ReadError\); it is truncated or corrupt"),
    ("inside_data", r"could not be read \(ReadError\); it is truncated or corrupt"),
    ("after_the_second_sample", r"holds 2 samples but the manifest lists \d+"),
])
def test_truncated_shard_fails_naming_it(shard_folder, tmp_path: Path, cut: str, message: str) -> None:
    """Damaged shards stop the run (the documented choice), however the file was cut."""
    folder, _ = shard_folder
    damaged = copy_folder(folder, tmp_path / "damaged")
    shard = damaged / "shard-r0-000000.tar"
    with tarfile.open(shard) as archive:
        members = archive.getmembers()  # two files per sample: act.npy, json
    keep_bytes = {"inside_a_header": members[1].offset + 100, "inside_data": members[2].offset_data + 10,
                  "after_the_second_sample": members[4].offset}[cut]
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:keep_bytes])
    with pytest.raises(ValueError, match=f"Shard {shard} has {keep_bytes} bytes but the manifest lists {size}; it is "
                                         "truncated or was replaced."):
        ActivationDataModule(str(damaged), val_fraction=0.0)  # the manifest's file sizes: refused before training

    manifest = ShardManifest.load(damaged)  # without file sizes (older manifests), it is found when read
    manifest.shards = [replace(record, num_bytes=None) for record in manifest.shards]
    manifest.save(damaged)
    for url in (str(shard), f"pipe:cat {shard}"):  # read with random access, and as a stream
        data = ActivationDataModule(str(damaged), val_fraction=0.0)
        data.train_urls = [url]  # read only the damaged shard
        with pytest.raises(ValueError, match=f"Shard {url} {message}"):
            list(data.train_dataloader())


def test_token_pool_emits_every_token_once_in_mixed_batches():
    import numpy as np

    from datamodules.batches import token_batches

    maps = [np.full((4, 2), value, dtype=np.float16) + np.arange(4, dtype=np.float16)[:, None] * 0.25
            for value in range(10)]  # 10 samples × 4 distinct tokens
    samples = ({"act": act} for act in maps)
    batches = list(token_batches(samples, batch_size=6, width=2, buffer=12, rng=np.random.default_rng(0),
                                 partial_batches=True))
    assert [len(b["act"]) for b in batches] == [6] * 6 + [4]
    emitted = sorted(map(tuple, torch.cat([b["act"] for b in batches]).tolist()))
    assert emitted == sorted(map(tuple, np.concatenate(maps).tolist()))
    in_order = np.concatenate(maps)  # [40, 2]
    assert not np.array_equal(torch.cat([b["act"] for b in batches]).numpy(), in_order)  # shuffled
    # Without a generator the tokens come in stream order, the last batch partial.
    ordered = list(token_batches(({"act": act} for act in maps), batch_size=6, width=2, buffer=0, rng=None,
                                 partial_batches=True))
    assert np.array_equal(torch.cat([b["act"] for b in ordered]).numpy(), in_order) and len(ordered[-1]["act"]) == 4


def stored_maps(shards: list[str]) -> dict[str, np.ndarray]:
    """Independent reader: every `act.npy` member of the shards, by sample key, read with tarfile and np.load."""
    maps = {}
    for shard in shards:
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                if member.name.endswith(".act.npy"):
                    maps[member.name.split(".")[0]] = np.load(io.BytesIO(archive.extractfile(member).read()))
    return maps


def test_local_shards_deliver_the_stored_maps_and_each_token_once_per_pass(shard_folder) -> None:
    """Map batches equal the members' `np.load`; a shuffled pass over local shards delivers every stored token once,
    drawing each batch from several maps, as a function of the generator's seed."""
    from datamodules.batches import token_batches
    from saemnesia.shard_reading import shard_samples

    folder, _ = shard_folder
    data = ActivationDataModule(str(folder), batch_size=4, val_shards=3)
    stored = stored_maps(data.val_urls)
    batches = list(data.val_dataloader())
    assert sorted(keys_of(batches)) == sorted(stored)
    for batch in batches:
        for key, act in zip(batch["key"], batch["act"]):
            np.testing.assert_array_equal(act.numpy(), stored[key])

    def shuffled_pass(seed: int) -> list[np.ndarray]:
        samples = ({"act": sample["act.npy"]} for url in data.val_urls for sample in shard_samples(url))
        return [batch["act"].numpy() for batch in token_batches(samples, batch_size=6, width=D, buffer=20,
                                                                rng=np.random.default_rng(seed), partial_batches=True)]

    delivered = shuffled_pass(seed=0)
    expected = np.concatenate([stored[key] for key in stored])  # [tokens, d]
    assert Counter(map(tuple, np.concatenate(delivered).tolist())) == Counter(map(tuple, expected.tolist()))
    assert all(len(batch) == 6 for batch in delivered[:-1]) and 0 < len(delivered[-1]) <= 6
    map_of_token = {tuple(token): key for key in stored for token in stored[key].tolist()}
    assert max(len({map_of_token[tuple(token)] for token in batch.tolist()}) for batch in delivered) > 2
    assert all(np.array_equal(a, b) for a, b in zip(shuffled_pass(seed=0), delivered))
    assert not all(np.array_equal(a, b) for a, b in zip(shuffled_pass(seed=1), delivered))


def test_a_shard_replaced_under_its_name_is_read_anew(shard_folder, tmp_path: Path) -> None:
    """Local shards stay mapped between reads; a shard renamed into place over one read before is read again."""
    folder, _ = shard_folder
    copied = copy_folder(folder, tmp_path / "copied")
    data = ActivationDataModule(str(copied), batch_size=4, val_shards=3)
    before = list(data.val_dataloader())
    other = tmp_path / "other"
    write_synthetic_shards(other, num_prompts=16, num_steps=3, ranks=2, samples_per_shard=7, seed=1)
    replaced = Path(data.val_urls[0])
    shutil.copy(other / replaced.name, tmp_path / "incoming.tar")
    os.replace(tmp_path / "incoming.tar", replaced)
    after = list(data.val_dataloader())
    assert keys_of(after) == keys_of(before)
    stored = stored_maps([str(replaced)])
    for batch in after:
        for key, act in zip(batch["key"], batch["act"]):
            if key in stored:
                np.testing.assert_array_equal(act.numpy(), stored[key])
    assert not all(torch.equal(a["act"], b["act"]) for a, b in zip(before, after))


def test_corrupt_local_shard_fails_naming_it(shard_folder, tmp_path: Path) -> None:
    folder, _ = shard_folder
    damaged = copy_folder(folder, tmp_path / "damaged")
    shard = damaged / "shard-r1-000001.tar"
    contents = bytearray(shard.read_bytes())
    with tarfile.open(shard) as archive:
        second_header = archive.getmembers()[2].offset
    contents[second_header + 3] ^= 1  # a name byte: the header's checksum no longer matches
    shard.write_bytes(bytes(contents))
    data = ActivationDataModule(str(damaged), val_fraction=0.0)
    data.train_urls = [str(shard)]
    with pytest.raises(ValueError, match=rf"Shard {shard} could not be read \(ReadError\); it is truncated or corrupt"):
        list(data.train_dataloader())


def test_batch_memory_is_reused_only_after_the_consumer_lets_go():
    """A dropped batch's memory is filled again (kept by the buffers: an allocation in between cannot take it); a
    batch still used, even only through a view or a numpy array of it, keeps its values while later batches are made."""
    from datamodules.batches import BatchBuffers, token_batches

    buffers = BatchBuffers()
    dropped = buffers.take(256, 64)  # 32 KiB
    address = dropped.data_ptr()
    del dropped
    decoy = np.ones((256, 64), np.float16)  # would take the freed block, were it freed
    assert buffers.take(256, 64).data_ptr() == address != decoy.ctypes.data

    maps = [np.arange(value * 8, value * 8 + 8, dtype=np.float16).reshape(4, 2) for value in range(30)]  # distinct
    batches = token_batches(({"act": act} for act in maps), batch_size=4, width=2, buffer=8,
                            rng=np.random.default_rng(0), partial_batches=False)
    first = next(batches)["act"]
    kept_view, kept_array = first[1:], first.numpy()[:2]
    expected_view, expected_array = kept_view.clone(), kept_array.copy()
    del first
    for _ in range(10):  # later batches, made while the view and the array are in use
        next(batches)
    assert torch.equal(kept_view, expected_view) and np.array_equal(kept_array, expected_array)
