"""Activation streaming: bytes per second the ActivationDataModule delivers, against raw reads of the same shards.

It writes SD1.5-sized shards (float16 `[256, 1280]` maps, one per image and step) to a temporary folder, then, in
one process and on the same files (in the page cache after writing):
1. raw read: every shard file read sequentially into one reused buffer, the ceiling of any reader;
2. plain tarfile: every member of every shard read with the standard library's `tarfile` (no decoding);
3. the datamodule's training stream as SAE training sees it (resampled shards, shuffle buffer, float16 batches),
   token-level (unsupervised objective) and map-level (supervised), for each DataLoader worker count. An epoch
   delivers about the folder's payload once and includes starting the workers and filling the shuffle buffer.
Figures 1-2 are MB/s of shard-file bytes; figure 3 counts the float16 activation payload of the delivered batches
(the stored bytes, which the batches hold as they are). `vs_raw` = stream MB/s ÷ raw-read MB/s (target ≥ 0.8), and
`vs_raw_just_before` the same against a raw read timed just before the stream (its speed varies by half with the
load of the other cores); `s_per_batch` = seconds per delivered batch. Local shards stay mapped in each process
(`saemnesia.shard_reading.mapped_shard`), so the timed epochs (after `warmup`) of 0 workers copy the bytes without
mapping them again; workers, started afresh every epoch, inherit the main process's mappings and map other shards
anew. The last line is one JSON object with every figure.

    python -m benchmarks.stream
    python -m benchmarks.stream --samples 2048 --workers '[0, 4, 8]'
    python -m benchmarks.stream --d 64 --side 4 --samples 3000 --samples_per_shard 300  # ToyCanvas-sized maps
"""

from __future__ import annotations

import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import benchmark_main, machine_description, time_call
from datamodules.activations import ActivationDataModule
from saemnesia.concepts import UNLEARNCANVAS_OBJECTS, ConceptVocabulary
from saemnesia.shards import ShardManifest, ShardSink, sample_key

HOOKPOINT = "unet.up_blocks.1.attentions.1"
READ_BUFFER = 1 << 20  # bytes per read of the raw baseline


@dataclass
class StreamBenchmarkConfig:
    """Sizes and settings of one run (command-line options of the same names)."""

    d: int = 1280
    """Channels per token (SD1.5 up_blocks.1.attentions.1: 1280)."""
    side: int = 16
    """Height and width of each map: `side²` tokens per sample (16 at 512 px)."""
    samples: int = 320
    """Maps written; 320 × 640 KiB ≈ 210 MB at the default sizes."""
    samples_per_shard: int = 32
    """Maps per shard file."""
    token_batch: int = 4096
    """Tokens per batch of the token-level stream (published: 4096)."""
    map_batch: int = 16
    """Maps per batch of the map-level stream."""
    token_buffer: int = 8192
    """Shuffle buffer of the token-level stream, in tokens."""
    map_buffer: int = 32
    """Shuffle buffer of the map-level stream, in maps."""
    workers: list[int] = field(default_factory=lambda: [0, 1, 2])
    """DataLoader worker counts to measure."""
    repeats: int = 2
    """Timed passes of each measurement."""
    warmup: int = 1
    """Untimed passes before them."""
    seed: int = 0
    """Seed of the activations and of the streams."""

    def __post_init__(self) -> None:
        # Sizes are checked by ShardSink, batches, buffers and workers by ActivationDataModule, --repeats by time_call.
        if self.samples < 2 * self.samples_per_shard:
            raise ValueError(f"--samples ({self.samples}) must fill at least two shards of --samples_per_shard "
                             f"({self.samples_per_shard}).")

    @property
    def tokens_per_sample(self) -> int:
        return self.side * self.side


def write_shards(config: StreamBenchmarkConfig, folder: Path) -> list[Path]:
    """Random float16 maps in shards of `samples_per_shard` (one prompt per map) plus `manifest.json`."""
    vocabulary = ConceptVocabulary(objects=UNLEARNCANVAS_OBJECTS, styles=())
    rng = np.random.default_rng(config.seed)
    with ShardSink(folder, "shard-r0", config.tokens_per_sample, config.d, max_samples=config.samples_per_shard,
                   max_bytes=1 << 40, vocabulary=vocabulary) as sink:
        for index in range(config.samples):
            act = rng.standard_normal((config.tokens_per_sample, config.d), dtype=np.float32)  # [N, d]
            meta = {"object": vocabulary.objects[index % len(vocabulary.objects)], "style": None, "step": 0,
                    "timestep": 999, "prompt_id": index, "prompt": "", "seed": 0, "hookpoint": HOOKPOINT,
                    "half": "cond"}
            sink.write(sample_key(index, 0), act, meta)
    ShardManifest(HOOKPOINT, config.d, config.tokens_per_sample, 1, vocabulary, sink.close()).save(folder)
    return sorted(folder.glob("*.tar"))


