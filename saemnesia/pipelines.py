"""Load diffusers pipeline folders (SD 1.x/2.x, SDXL) and build tiny random ones for offline tests.

Everything loads from a local folder: the same `load_pipeline` serves a real checkpoint and the tiny
pipeline that tests and the toy benchmark save to disk, so both go through one code path.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import diffusers.utils.deprecation_utils
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from saemnesia.io import replace_folder

SUPPORTED_PIPELINES: dict[str, type[DiffusionPipeline]] = {
    "StableDiffusionPipeline": StableDiffusionPipeline,
    "StableDiffusionXLPipeline": StableDiffusionXLPipeline,
}
"""`_class_name` in `model_index.json` → the class that loads it."""

SchedulerChoice = Literal["ddim", "keep"]
SDXL_TIME_EMBEDDING = 8
"""Width of the tiny SDXL UNet's embedding of each of SDXL's 6 size/crop numbers (SDXL: 256)."""

# diffusers renamed from_pretrained's `torch_dtype` to `dtype` (PR 14205, with `_resolve_dtype`); older
# releases know only `torch_dtype`, which newer ones still accept with a deprecation warning.
DTYPE_KEYWORD = "dtype" if hasattr(diffusers.utils.deprecation_utils, "_resolve_dtype") else "torch_dtype"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`"float16"` → `torch.float16`; a `torch.dtype` passes through."""
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype name; expected e.g. 'float32' or 'bfloat16'.")
    return resolved


def load_pipeline(
    path: str | os.PathLike,
    scheduler: SchedulerChoice = "ddim",
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    progress_bar: bool = False,
) -> DiffusionPipeline:
    """Load a Stable Diffusion (1.x/2.x) or SDXL pipeline from a local diffusers folder.

    `scheduler="ddim"` swaps in `DDIMScheduler` built from the folder's scheduler config (the method's
    published sampler); `"keep"` keeps the saved one. The safety checker is never loaded: it would
    black out images and is no part of the method. The UNet's weights are laid out channels-last.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"Pipeline folder {folder} does not exist; expected a diffusers pipeline folder.")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ValueError(
            f"{folder} is not a diffusers pipeline folder: it has no model_index.json "
            "(expected a folder written by DiffusionPipeline.save_pretrained)."
        )
    class_name = json.loads(index_file.read_text()).get("_class_name")
    if class_name not in SUPPORTED_PIPELINES:
        raise ValueError(
            f"{index_file} names pipeline class {class_name!r}; expected one of {sorted(SUPPORTED_PIPELINES)}."
        )
    if scheduler not in ("ddim", "keep"):
        raise ValueError(f"scheduler {scheduler!r} is not supported; expected 'ddim' or 'keep'.")

    no_safety_checker = {"safety_checker": None, "requires_safety_checker": False}
    extra = no_safety_checker if class_name == "StableDiffusionPipeline" else {}
    pipe = SUPPORTED_PIPELINES[class_name].from_pretrained(
        folder, local_files_only=True, **{DTYPE_KEYWORD: resolve_dtype(dtype)}, **extra
    )
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    # Channels-last convolutions: faster for oneDNN on a CPU (docs/toycanvas.md, "The demo's wall time"; not measured
    # on a GPU); the results differ only by rounding.
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=not progress_bar)
    return pipe.to(device)


@dataclass
class TinyPipelineConfig:
    """A random-weight Stable Diffusion 1.5 look-alike, small enough to generate in milliseconds on a CPU.

    The block layout is SD1.5's with fewer levels, so the published hookpoint
    `unet.up_blocks.1.attentions.1` exists and is a cross-attention transformer block.
    """

    seed: int = 0
    """Seed of the random weights; the same config always gives the same pipeline."""
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    """UNet channels per level. Three levels are the fewest that keep SD1.5's layout with a
    `CrossAttnUpBlock2D` at `up_blocks.1`; the hookpoint has `block_out_channels[-2]` channels."""
    layers_per_block: int = 2
    """Resnet/attention layers per UNet block; SD1.5's 2, so `attentions.1` exists in every cross-attention block."""
    attention_heads: int = 4
    """Attention heads in every UNet transformer (head size 8 at 32 channels)."""
    text_hidden_size: int = 64
    """Width of the CLIP text encoder, also the UNet's `cross_attention_dim`."""
    text_layers: int = 2
    """Transformer layers in the CLIP text encoder: enough to mix tokens, cheap to run."""
    vae_block_out_channels: tuple[int, ...] = (8, 16, 16, 16)
    """VAE channels per level. Four levels give SD's image/latent factor of 8, so height and width
    arithmetic matches real checkpoints; the channels are tiny because the VAE runs at image size."""
    norm_num_groups: int = 8
    """GroupNorm groups in the UNet and VAE; must divide every channel count above."""
    sample_size: int = 8
    """Default latent size: 8 latents = 64 px images, 4×4 tokens at `up_blocks.1`. Any multiple of
    `2 ** (len(block_out_channels) - 1)` works for height/width given at generation time."""
    sdxl: bool = False
    """Build a `StableDiffusionXLPipeline`: a second, projecting text encoder, a UNet attending to both encoders'
    states (twice `text_hidden_size` wide) and SDXL's size/crop time embedding."""

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        self.vae_block_out_channels = tuple(self.vae_block_out_channels)
        if len(self.block_out_channels) < 3:
            raise ValueError(
                f"TinyPipelineConfig.block_out_channels={self.block_out_channels} needs at least 3 levels "
                "so that unet.up_blocks.1 is a cross-attention block."
            )
        for channels in (*self.block_out_channels, *self.vae_block_out_channels):
            if channels % self.norm_num_groups:
                raise ValueError(
                    f"TinyPipelineConfig channel count {channels} is not divisible by "
                    f"norm_num_groups={self.norm_num_groups}."
                )


