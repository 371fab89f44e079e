"""Every throughput figure of the project on one GPU in one run (under 5 minutes on one H100/H200), printed and
written as a markdown section for benchmarks/RESULTS.md, headed by the card's name and the date.

(a) SAE training at the published size (d 1280, L 20480, k 32, batches of 4096 tokens) in `32-true` and `bf16-mixed`:
    `SAEModule` under a Trainer and the plain loop, with the fraction of the dense matmul FLOP/s measured in the same
    process and dtype, and the encoder-backward / decoder kernel comparison (`benchmarks.sae_step`).
(b) The eraser per UNet call at the SD1.5 hookpoint shape against the dense reference hook (`benchmarks.eraser`).
(c) Generation with and without erasing one concept, on a random-weight pipeline with SD1.5's UNet (no download) at
    512 px and 100 DDIM steps (`benchmarks.eraser.hooked_generation_cost`).

    python -m benchmarks.gpu_suite --markdown benchmarks/RESULTS.md     # appends the section to RESULTS.md
    python -m benchmarks.gpu_suite --steps 50 --resolution 256          # shorter generations

Matmul settings, stated in the section: float32 matmuls are IEEE float32 (`torch.set_float32_matmul_precision
("highest")`; `--tf32` allows TF32), bf16-mixed is CUDA autocast to bfloat16 (Lightning's and the plain loop's), and
the pipeline runs in `--dtype` (float16) while the erasure SAE stays float32, as `ErasureConfig` loads it. Every timed
block is bracketed by `torch.cuda.synchronize`. On a CPU with tiny sizes it is a smoke test (tests/test_benchmarks.py).
"""

from __future__ import annotations

import datetime
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import ArgumentParser

from benchmarks.common import machine_description, print_json_line
from benchmarks.eraser import EraserBenchmarkConfig, hooked_generation_cost, unet_call_cost
from benchmarks.sae_step import BenchmarkConfig, run_benchmark
from saemnesia.io import atomic_write_text
from saemnesia.pipelines import TinyPipelineConfig
from saemnesia.sae import SaeConfig

Precision = Literal["32-true", "bf16-mixed"]

SD15_SIZED = TinyPipelineConfig(
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_heads=8, text_hidden_size=768,
    text_layers=12, vae_block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=64,
)
"""SD1.5's UNet exactly (its defaults are SD1.5's other settings); the 12-layer, 768-wide text encoder has 8 heads and
a 1536-wide MLP (SD1.5: 12 and 3072) and the VAE one layer per block (SD1.5: 2). Neither matters to the timing: the text
encoder runs once per generation and the generations stop at the latents."""
PIPELINES = {"sd15": SD15_SIZED, "tiny": TinyPipelineConfig()}
HOOKPOINT_DOWNSAMPLING = 32
"""Pixels per side of one token at `unet.up_blocks.1.attentions.1` in SD1.5 (VAE 8 × UNet 4): 512 px → 16 × 16."""