def raw_read(paths: list[Path]) -> int:
    """Read every file sequentially into one reused buffer (no Python object per chunk); returns the bytes read."""
    buffer, total = bytearray(READ_BUFFER), 0
    for path in paths:
        with open(path, "rb", buffering=0) as stream:
            while count := stream.readinto(buffer):
                total += count
    return total


def tarfile_read(paths: list[Path]) -> int:
    """Read every member of every shard with `tarfile`; returns the member bytes read."""
    total = 0
    for path in paths:
        with tarfile.open(path, mode="r:") as archive:
            for member in archive:
                if member.isreg():
                    total += len(archive.extractfile(member).read())
    return total


def stream_read(data: ActivationDataModule) -> int:
    """One training epoch of the datamodule; returns the float16 bytes of the delivered activations."""
    return sum(batch["act"].nbytes for batch in data.train_dataloader())


def megabytes_per_second(read: Callable[[], int], config: StreamBenchmarkConfig) -> float:
    """MB/s of `read()` (which returns the bytes it read), over `repeats` timed calls after `warmup`."""
    totals: list[int] = []  # every pass reads the same bytes: the streams are seeded
    timing = time_call(lambda: totals.append(read()), warmup=config.warmup, repeats=config.repeats)
    return totals[-1] / timing.per_call / 1e6


def datamodule(config: StreamBenchmarkConfig, folder: Path, token_level: bool, workers: int) -> ActivationDataModule:
    """The training stream of `folder`, cut to epochs that deliver about the folder's payload once."""
    maps_per_batch = config.token_batch / config.tokens_per_sample if token_level else config.map_batch
    return ActivationDataModule(str(folder), batch_size=config.token_batch if token_level else config.map_batch,
                                token_level=token_level, val_fraction=0.0, num_workers=workers, seed=config.seed,
                                steps_per_epoch=max(round(config.samples / maps_per_batch), 1),
                                shuffle_buffer=config.token_buffer if token_level else config.map_buffer)


def run_benchmark(config: StreamBenchmarkConfig) -> dict[str, Any]:
    """The baselines and every stream on freshly written shards; returns the JSON-ready report."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        paths = write_shards(config, folder)
        baselines = {"raw_read_MB_per_s": megabytes_per_second(lambda: raw_read(paths), config),
                     "tarfile_MB_per_s": megabytes_per_second(lambda: tarfile_read(paths), config)}
        print(f"{len(paths)} shards, {sum(path.stat().st_size for path in paths) / 1e6:.0f} MB of "
              f"[{config.tokens_per_sample}, {config.d}] float16 maps: raw read {baselines['raw_read_MB_per_s']:.0f} "
              f"MB/s, plain tarfile {baselines['tarfile_MB_per_s']:.0f} MB/s")
        streams: dict[str, dict[str, float]] = {}
        for level in ("token", "map"):
            for workers in config.workers:
                data = datamodule(config, folder, level == "token", workers)
                raw = megabytes_per_second(lambda: raw_read(paths), config)
                speed = megabytes_per_second(lambda: stream_read(data), config)
                ratio = speed / baselines["raw_read_MB_per_s"]
                tokens_per_batch = data.batch_size * (1 if level == "token" else config.tokens_per_sample)
                seconds_per_batch = tokens_per_batch * config.d * 2 / (speed * 1e6)  # float16 payload / speed
                streams[f"{level}_workers{workers}"] = {
                    "MB_per_s": speed, "vs_raw": ratio, "raw_just_before_MB_per_s": raw,
                    "vs_raw_just_before": speed / raw, "vs_tarfile": speed / baselines["tarfile_MB_per_s"],
                    "s_per_batch": seconds_per_batch}
                print(f"{level}-level stream, {workers} workers: {speed:.0f} MB/s delivered, {ratio:.3f} of the raw "
                      f"read, {speed / raw:.3f} of one timed just before ({raw:.0f} MB/s) (target >= 0.8), "
                      f"{seconds_per_batch * 1e3:.1f} ms per batch")
    return {"benchmark": "stream", "config": asdict(config), "machine": machine_description("cpu"),
            "baselines": baselines, "streams": streams}


main = benchmark_main(StreamBenchmarkConfig, run_benchmark, __doc__)


if __name__ == "__main__":
    main()
