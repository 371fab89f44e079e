"""Every throughput figure of the project on one GPU in one run (under 5 minutes on one H100/H200), printed and
written as a markdown section for benchmarks/RESULTS.md, headed by the card's name and the date.

(a) SAE training at the published size (d 1280, L 20480, k 32, batches of 4096 tokens) in `32-true` and `bf16-mixed`:
    `SAEModule` under a Trainer and the plain loop, with the fraction of the dense matmul FLOP/s measured in the same
    process and dtype, and the encoder-backward / decoder kernel comparison (`benchmarks.sae_step`).
(b) The eraser per UNet call at the SD1.5 hookpoint shape against the dense reference hook (`benchmarks.eraser`).
(c) Generation with and without erasing one concept, on a random-weight pipeline with SD1.5's UNet (no download) at
    512 px and 100 DDIM steps (`benchmarks.eraser.hooked_generation_cost`).
The options of (a) are those of `benchmarks.sae_step` under `--sae.`, those of (b) and (c) `benchmarks.eraser`'s
under `--eraser.`, with the suite's defaults.

    python -m benchmarks.gpu_suite --markdown benchmarks/RESULTS.md     # appends the section to RESULTS.md
    python -m benchmarks.gpu_suite --eraser.generation_steps 50 --eraser.generation_resolution 256  # shorter (c)

Matmul settings, stated in the section: float32 matmuls are IEEE float32 (`torch.set_float32_matmul_precision
("highest")`; `--tf32` allows TF32), bf16-mixed is CUDA autocast to bfloat16 (Lightning's and the plain loop's), and
the pipeline runs in `--eraser.dtype` (float16) while the erasure SAE stays float32, as `ErasureConfig` loads it. Every
timed block is bracketed by `torch.cuda.synchronize`. On a CPU with tiny sizes it is a smoke test
(tests/test_benchmarks.py).
"""

from __future__ import annotations

import datetime
import shlex
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import benchmark_main, machine_description
from benchmarks.eraser import EraserBenchmarkConfig
from benchmarks.eraser import run_benchmark as run_eraser
from benchmarks.sae_step import BenchmarkConfig, Precision
from benchmarks.sae_step import run_benchmark as run_sae
from saemnesia.io import atomic_write_text


@dataclass
class SuiteConfig:
    """Settings of the suite (command-line options of the same names, dotted for the two benchmarks' own)."""

    sae: BenchmarkConfig = field(
        default_factory=lambda: BenchmarkConfig(device="cuda", steps=50, warmup=5, kernel_repeats=20))
    """(a) at the published sizes, 50 timed steps, 20 kernel rounds; at each of `precisions` (not at `precision`)."""
    precisions: list[Precision] = field(default_factory=lambda: ["32-true", "bf16-mixed"])
    """Lightning precisions of (a)."""
    eraser: EraserBenchmarkConfig = field(default_factory=lambda: EraserBenchmarkConfig(
        device="cuda", dtype="float16", repeats=50, generation_pipeline="sd15", generation_resolution=512,
        generation_steps=100, generation_k=32, generation_repeats=2))
    """(b) at [16, 1280, 16, 16] (8 prompts' CFG batch at 512 px) and (c) on SD1.5's UNet, SAE k 32, both float16."""
    tf32: bool = False
    """Allow TF32 for float32 matmuls (`set_float32_matmul_precision("high")`); default IEEE float32."""
    markdown: str | None = None
    """Markdown file to append the section to (e.g. benchmarks/RESULTS.md); `None` only prints it."""

    def __post_init__(self) -> None:
        if "cuda" in (self.sae.device, self.eraser.device) and not torch.cuda.is_available():
            raise ValueError("--sae.device / --eraser.device cuda needs a visible CUDA GPU; use cpu and tiny sizes for "
                             "a smoke run.")
        if self.eraser.generation_prompts < 1:
            raise ValueError("--eraser.generation_prompts must be positive: the generations are part (c).")


def run_suite(config: SuiteConfig, command: str) -> dict[str, Any]:
    """(a), (b) and (c); prints the markdown section, appends it to `markdown` if set, returns the JSON-ready report."""
    torch.set_float32_matmul_precision("high" if config.tf32 else "highest")
    matmul_settings = {  # the global settings that decide which matmul kernels run
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "bf16_reduced_precision_reduction": torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32}
    report: dict[str, Any] = {"benchmark": "gpu_suite", "config": asdict(config),
                              "machine": machine_description(config.sae.device),
                              "date": datetime.date.today().isoformat(), "matmul_settings": matmul_settings}
    report["sae"] = {precision: run_sae(replace(config.sae, precision=precision)) for precision in config.precisions}
    erasure = run_eraser(config.eraser)
    report["eraser"], report["generation"] = erasure["unet_call"], erasure["generation"]
    section = markdown_section(report, command)
    print(section)
    if config.markdown is not None:  # appended after a blank line (the file created if missing), atomically
        path = Path(config.markdown)
        existing = path.read_text().rstrip("\n") if path.exists() else ""
        atomic_write_text(path, f"{existing}\n\n{section}" if existing else section)
    return report


def markdown_section(report: dict[str, Any], command: str) -> str:
    """The report as a RESULTS.md section: card and date, command and settings, one table per part."""
    config, machine, settings = report["config"]["sae"], report["machine"], report["matmul_settings"]
    lines = [
        f"### {machine['device']}, {report['date']}", "",
        f"Command: `{command}`; torch {machine['torch']}; float32 matmul precision "
        f"`{settings['float32_matmul_precision']}`, bf16 reduced-precision reductions "
        f"{settings['bf16_reduced_precision_reduction']}, cuDNN TF32 {settings['cudnn_tf32']}.", "",
        f"(a) SAE training step, d {config['d']}, L {config['latents']}, k {config['k']}, {config['tokens']} tokens "
        f"per batch, {config['encoder_backward']} encoder backward (unsupervised objective):", "",
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
    cost, generation, erasing = report["eraser"], report["generation"], report["config"]["eraser"]
    lines += [
        "", f"(b) Eraser per UNet call, [{erasing['batch']}, {erasing['d']}, {erasing['height']}, {erasing['width']}] "
        f"{erasing['dtype']}: {cost['eraser_s'] * 1e3:.2f} ms, dense reference {cost['dense_s'] * 1e3:.2f} ms, ratio "
        f"{cost['eraser_over_dense']:.3f}; encoder alone {cost['encoder_s'] * 1e3:.2f} ms; max |difference| "
        f"{cost['max_abs_difference']:.1e}.",
        "", f"(c) Generation, {erasing['generation_pipeline']} pipeline, {erasing['generation_prompts']} prompts, "
        f"{erasing['generation_resolution']} px, {erasing['generation_steps']} DDIM steps, {erasing['dtype']}: "
        f"unhooked {generation['unhooked_s']:.2f} s, erasing {generation['hooked_s']:.2f} s, ratio "
        f"{generation['hooked_over_unhooked']:.3f}.", "",
    ]
    return "\n".join(lines)


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Parse the options, run the suite, print the markdown section and the JSON report (last line)."""
    command = shlex.join(["python", "-m", "benchmarks.gpu_suite", *(sys.argv[1:] if args is None else args)])
    return benchmark_main(SuiteConfig, lambda config: run_suite(config, command), __doc__)(args)


if __name__ == "__main__":
    main()
