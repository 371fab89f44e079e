"""Cost of activation caching: generation with capture and shard writing against plain generation of the same prompts.

Two measurements in one process:
1. the tiny pipeline end to end: `HookedDiffusion.generate` + `write_samples` into a `ShardSink` against
   `generate` without capture (target: overhead ≤ 10 %);
2. the capture + write path alone at SD1.5 size: a `[B, 1280, 16, 16]` block output per step, moved to float16 on
   the CPU by `ActivationCapture` and written by `write_samples`, per step and per image (× the step count).
The last line is one JSON object with every figure.

    python -m benchmarks.cache_overhead                     # CPU, tiny pipeline built on the fly
    python -m benchmarks.cache_overhead --device cuda --pipeline /path/to/sd15 --height 512 --width 512
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import count
from pathlib import Path
from typing import Any, Literal

import torch

from benchmarks.common import benchmark_main, machine_description, time_call
from callbacks.shard_writer import write_samples
from saemnesia.generation import CaptureConfig, GenerationOutput, HookedDiffusion, PromptItem
from saemnesia.hooks import ActivationCapture, HookContext
from saemnesia.pipelines import save_tiny_pipeline
from saemnesia.shards import ShardSink

HOOKPOINT = "unet.up_blocks.1.attentions.1"
PROMPTS = ("An image of Bears in Cubism style.", "An image of Cats.", "An image of Dogs in Van Gogh style.")


@dataclass
class BenchmarkConfig:
    """Sizes and settings of one benchmark run (command-line options of the same names)."""

    pipeline: str | None = None
    """Diffusers pipeline folder; `None` builds the tiny test pipeline in a temporary folder."""
    batch_size: int = 8
    """Prompts per generation."""
    num_steps: int = 20
    """DDIM steps per generation (all captured)."""
    height: int = 64
    """Image height in pixels (64: the tiny pipeline's 4×4 tokens at the hookpoint)."""
    width: int = 64
    """Image width in pixels."""
    repeats: int = 3
    """Timed generations per path."""
    warmup: int = 1
    """Untimed generations per path before them."""
    payload_batch: int = 8
    """Images per step of the SD1.5-sized payload."""
    payload_channels: int = 1280
    """Channels of the payload's block output (SD1.5 up_blocks.1.attentions.1: 1280)."""
    payload_side: int = 16
    """Height and width of the payload's block output (16 at 512 px)."""
    payload_steps: int = 10
    """Steps per timed payload run; per-image figures are scaled to `published_steps`."""
    published_steps: int = 50
    """Sampling steps of the published caching run, for the per-image figure."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where generation runs and where the payload's block output lives."""
    threads: int | None = None
    """CPU threads for torch (`None` keeps torch's default)."""


def prompt_items(batch_size: int) -> Iterator[list[PromptItem]]:
    """Endless batches with fresh prompt ids (a shard sink refuses repeated keys), the same for every caller."""
    for call in count():
        yield [PromptItem(f"bench-{call}-{i}", PROMPTS[i % len(PROMPTS)], "Bears", None, 0) for i in range(batch_size)]


def tiny_overhead(config: BenchmarkConfig, pipeline: str, folder: Path) -> dict[str, float]:
    """Seconds per batch of `pipeline`'s plain generation and of generation with capture and shard writing."""
    options = dict(hookpoint=HOOKPOINT, num_steps=config.num_steps, height=config.height, width=config.width)
    plain = HookedDiffusion(pipeline, **options).to(config.device)
    hooked = HookedDiffusion(pipeline, capture=CaptureConfig(), **options).to(config.device)
    plain.setup("predict")
    hooked.setup("predict")
    _, _, tokens, channels = hooked.generate(next(prompt_items(1))).activations.shape  # [1, S, H*W, C]
    sink = ShardSink(folder, "bench", tokens, channels)

    def seconds_per_batch(module: HookedDiffusion, sink: ShardSink | None) -> float:
        """Each call generates the next batch and writes its samples to `sink` when given."""
        batches = prompt_items(config.batch_size)

        def step() -> None:
            output = module.generate(next(batches))
            if sink is not None:
                write_samples(sink, output, HOOKPOINT, "cond")
        return time_call(step, warmup=config.warmup, repeats=config.repeats, device=config.device).per_call

    plain_s, cached_s = seconds_per_batch(plain, None), seconds_per_batch(hooked, sink)
    sink.close()
    return {"plain_s_per_batch": plain_s, "capture_write_s_per_batch": cached_s, "overhead": cached_s / plain_s - 1}


def payload_cost(config: BenchmarkConfig, folder: Path) -> dict[str, float]:
    """`ActivationCapture` + `write_samples` on an SD1.5-sized block output, as `HookedDiffusion` and the writer do."""
    device, side = torch.device(config.device), config.payload_side
    hidden = torch.randn(config.payload_batch, config.payload_channels, side, side, device=device)  # [B, C, H, W]
    sink = ShardSink(folder, "payload", side * side, config.payload_channels)
    batches = prompt_items(config.payload_batch)

    def capture_and_write() -> None:
        capture = ActivationCapture(halves="cond", device="cpu", dtype=torch.float16)
        for step in range(config.payload_steps):
            capture(hidden, HookContext(HOOKPOINT, step, config.payload_steps, step, do_cfg=False))
        steps = list(range(config.payload_steps))
        output = GenerationOutput(next(batches), capture.stack(), steps, steps, images=torch.empty(0))
        write_samples(sink, output, HOOKPOINT, "cond")

    timing = time_call(capture_and_write, warmup=config.warmup, repeats=config.repeats, device=device)
    sink.close()
    per_step = timing.per_call / config.payload_steps
    per_map = per_step / config.payload_batch
    megabytes = side * side * config.payload_channels * 2 / 1e6
    return {"s_per_step": per_step, "s_per_map": per_map, "s_per_image": per_map * config.published_steps,
            "MB_per_s": megabytes / per_map}


def run_benchmark(config: BenchmarkConfig) -> dict[str, Any]:
    """Both measurements in one scratch folder; returns the JSON-ready report."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    with tempfile.TemporaryDirectory() as scratch:
        pipeline = config.pipeline or str(save_tiny_pipeline(Path(scratch) / "tiny"))
        tiny = tiny_overhead(config, pipeline, Path(scratch) / "tiny-shards")
        payload = payload_cost(config, Path(scratch) / "payload-shards")
    return {"benchmark": "cache_overhead", "config": asdict(config),
            "machine": machine_description(config.device), "generation": tiny, "sd15_payload": payload}


main = benchmark_main(BenchmarkConfig, run_benchmark, __doc__)


if __name__ == "__main__":
    main()
