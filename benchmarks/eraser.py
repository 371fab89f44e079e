"""Cost of the concept eraser per UNet call at the SD1.5 hookpoint shape, against a dense implementation.

`ConceptEraser.apply` runs the encoder and decodes only the change of the few erased latents; the dense baseline is
what the reference hook computes: encode, scatter the TopK code into a dense `[tokens, L]` tensor, and decode it twice
(`[tokens, L] @ [L, d]`) before and after erasing. Both run in the same process on the same block output, and must
agree. It prints the eraser's time over the dense time (target ≤ 0.6) and the encoder's share (the floor every
implementation pays). Then it times whole generations on a random-weight pipeline (the tiny test pipeline, or one
with SD1.5's UNet) on the same device and in the same dtype, `HookedDiffusion` erasing one concept against the same
prompts unhooked (the hook's share of a generation), and a search's batch of four erasures generated in one call
against one call per erasure. The last line is one JSON object with every figure.

    python -m benchmarks.eraser                                  # CPU, float32, one CFG batch of 8 prompts
    python -m benchmarks.eraser --device cuda --dtype float16 --repeats 50
    python -m benchmarks.eraser --generation_pipeline sd15 --generation_resolution 64 --generation_steps 2
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from benchmarks.common import benchmark_main, machine_description, matmul_flops_per_second, time_call
from saemnesia.class_params import Candidate
from saemnesia.concepts import UNLEARNCANVAS_OBJECTS
from saemnesia.erasure import ErasureConfig
from saemnesia.generation import HookedDiffusion, PromptItem
from saemnesia.pipelines import TinyPipelineConfig, save_tiny_pipeline
from saemnesia.sae import SaeConfig, SparseAutoencoder
from saemnesia.stats import ConceptStats
from saemnesia.unlearning import ConceptEraser, ErasureTables

TARGET = UNLEARNCANVAS_OBJECTS[1]  # "Bears"; any concept serves, the cost does not depend on which
MEAN_CODE_SCALE = 0.05  # typical token-averaged TopK activation, so the thresholds let some latents through
SD15_SIZED = TinyPipelineConfig(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_heads=8,
                                text_hidden_size=768, text_layers=12, vae_block_out_channels=(128, 256, 512, 512),
                                norm_num_groups=32, sample_size=64)
"""SD1.5's UNet exactly (its defaults are SD1.5's other settings); the 12-layer, 768-wide text encoder has 8 heads and
a 1536-wide MLP (SD1.5: 12 and 3072) and the VAE one layer per block (SD1.5: 2). Neither matters to the timing: the text
encoder runs once per generation and the generations stop at the latents."""
PIPELINES = {"sd15": SD15_SIZED, "tiny": TinyPipelineConfig()}


@dataclass
class EraserBenchmarkConfig:
    """Shape and settings of one run (command-line options of the same names)."""

    batch: int = 16
    """UNet batch: with classifier-free guidance, twice the number of prompts. Published shape: 16."""
    height: int = 16
    """Block-output height (16 at 512 px for SD1.5 up_blocks.1.attentions.1)."""
    width: int = 16
    """Block-output width."""
    d: int = 1280
    """Channels = SAE input width. Published: 1280."""
    latents: int = 20480
    """SAE latents L. Published: 20480."""
    k: int = 32
    """TopK. Published: 32."""
    steps: int = 100
    """Sampling steps T of the statistics. Published: 100."""
    percentile: float = 99.999
    """Selection percentile of the erased concept (99.999 = the top-1 latent at L = 20480)."""
    multiplier: float = -10.0
    """Multiplier of the erased concept."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where both implementations run."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Dtype of the SAE and of the block output."""
    repeats: int = 3
    """Timed calls of each implementation."""
    warmup: int = 1
    """Untimed calls (and generations) before the timed ones."""
    seed: int = 0
    """Seed of the SAEs, the statistics and the block output."""
    generation_prompts: int = 8
    """Prompts per generation of the hooked-generation comparison (0 skips it)."""
    generation_steps: int = 20
    """DDIM steps of those generations, and steps of their statistics."""
    generation_pipeline: Literal["tiny", "sd15"] = "tiny"
    """Random-weight pipeline of the generations: the tiny test pipeline or SD1.5's UNet (`SD15_SIZED`)."""
    generation_resolution: int = 64
    """Image side of the generations in pixels (64: 4 × 4 tokens at the tiny pipeline's hookpoint)."""
    generation_k: int = 8
    """TopK of the generations' erasure SAE (16 latents per hookpoint channel)."""
    generation_repeats: int = 3
    """Timed generations per path."""


