"""`ActivationDataModule`: streams cached activation shards (docs/method.md §8) into SAE training.

Training reads an endless stream of resampled shards in every rank and worker, cut to exactly `steps_per_epoch`
batches per process, so DDP ranks always run the same number of steps and never hang on an uneven split. The
stream of epoch `e` is a function of `(seed, e, rank)` (and the fixed `num_workers`). Validation is a finite,
deterministic pass: validation shards are dealt to ranks (`i % world_size`) and then to workers.

A shard that cannot be read, or holds a different number of samples than the manifest lists, stops the run
with an error naming it (never skipped): shards are renamed into place only when complete, so a damaged one means
the data needs repair, not silent shrinkage.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from functools import partial
from itertools import islice
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import webdataset as wds
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from datamodules.batches import BatchBuffers, collate_samples, token_batches
from saemnesia.concepts import ConceptVocabulary
from saemnesia.shard_reading import is_url, shard_samples
from saemnesia.shards import ShardManifest, shard_location

SHARD_NAME = re.compile(r"[^/\s]+\.tar")


def shard_name(url: str) -> str:
    """The shard file name inside a path, URL or `pipe:` command (the last `*.tar` token)."""
    names = SHARD_NAME.findall(url)
    if not names:
        raise ValueError(f"Shard URL {url!r} names no .tar file; expected e.g. /data/shard-r0-000000.tar.")
    return names[-1]


def worker_info() -> tuple[int, int]:
    """(worker id, number of workers) of the DataLoader worker running this code."""
    _, _, worker, num_workers = wds.utils.pytorch_worker_info()
    return worker, num_workers


def stream_seed(seed: int, epoch: int, rank: int, stage: int) -> int:
    """Seed of one random stage of this worker: distinct per (seed, epoch, rank, worker, stage), else identical."""
    return wds.utils.make_seed(seed, epoch, rank, worker_info()[0], stage)


def resample_shards(urls: list[str], seed: int, epoch: int, rank: int) -> Iterator[dict]:
    """Endless shard draws with replacement, restarting identically on every iteration.

    (`wds.ResampledShards` counts its iterations into the seed, so a loader that is iterated twice would not
    repeat its stream.)
    """
    rng = random.Random(stream_seed(seed, epoch, rank, stage=0))
    while True:
        yield {"url": rng.choice(urls)}


def read_shards(shards: Iterator[dict], expected: dict[str, int]) -> Iterator[dict]:
    """Samples of each shard, checking it is readable and holds the number of samples the manifest lists."""
    for shard in shards:
        url, count = shard["url"], 0
        try:
            for sample in shard_samples(url):
                count += 1
                yield sample
        except OSError as error:  # a missing file, or a `pipe:` command or download (curl) that failed
            raise ValueError(f"Shard {url} could not be opened or downloaded ({error}).") from error
        except Exception as error:  # tarfile and decoding errors of a damaged file
            raise ValueError(f"Shard {url} could not be read ({type(error).__name__}); "
                             "it is truncated or corrupt.") from error
        if count != expected[shard_name(url)]:
            raise ValueError(f"Shard {url} holds {count} samples but the manifest lists "
                             f"{expected[shard_name(url)]}; it is truncated or was replaced.")


def label_sample(sample: dict, vocabulary: ConceptVocabulary, shape: tuple[int, int]) -> dict:
    """Decoded shard sample → `{act: float16 [N, d], object, style, step, key}` with integer labels."""
    meta, act, where = sample["json"], sample["act.npy"], f"Shard {sample['__url__']} sample {sample['__key__']}"
    if act.shape != shape or act.dtype != np.float16:
        raise ValueError(f"{where} has activations {act.dtype}{list(act.shape)}; "
                         f"the manifest says float16{list(shape)}.")
    try:
        labels = vocabulary.object_index(meta["object"]), vocabulary.style_index(meta["style"])
    except KeyError as error:
        raise ValueError(f"{where}: {error.args[0]}") from None
    return {"act": act, "object": labels[0], "style": labels[1], "step": int(meta["step"]), "key": sample["__key__"]}


def step_is_kept(sample: dict, steps: frozenset[int]) -> bool:
    return sample["step"] in steps


def seeded_shuffle(items: Iterator, buffer: int, seed: int, epoch: int, rank: int) -> Iterator:
    """Webdataset's buffer shuffle, seeded per worker (the worker id is only known inside the worker)."""
    return wds.shuffle(buffer, initial=buffer, seed=stream_seed(seed, epoch, rank, stage=1))(items)


def seeded_token_batches(samples: Iterator[dict], batch_size: int, width: int, buffer: int, seed: int, epoch: int,
                         rank: int) -> Iterator[dict]:
    """`token_batches` drawn with this worker's generator (the worker id is only known inside the worker)."""
    rng = np.random.default_rng(stream_seed(seed, epoch, rank, stage=1))
    return token_batches(samples, batch_size, width, buffer, rng, partial_batches=False)