@dataclass
class SuiteConfig:
    """Sizes and settings of the suite (command-line options of the same names)."""

    device: Literal["cuda", "cpu"] = "cuda"
    """Where everything runs; `cpu` only for smoke tests at tiny sizes."""
    d: int = 1280
    """SAE input width for (a) and (b). Published: 1280."""
    latents: int = 20480
    """SAE latents for (a) and (b). Published: 20480."""
    k: int = 32
    """TopK for (a), (b) and (c). Published: 32."""
    tokens: int = 4096
    """Tokens per training batch. Published: 4096."""
    tokens_per_sample: int = 256
    """Tokens per map of supervised batches (16 × 16 at 512 px)."""
    precisions: list[Precision] = field(default_factory=lambda: ["32-true", "bf16-mixed"])
    """Lightning precisions of (a)."""
    sae_steps: int = 50
    """Timed optimizer steps of each training path."""
    sae_warmup: int = 5
    """Untimed steps before them."""
    kernel_repeats: int = 20
    """Timed calls of each side of the kernel comparisons; 0 skips them."""
    tf32: bool = False
    """Allow TF32 for float32 matmuls (`set_float32_matmul_precision("high")`); default IEEE float32."""
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Dtype of the pipeline in (c) and of the eraser's SAE and block output in (b)."""
    eraser_repeats: int = 50
    """Timed eraser calls of (b) per implementation."""
    pipeline: Literal["sd15", "tiny"] = "sd15"
    """Pipeline of (c): SD1.5's UNet (`SD15_SIZED`) or the tiny test pipeline (smoke tests)."""
    resolution: int = 512
    """Image side in pixels for (c); also sets (b)'s block-output side (resolution / 32). Published: 512."""
    steps: int = 100
    """DDIM steps of (c) and steps T of the statistics in (b). Published: 100."""
    prompts: int = 8
    """Prompts per generation in (c); (b)'s UNet batch is twice that (classifier-free guidance)."""
    generation_repeats: int = 2
    """Timed generations per path in (c)."""
    warmup: int = 1
    """Untimed calls before the timed ones in (b) and (c)."""
    multiplier: float = -10.0
    """Multiplier of the erased concept in (b) and (c)."""
    seed: int = 0
    """Seed of every random weight and input."""
    markdown: str | None = None
    """Markdown file to append the section to (e.g. benchmarks/RESULTS.md); `None` only prints it."""

    def __post_init__(self) -> None:
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda needs a visible CUDA GPU; use --device cpu and tiny sizes for a smoke run.")
        if min(self.resolution, self.steps, self.prompts, self.generation_repeats, self.eraser_repeats) < 1:
            raise ValueError("--resolution, --steps, --prompts, --generation_repeats and --eraser_repeats must be "
                             "positive.")
        if self.resolution % 8:
            raise ValueError(f"--resolution must be a multiple of 8 (the VAE's factor); got {self.resolution}.")
        if not self.precisions:
            raise ValueError("--precisions must name at least one of 32-true and bf16-mixed.")

    def sae_benchmark(self, precision: Precision) -> BenchmarkConfig:
        return BenchmarkConfig(d=self.d, latents=self.latents, k=self.k, tokens=self.tokens,
                               tokens_per_sample=self.tokens_per_sample, steps=self.sae_steps, warmup=self.sae_warmup,
                               device=self.device, precision=precision, kernel_repeats=self.kernel_repeats,
                               seed=self.seed)

    def eraser_benchmark(self) -> EraserBenchmarkConfig:
        side = max(1, self.resolution // HOOKPOINT_DOWNSAMPLING)
        return EraserBenchmarkConfig(batch=2 * self.prompts, height=side, width=side, d=self.d, latents=self.latents,
                                     k=self.k, steps=self.steps, multiplier=self.multiplier, device=self.device,
                                     dtype=self.dtype, repeats=self.eraser_repeats, warmup=self.warmup,
                                     seed=self.seed, generation_prompts=0)


def matmul_settings() -> dict[str, Any]:
    """The global settings that decide which matmul kernels run."""
    return {"float32_matmul_precision": torch.get_float32_matmul_precision(),
            "bf16_reduced_precision_reduction": torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
            "cudnn_tf32": torch.backends.cudnn.allow_tf32}


def run_suite(config: SuiteConfig) -> dict[str, Any]:
    """(a), (b) and (c); returns the JSON-ready report."""
    torch.set_float32_matmul_precision("high" if config.tf32 else "highest")
    device = torch.device(config.device)
    report: dict[str, Any] = {"benchmark": "gpu_suite", "config": asdict(config),
                              "machine": machine_description(device), "date": datetime.date.today().isoformat(),
                              "matmul_settings": matmul_settings()}
    report["sae"] = {precision: run_benchmark(config.sae_benchmark(precision)) for precision in config.precisions}
    report["eraser"] = unet_call_cost(config.eraser_benchmark())
    report["generation"] = hooked_generation_cost(
        PIPELINES[config.pipeline], SaeConfig(expansion_factor=16, k=config.k), prompts=config.prompts,
        steps=config.steps, resolution=config.resolution, multiplier=config.multiplier, warmup=config.warmup,
        repeats=config.generation_repeats, seed=config.seed, device=config.device, dtype=config.dtype)
    return report


def markdown_section(report: dict[str, Any], command: str) -> str:
    """The report as a RESULTS.md section: card and date, command and settings, one table per part."""
    config, machine, settings = report["config"], report["machine"], report["matmul_settings"]
    lines = [
        f"### {machine['device']}, {report['date']}", "",
        f"Command: `{command}`; torch {machine['torch']}; float32 matmul precision "
        f"`{settings['float32_matmul_precision']}`, bf16 reduced-precision reductions "
        f"{settings['bf16_reduced_precision_reduction']}, cuDNN TF32 {settings['cudnn_tf32']}.", "",
        f"(a) SAE training step, d {config['d']}, L {config['latents']}, k {config['k']}, {config['tokens']} tokens "
        f"per batch, {next(iter(report['sae'].values()))['config']['encoder_backward']} encoder backward "
        "(unsupervised objective):", "",
        "| precision | objective | matmul TFLOP/s | SAEModule tokens/s | plain tokens/s | module / plain "
        "| module matmul fraction |",
        "|---|---|---|---|---|---|---|",
    ]
    for precision, sae in report["sae"].items():
        for objective, figures in sae["objectives"].items():
            lines.append(f"| {precision} | {objective} | {sae['matmul_flops_per_s'] / 1e12:.1f} | "
                         f"{figures['module_tokens_per_s']:.0f} | {figures['plain_tokens_per_s']:.0f} | "
                         f"{figures['module_vs_plain']:.3f} | {figures['module_matmul_fraction']:.3f} |")
    if config["kernel_repeats"]:
        lines += ["", "Kernels, ms per forward + backward (dense / sparse):", "",
                  "| precision | encoder sparse | encoder dense | AuxK (d/2) sparse | AuxK dense "
                  "| decoder embedding bag | decoder dense |", "|---|---|---|---|---|---|---|"]
        for precision, sae in report["sae"].items():
            kernels = sae["kernels"]
            cells = [f"{kernels[f'{name}_sparse_s'] * 1e3:.2f} | {kernels[f'{name}_dense_s'] * 1e3:.2f} "
                     f"({kernels[f'{name}_dense_over_sparse']:.2f})" for name in ("encoder", "auxk", "decoder")]
            lines.append(f"| {precision} | " + " | ".join(cells) + " |")
    eraser, generation = report["eraser"], report["generation"]
    side = max(1, config["resolution"] // HOOKPOINT_DOWNSAMPLING)
    lines += [
        "", f"(b) Eraser per UNet call, [{2 * config['prompts']}, {config['d']}, {side}, {side}] {config['dtype']}: "
        f"{eraser['eraser_s'] * 1e3:.2f} ms, dense reference {eraser['dense_s'] * 1e3:.2f} ms, ratio "
        f"{eraser['eraser_over_dense']:.3f}; encoder alone {eraser['encoder_s'] * 1e3:.2f} ms; max |difference| "
        f"{eraser['max_abs_difference']:.1e}.",
        "", f"(c) Generation, {config['pipeline']} pipeline, {config['prompts']} prompts, {config['resolution']} px, "
        f"{config['steps']} DDIM steps, {config['dtype']}: unhooked {generation['unhooked_s']:.2f} s, erasing "
        f"{generation['hooked_s']:.2f} s, ratio {generation['hooked_over_unhooked']:.3f}.", "",
    ]
    return "\n".join(lines)


def append_markdown(path: str | Path, section: str) -> None:
    """Append `section` to the file at `path` (created if missing) after a blank line, atomically."""
    path = Path(path)
    existing = path.read_text().rstrip("\n") if path.exists() else ""
    atomic_write_text(path, f"{existing}\n\n{section}" if existing else section)


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Parse the options, run the suite, print the markdown section and the JSON report (last line)."""
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_class_arguments(SuiteConfig)  # one option per field, same names
    config = SuiteConfig(**parser.parse_args(args).as_dict())
    report = run_suite(config)
    command = shlex.join(["python", "-m", "benchmarks.gpu_suite", *(sys.argv[1:] if args is None else args)])
    section = markdown_section(report, command)
    print(section)
    if config.markdown is not None:
        append_markdown(config.markdown, section)
    print_json_line(report)
    return report


if __name__ == "__main__":
    main()