def build_tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer written from scratch: one token per byte (with and without the end-of-word
    suffix), no merges, so every prompt tokenises into characters without any downloaded file."""
    byte_alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 printable stand-ins for bytes
    tokens = [*byte_alphabet, *(f"{char}</w>" for char in byte_alphabet), "<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as folder:
        # Written as vocab.json/merges.txt and read back because that is the one constructor shared by
        # the slow (transformers 4) and fast (transformers 5) CLIPTokenizer.
        (Path(folder) / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def build_tiny_pipeline(
    config: TinyPipelineConfig | None = None,
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """A `StableDiffusionPipeline` (or, with `config.sdxl`, an SDXL one) with seeded random weights (see
    `TinyPipelineConfig`), on the CPU."""
    config = config or TinyPipelineConfig()
    levels = len(config.block_out_channels)
    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
        torch.manual_seed(config.seed)
        # SDXL conditions on both encoders' states, and on 6 size/crop numbers embedded 8-wide each plus the
        # second encoder's pooled projection.
        sdxl_conditioning = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=SDXL_TIME_EMBEDDING,
            projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBEDDING + config.text_hidden_size,
        )
        unet = UNet2DConditionModel(
            sample_size=config.sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=config.block_out_channels,
            layers_per_block=config.layers_per_block,
            down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
            cross_attention_dim=config.text_hidden_size * (2 if config.sdxl else 1),
            # diffusers' legacy naming: for SD UNets `attention_head_dim` is the number of heads.
            attention_head_dim=config.attention_heads,
            norm_num_groups=config.norm_num_groups,
            **(sdxl_conditioning if config.sdxl else {}),
        )
        vae_levels = len(config.vae_block_out_channels)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * vae_levels,
            up_block_types=("UpDecoderBlock2D",) * vae_levels,
            block_out_channels=config.vae_block_out_channels,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=config.norm_num_groups,
            sample_size=config.sample_size * 2 ** (vae_levels - 1),
        )
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_hidden_size,
            intermediate_size=2 * config.text_hidden_size,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.attention_heads,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=config.text_hidden_size,
        )
        text_encoder = CLIPTextModel(text_config)
        text_encoder_2 = CLIPTextModelWithProjection(text_config) if config.sdxl else None
    # SD1.5's noise schedule, so DDIM sampling behaves as on the real model.
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    if config.sdxl:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(
    folder: str | os.PathLike, config: TinyPipelineConfig | None = None, overwrite: bool = False
) -> Path:
    """Build a tiny pipeline and save it (safetensors) to `folder`, atomically; returns the folder."""
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} already exists; pass overwrite=True to replace it with a tiny pipeline.")
    return replace_folder(folder, lambda staging: build_tiny_pipeline(config).save_pretrained(
        staging, safe_serialization=True))