def take_worker_share(batches: Iterator, total: int) -> Iterator:
    """This worker's share of `total` batches; the DataLoader's round robin over workers then yields `total`."""
    worker, num_workers = worker_info()
    share = total // num_workers + int(worker < total % num_workers)
    return islice(batches, share)


class ActivationDataModule(pl.LightningDataModule):
    """Activation shards as batches of samples (`{act [B, N, d], object, style, step, key}`) or of tokens
    (`{act [batch_size, d]}`). `act` is float16, as stored: the model converts it to its own dtype on its device
    (`SAEModule.on_after_batch_transfer`), so workers and the host-to-device copy move half the bytes of float32."""

    def __init__(self, shards: str | list[str], manifest: str | None = None, batch_size: int = 128,
                 token_level: bool = False, steps_per_epoch: int = 1000, val_fraction: float = 0.1,
                 val_shards: int | None = None, val_batches: int | None = None, shuffle_buffer: int = 1000,
                 num_workers: int = 0, seed: int = 0, steps: list[int] | None = None):
        """
        Args:
            shards: A shard folder holding `manifest.json`, as a path or a URL (`https://host/activations`), or
                shard URLs: a brace pattern (`/data/shard-r{0..3}-{000000..000009}.tar`, `http://…`), `pipe:`
                commands, `::`-joined patterns or a list. URLs are read with curl, as webdataset does.
            manifest: The manifest file or its folder, as a path or URL; required when `shards` is not a folder.
            batch_size: Samples per batch, or tokens per batch when `token_level`.
            token_level: Stream single tokens (labels dropped) for the unsupervised objective.
            steps_per_epoch: Training batches per epoch and process; the training stream is endless otherwise.
            val_fraction: Share of the shards held out for validation (at least one when > 0).
            val_shards: Number of validation shards; overrides `val_fraction`.
            val_batches: At most this many validation batches per process; `None` reads all validation shards.
            shuffle_buffer: Shuffle buffer, in samples (or in tokens when `token_level`).
            num_workers: DataLoader worker processes per rank.
            seed: Seed of the training stream (combined with epoch, rank and worker).
            steps: Sampling steps to keep (each in `0..num_steps-1`); `None` keeps all.
        """
        super().__init__()
        for name, value in (("batch_size", batch_size), ("steps_per_epoch", steps_per_epoch),
                            ("shuffle_buffer", shuffle_buffer), ("val_batches", val_batches)):
            if value is not None and value < 1:
                raise ValueError(f"data.{name} must be a positive integer, got {value}.")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}.")
        self.batch_size, self.token_level, self.steps_per_epoch = batch_size, token_level, steps_per_epoch
        self.val_batches, self.shuffle_buffer = val_batches, shuffle_buffer
        self.num_workers, self.seed = num_workers, seed
        self.manifest, urls = self._resolve(shards, manifest)
        if steps is not None and not all(0 <= step < self.num_steps for step in steps):
            raise ValueError(f"data.steps must lie in 0..{self.num_steps - 1} (the manifest's num_steps), got {steps}.")
        self.steps = None if steps is None else frozenset(steps)
        self.train_urls, self.val_urls = self._split(urls, val_fraction, val_shards)

    @staticmethod
    def _resolve(shards: str | list[str], manifest_path: str | None) -> tuple[ShardManifest, list[str]]:
        """The manifest and the shard URLs, checked against each other."""
        if isinstance(shards, str) and not SHARD_NAME.search(shards) and not shards.startswith("pipe:"):  # a folder
            manifest = ShardManifest.load(manifest_path or shards)
            urls = [shard_location(shards, record.name) for record in manifest.shards]
        elif manifest_path is None:
            raise ValueError(f"data.manifest is required when data.shards ({shards!r}) is not a shard folder: give "
                             "the folder (a path or URL holding manifest.json), or the manifest's path or URL.")
        else:
            manifest = ShardManifest.load(manifest_path)
            urls = wds.shardlists.expand_source(shards)
        if not urls:
            raise ValueError(f"Shard manifest for {shards!r} lists no shards; activation caching wrote nothing.")
        listed = {record.name: record for record in manifest.shards}
        for url in urls:
            record = listed.get(shard_name(url))
            if record is None:
                raise ValueError(f"Shard {url} is not listed in the manifest of {shards!r}.")
            if is_url(url):
                continue  # checked as it is read
            if not Path(url).is_file():
                raise FileNotFoundError(f"The manifest of {shards!r} lists shard {record.name}, but {url} is missing.")
            size = Path(url).stat().st_size
            if record.num_bytes is not None and size != record.num_bytes:
                raise ValueError(f"Shard {url} has {size} bytes but the manifest lists {record.num_bytes}; it is "
                                 "truncated or was replaced.")
        return manifest, sorted(urls, key=shard_name)

    @staticmethod
    def _split(urls: list[str], val_fraction: float, val_shards: int | None) -> tuple[list[str], list[str]]:
        """Hold out evenly spaced shards (by name), so validation covers every rank and position of the caching run."""
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}.")
        count = val_shards if val_shards is not None else max(round(val_fraction * len(urls)), int(val_fraction > 0))
        if not 0 <= count < len(urls):
            raise ValueError(f"data.val_shards={count} must leave at least one of the {len(urls)} shards for training.")
        held_out = {int((i + 0.5) * len(urls) / count) for i in range(count)}
        return ([url for i, url in enumerate(urls) if i not in held_out],
                [url for i, url in enumerate(urls) if i in held_out])

    @property
    def d_in(self) -> int:
        return self.manifest.d_in

    @property
    def hookpoint(self) -> str:
        return self.manifest.hookpoint

    @property
    def vocabulary(self) -> ConceptVocabulary:
        return self.manifest.concepts

    @property
    def num_steps(self) -> int:
        return self.manifest.num_steps

    @property
    def tokens_per_sample(self) -> int:
        return self.manifest.tokens_per_sample

    def _rank_and_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _samples_and_batches(self, shard_source: list, epoch: int | None) -> list:
        """Stages from opened shards to collated batches, shuffled with the stream of `epoch` unless it is None
        (validation: a finite pass in order)."""
        expected = {record.name: record.num_samples for record in self.manifest.shards}
        shape = (self.tokens_per_sample, self.d_in)
        stages = [*shard_source, partial(read_shards, expected=expected),
                  wds.map(partial(label_sample, vocabulary=self.vocabulary, shape=shape))]
        if self.steps is not None:
            stages.append(wds.select(partial(step_is_kept, steps=self.steps)))
        rank, _ = self._rank_and_world()
        stream = dict(seed=self.seed, epoch=epoch, rank=rank)
        if self.token_level and epoch is None:
            return [*stages, partial(token_batches, batch_size=self.batch_size, width=self.d_in, buffer=0, rng=None,
                                     partial_batches=True)]
        if self.token_level:
            return [*stages, partial(seeded_token_batches, batch_size=self.batch_size, width=self.d_in,
                                     buffer=self.shuffle_buffer, **stream)]
        shuffle = [] if epoch is None else [partial(seeded_shuffle, buffer=self.shuffle_buffer, **stream)]
        collate = partial(collate_samples, buffers=BatchBuffers())
        return [*stages, *shuffle, wds.batched(self.batch_size, collation_fn=collate, partial=epoch is None)]

    def _loader(self, pipeline: wds.DataPipeline) -> DataLoader:
        # Batches are made in the pipeline; fresh workers per epoch keep each epoch's stream seeded by its epoch.
        return DataLoader(pipeline, batch_size=None, num_workers=self.num_workers, persistent_workers=False)

    def train_dataloader(self) -> DataLoader:
        epoch = 0 if self.trainer is None else self.trainer.current_epoch
        if self.trainer is not None and self.trainer.reload_dataloaders_every_n_epochs != 1:
            rank_zero_warn("ActivationDataModule seeds each epoch's stream in train_dataloader(); set "
                           "trainer.reload_dataloaders_every_n_epochs=1 or every epoch repeats the first one's data.")
        rank, _ = self._rank_and_world()
        shards = partial(resample_shards, self.train_urls, self.seed, epoch, rank)
        stages = self._samples_and_batches([shards], epoch)
        return self._loader(wds.DataPipeline(*stages, partial(take_worker_share, total=self.steps_per_epoch)))

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_urls:
            return []
        return self._single_pass(self.val_urls, self.val_batches, "validation shards",
                                 remedy="raise data.val_shards or data.val_fraction")

    def train_pass_dataloader(self, max_batches: int | None = None) -> DataLoader:
        """One pass over the training shards in order, each read once (no resampling, no shuffle), dealt to ranks
        like validation, at most `max_batches` per process: estimates over the training set (the supervised
        objective's concept assignment) weigh every image equally, where the resampled stream draws a few shards
        several times and misses others."""
        return self._single_pass(self.train_urls, max_batches, "training shards",
                                 remedy="cache more shards or run fewer processes")

    def _single_pass(self, urls: list[str], max_batches: int | None, what: str, remedy: str) -> DataLoader:
        rank, world = self._rank_and_world()
        if len(urls) < world:
            raise ValueError(f"{len(urls)} {what} cannot give each of the {world} processes one; {remedy}.")
        shards = [wds.SimpleShardList(urls[rank::world]), wds.split_by_worker]
        stages = self._samples_and_batches(shards, epoch=None)
        if max_batches is not None:
            stages.append(partial(take_worker_share, total=max_batches))
        return self._loader(wds.DataPipeline(*stages))