def dense_erase(sae: SparseAutoencoder, tables: ErasureTables, hidden: Tensor, step: int) -> Tensor:
    """The straightforward `exact`-mode implementation: dense code and two dense decodes, as the reference hook."""
    batch, channels, height, width = hidden.shape
    tokens = hidden.flatten(2).transpose(1, 2)  # [B, N, C]
    pre_acts = sae.pre_acts(tokens)  # [B, N, L]
    acts, indices = pre_acts.topk(sae.cfg.k, dim=-1, sorted=False)
    code = torch.zeros_like(pre_acts).scatter_(-1, indices, acts)  # [B, N, L]
    reconstruction = code @ sae.W_dec + sae.b_dec  # [B, N, C]
    valid = tables.valid[step]  # [K]
    selected = tables.latents[step][valid]  # [K']
    values = code[..., selected]  # [B, N, K']
    code[..., selected] = torch.where(values > tables.thresholds[step][valid], values * tables.scales[step][valid].to(
        code.dtype), values)
    erased = code @ sae.W_dec + sae.b_dec  # [B, N, C]
    out = tokens + (erased - reconstruction)
    return out.transpose(1, 2).reshape(batch, channels, height, width)  # [B, C, H, W]


def build_eraser(config: EraserBenchmarkConfig) -> tuple[ConceptEraser, Tensor]:
    """A random SAE of the configured size, statistics of the 20 UnlearnCanvas objects, and one block output."""
    device, dtype = torch.device(config.device), getattr(torch, config.dtype)
    torch.manual_seed(config.seed)
    sae = SparseAutoencoder(config.d, SaeConfig(num_latents=config.latents, k=config.k)).to(device, dtype)
    generator = torch.Generator().manual_seed(config.seed)
    means = MEAN_CODE_SCALE * torch.rand(len(UNLEARNCANVAS_OBJECTS), config.steps, config.latents,
                                         generator=generator)  # [C, T, L]
    stats = ConceptStats(list(UNLEARNCANVAS_OBJECTS), means, torch.full((len(UNLEARNCANVAS_OBJECTS),), 80))
    params = {TARGET: {"percentile": config.percentile, "multiplier": config.multiplier}}
    eraser = ConceptEraser(sae, stats, params, error_mode="exact")
    hidden = torch.randn(config.batch, config.d, config.height, config.width, generator=generator)
    return eraser, hidden.to(device, dtype)


@torch.no_grad()
def unet_call_cost(config: EraserBenchmarkConfig) -> dict[str, Any]:
    """Seconds per call of the eraser, the dense baseline and the encoder alone, and their agreement."""
    eraser, hidden = build_eraser(config)
    sae, step = eraser.sae, config.steps // 2
    tokens = hidden.flatten(2).transpose(1, 2)  # [B, N, C]
    timed = partial(time_call, warmup=config.warmup, repeats=config.repeats, device=config.device)
    erased, dense = eraser.apply(hidden, step), dense_erase(sae, eraser.tables, hidden, step)
    eraser_s = timed(lambda: eraser.apply(hidden, step)).per_call
    dense_s = timed(lambda: dense_erase(sae, eraser.tables, hidden, step)).per_call
    encoder_s = timed(lambda: sae.encode(tokens)).per_call
    # The encoder's matmul [B·N, d] × [d, L] is the eraser's floor; the machine's rate on it is the yardstick.
    encoder_flops = 2 * tokens.shape[0] * tokens.shape[1] * config.d * config.latents
    flops_per_s = matmul_flops_per_second(tokens.shape[0] * tokens.shape[1], config.d, config.latents,
                                          hidden.device, hidden.dtype, warmup=config.warmup, repeats=config.repeats)
    return {"eraser_s": eraser_s, "dense_s": dense_s, "encoder_s": encoder_s, "eraser_over_dense": eraser_s / dense_s,
            "encoder_over_eraser": encoder_s / eraser_s, "matmul_flops_per_s": flops_per_s,
            "eraser_matmul_fraction": encoder_flops / (eraser_s * flops_per_s),
            "max_abs_difference": float((erased.float() - dense.float()).abs().max()),
            "tokens_changed": int((erased != hidden).any(dim=1).sum())}


def hooked_generation_cost(config: EraserBenchmarkConfig) -> dict[str, float]:
    """Seconds per generation of `generation_prompts` prompts with the random-weight `generation_pipeline` (saved
    and loaded as a folder, as real runs do), erasing one concept (its top latent) at every UNet call versus unhooked.

    The erasure SAE (float32 as `ErasureConfig` loads it) reads the `unet.up_blocks.1.attentions.1` output, whose
    width is `block_out_channels[-1]` in the SD1.5 layouts of both the tiny and the SD1.5-sized config.
    """
    pipeline, steps = PIPELINES[config.generation_pipeline], config.generation_steps
    concepts = [f"concept{index}" for index in range(4)]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        save_tiny_pipeline(root / "pipeline", pipeline)
        torch.manual_seed(config.seed)
        sae = SparseAutoencoder(pipeline.block_out_channels[-1], SaeConfig(expansion_factor=16, k=config.generation_k))
        sae.save(root / "sae")
        generator = torch.Generator().manual_seed(config.seed)
        means = MEAN_CODE_SCALE * torch.rand(len(concepts), steps, sae.num_latents, generator=generator)  # [C, T, L]
        ConceptStats(concepts, means, torch.full((len(concepts),), 8)).save(root / "stats.safetensors")
        erasure = ErasureConfig(sae=str(root / "sae"), stats=str(root / "stats.safetensors"))
        module = HookedDiffusion(str(root / "pipeline"), erasure=erasure, num_steps=steps,
                                 height=config.generation_resolution, width=config.generation_resolution,
                                 output_type="latent", dtype=config.dtype)
        module.to(config.device)  # setup loads the pipeline onto the module's device
        module.setup("predict")
        items = [PromptItem(f"p{index}", f"An image of {concepts[index % 4]}.", concepts[index % 4], None, 0)
                 for index in range(config.generation_prompts)]
        candidate = Candidate(100 * (1 - 1 / sae.num_latents), config.multiplier)  # the top-1 latent
        erasing = [item._replace(erase=(concepts[0],), target=concepts[0], candidate=candidate) for item in items]
        # A search's batch: the items erase 4 different concepts, generated in one call or one call per concept.
        mixed = [item._replace(erase=(item.object,), target=item.object, candidate=candidate) for item in items]
        per_concept = [group for concept in concepts if (group := [item for item in mixed if item.target == concept])]
        unhooked_s, hooked_s, mixed_s, grouped_s = (
            time_call(generate, warmup=config.warmup, repeats=config.generation_repeats, device=config.device).per_call
            for generate in (partial(module.generate, items), partial(module.generate, erasing),
                             partial(module.generate, mixed),
                             lambda: [module.generate(group) for group in per_concept]))
    return {"unhooked_s": unhooked_s, "hooked_s": hooked_s, "hooked_over_unhooked": hooked_s / unhooked_s,
            "mixed_s": mixed_s, "per_concept_s": grouped_s, "mixed_over_per_concept": mixed_s / grouped_s}


def run_benchmark(config: EraserBenchmarkConfig) -> dict[str, Any]:
    """The UNet-call comparison and, unless `generation_prompts` is 0, the generation one; the JSON-ready report."""
    report: dict[str, Any] = {"benchmark": "eraser", "config": asdict(config),
                              "machine": machine_description(config.device)}
    report["unet_call"] = cost = unet_call_cost(config)
    print(f"[{config.batch}, {config.d}, {config.height}, {config.width}] {config.dtype}, L {config.latents}, "
          f"k {config.k}: eraser {cost['eraser_s'] * 1e3:.1f} ms, dense {cost['dense_s'] * 1e3:.1f} ms, "
          f"ratio {cost['eraser_over_dense']:.3f} (target <= 0.6); encoder alone {cost['encoder_s'] * 1e3:.1f} ms; "
          f"matmul rate {cost['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s, the eraser at "
          f"{cost['eraser_matmul_fraction']:.2f} of it; max |eraser - dense| {cost['max_abs_difference']:.2e}, "
          f"{cost['tokens_changed']} tokens changed")
    if config.generation_prompts > 0:
        report["generation"] = generation = hooked_generation_cost(config)
        print(f"{config.generation_pipeline} pipeline, {config.generation_prompts} prompts × {config.generation_steps} "
              f"steps at {config.generation_resolution} px: unhooked {generation['unhooked_s']:.2f} s, erasing "
              f"{generation['hooked_s']:.2f} s, ratio {generation['hooked_over_unhooked']:.3f}; four erasures in one "
              f"batch {generation['mixed_s']:.2f} s, one call per erasure {generation['per_concept_s']:.2f} s, ratio "
              f"{generation['mixed_over_per_concept']:.3f}")
    return report


main = benchmark_main(EraserBenchmarkConfig, run_benchmark, __doc__)


if __name__ == "__main__":
    main()
