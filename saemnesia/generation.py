"""`HookedDiffusion`: the LightningModule of `predict` — generate images for prompt items while reading
(capture) or rewriting (erasure) one UNet block's output.

Every image gets its own noise generator seeded from `(seed, prompt_id)`, so an image does not depend on which
other prompts share its batch, nor on the number of processes, nor on what is erased. Each item names the concepts
erased while it is generated (`PromptItem.erase`) and, in a parameter search, the candidate they are erased with
(`PromptItem.candidate`); a batch mixing erasures is generated in one pipeline call, each eraser rewriting the rows
of its own items, so a search's many small erasure groups still fill whole batches.
The diffusers pipeline and the erasure SAE are plain attributes, not registered submodules: Lightning neither wraps
nor broadcasts them, and the module has no parameters to train.
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Literal, NamedTuple

import lightning.pytorch as pl
import torch
from diffusers import DiffusionPipeline
from torch import Tensor

from saemnesia.class_params import Candidate
from saemnesia.concepts import NO_ERASURE
from saemnesia.erasure import ErasureBuilder, ErasureConfig
from saemnesia.hooks import PUBLISHED_HOOKPOINT, ActivationCapture, HookContext, hook_block, resolve_hookpoint
from saemnesia.pipelines import SchedulerChoice, load_pipeline, resolve_dtype
from saemnesia.unlearning import ConceptEraser

CAPTURE_DTYPE = torch.float16
"""Captured activations are kept as float16: the shard format's dtype, half the bytes to move to the host."""


class PromptItem(NamedTuple):
    """One image to generate."""

    prompt_id: str
    """Unique, stable id without '.' or '/' (it starts every sample key), e.g. `Bears-Cubism-007-s188`."""
    prompt: str
    """The text given to the pipeline."""
    object: str
    """Object (class) name of the vocabulary."""
    style: str | None
    """Style name of the vocabulary; `None` for a plain prompt."""
    seed: int
    """User seed; the image's noise is seeded from `(seed, prompt_id)` (see `image_seed`)."""
    erase: tuple[str, ...] = ()
    """Concepts erased while generating this image (docs/method.md §4), in erasing order; `()` generates without
    erasure."""
    target: str = NO_ERASURE
    """Label of the erased set, the image's folder: a concept name, `first_03` (sequential) or `none`."""
    candidate: Candidate | None = None
    """The search candidate every erased concept is erased with; `None` takes each concept's `class_params`."""


class GenerationOutput(NamedTuple):
    """What `HookedDiffusion.predict_step` returns for one batch; the callbacks decide what is written."""

    items: list[PromptItem]
    """The batch's prompt items, in order."""
    activations: Tensor | None
    """Captured block outputs as tokens `[B, S, H·W, C]` (float16, CPU); `None` without capture."""
    steps: list[int]
    """Sampling step index of each of the S captured maps."""
    timesteps: list[int]
    """UNet timestep of each of the S captured maps."""
    images: Tensor
    """Final latents `[B, 4, h, w]` (`output_type="latent"`) or images `[B, 3, H, W]` in [0, 1] (`"image"`), CPU."""


@dataclass
class CaptureConfig:
    """Which block outputs a generation keeps (the hookpoint is `HookedDiffusion.hookpoint`)."""

    halves: Literal["cond", "uncond"] = "cond"
    """Classifier-free guidance half to keep. Published caching keeps only the conditional half."""
    every: int = 1
    """Keep every n-th sampling step (steps 0, n, 2n, …): subsampling steps divides the data size by n."""
    steps: list[int] | None = None
    """Keep only these step indices (and only those that `every` keeps); `None` keeps all."""

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"model.capture.every must be a positive step interval, got {self.every}.")

    def new_capture(self) -> ActivationCapture:
        """A fresh capture for one generation, keeping float16 tokens on the CPU."""
        return ActivationCapture(halves=self.halves, steps=self.steps, every=self.every, device="cpu",
                                 dtype=CAPTURE_DTYPE)


def image_seed(seed: int, prompt_id: str) -> int:
    """The seed of one image's noise: a 63-bit digest of `(seed, prompt_id)`, identical in every process
    (unlike Python's salted `hash`)."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class RowErasure(NamedTuple):
    """One eraser of a batch and the batch positions of the items it erases."""

    eraser: ConceptEraser
    positions: Tensor
    """int64 `[b]` positions in the batch of prompt items, on the block output's device."""


def erase_rows(hidden: Tensor, context: HookContext, erasures: list[RowErasure]) -> Tensor:
    """The block output `[R, C, H, W]` with each eraser applied to its items' rows in every CFG half (R = 2B with
    guidance: diffusers stacks `[uncond; cond]`); rows of items that erase nothing are left as they are."""
    halves = 2 if context.do_cfg else 1
    batch = hidden.shape[0] // halves
    if len(erasures) == 1 and len(erasures[0].positions) == batch:  # one eraser for the whole batch: no gather
        return erasures[0].eraser.apply(hidden, context.step)
    out = hidden.clone()
    for eraser, positions in erasures:
        rows = torch.cat([positions + half * batch for half in range(halves)])  # [halves·b]
        out[rows] = eraser.apply(hidden[rows], context.step)
    return out


class HookedDiffusion(pl.LightningModule):
    """Generates a batch of prompt items with a local diffusers pipeline, capturing and/or erasing at a hookpoint."""

    def __init__(self, pipeline: str, hookpoint: str = PUBLISHED_HOOKPOINT,
                 capture: CaptureConfig | None = None, erasure: ErasureConfig | None = None, num_steps: int = 50,
                 guidance_scale: float = 9.0, height: int = 512, width: int = 512,
                 output_type: Literal["latent", "image"] = "latent", dtype: str = "float32",
                 scheduler: SchedulerChoice = "ddim"):
        """
        Args:
            pipeline: Local diffusers pipeline folder (SD 1.x/2.x or SDXL), loaded with `load_pipeline`.
            hookpoint: Block whose output is captured and/or erased, e.g. `unet.up_blocks.1.attentions.1`.
            capture: What to capture; `None` generates without capturing.
            erasure: SAE, statistics and per-concept parameters that erase each item's `erase` concepts at every
                UNet call, both CFG halves (docs/method.md §4); capture then sees the erased output, as the rest of the
                UNet does. `None`: items must erase nothing.
            num_steps: Sampling steps T. Published: 50 (caching), 100 (statistics and evaluation).
            guidance_scale: Classifier-free guidance scale. Published: 9.0.
            height: Image height in pixels (a multiple of 8). Published: 512.
            width: Image width in pixels (a multiple of 8). Published: 512.
            output_type: Return final `latent`s (no VAE decode: cheapest) or decoded `image`s.
            dtype: Pipeline weights dtype, e.g. `float16` on a GPU.
            scheduler: `ddim` (published) or `keep` the folder's scheduler.
        """
        super().__init__()
        self.save_hyperparameters()
        resolve_dtype(dtype)  # a bad name fails here, not after the pipeline loaded
        if num_steps < 1:
            raise ValueError(f"model.num_steps must be a positive number of sampling steps, got {num_steps}.")
        if height % 8 or width % 8 or height < 8 or width < 8:
            raise ValueError(f"model.height and model.width must be positive multiples of 8, got {height}×{width}.")
        if capture is not None:
            outside = [step for step in capture.steps or [] if not 0 <= step < num_steps]
            if outside:
                raise ValueError(f"model.capture.steps {outside} lie outside 0..{num_steps - 1} (model.num_steps).")
            if not any(capture.new_capture().keeps(step) for step in range(num_steps)):
                raise ValueError(f"model.capture keeps no step: none of {capture.steps} is a multiple of "
                                 f"capture.every={capture.every}.")
        self.capture, self.erasure = capture, erasure
        # Statistics of another step count or hookpoint are refused here, before any pipeline loads.
        self.erasers = ErasureBuilder(erasure, hookpoint, num_steps) if erasure is not None else None
        self.pipe: DiffusionPipeline | None = None

    def setup(self, stage: str) -> None:
        """Load the pipeline (and move the erasure SAE) onto this process's device, which Lightning sets before
        `setup`."""
        if self.pipe is None:
            self.pipe = load_pipeline(self.hparams.pipeline, scheduler=self.hparams.scheduler,
                                      dtype=self.hparams.dtype, device=self.device)
            resolve_hookpoint(self.pipe, self.hparams.hookpoint)  # an unknown hookpoint fails before generating
        if self.erasers is not None:
            self.erasers.to(self.device)

    def on_predict_start(self) -> None:
        """Build the eraser of every erasure the prompt items ask for, so that an unknown concept or a missing
        parameter fails before the first image rather than hours into a run."""
        items: list[PromptItem] = getattr(self.trainer.datamodule, "items", [])
        for erase, candidate in dict.fromkeys((item.erase, item.candidate) for item in items):
            self.eraser_for(erase, candidate)

    def eraser_for(self, erase: tuple[str, ...], candidate: Candidate | None = None) -> ConceptEraser | None:
        """The eraser of one erased set (with a search candidate's parameters); `None` for `()` (no erasure)."""
        if not erase:
            return None
        if self.erasers is None:
            raise ValueError(f"Prompt items erase {list(erase)} but model.erasure is not set; give the SAE, "
                             "statistics and class_params to erase with.")
        return self.erasers.eraser_for(erase, candidate)

    @torch.no_grad()
    def generate(self, items: list[PromptItem]) -> GenerationOutput:
        """Generate one batch of prompt items in one pipeline call (call `setup` first when not run by a Trainer).

        Items are grouped by erasure (erased set and candidate); at every UNet call each group's eraser rewrites its
        items' rows of the block output, and the items that erase nothing pass through untouched. A row's values do
        not depend on the other rows (each image has its own noise), so mixing erasures changes nothing but
        rounding.
        """
        if self.pipe is None:
            raise RuntimeError("HookedDiffusion.generate needs the pipeline: call setup('predict') first.")
        groups: dict[tuple[tuple[str, ...], Candidate | None], list[int]] = {}
        for position, item in enumerate(items):
            groups.setdefault((item.erase, item.candidate), []).append(position)
        erasures = [RowErasure(eraser, torch.tensor(positions, device=self.device))
                    for erasure, positions in groups.items() if (eraser := self.eraser_for(*erasure)) is not None]
        # CPU generators: the noise is also independent of the device (diffusers moves it after drawing).
        generators = [torch.Generator().manual_seed(image_seed(item.seed, item.prompt_id)) for item in items]
        capture = self.capture.new_capture() if self.capture is not None else None
        hooked = capture is not None or bool(erasures)
        on_output = partial(self._on_block_output, erasures, capture)
        with hook_block(self.pipe, self.hparams.hookpoint, on_output) if hooked else nullcontext():
            images = self.pipe([item.prompt for item in items], num_inference_steps=self.hparams.num_steps,
                               guidance_scale=self.hparams.guidance_scale, height=self.hparams.height,
                               width=self.hparams.width, generator=generators,
                               output_type="latent" if self.hparams.output_type == "latent" else "pt").images
        steps = sorted(capture.tokens) if capture is not None else []
        return GenerationOutput(items=list(items), activations=capture.stack() if capture is not None else None,
                                steps=steps, timesteps=[int(self.pipe.scheduler.timesteps[step]) for step in steps],
                                images=images.float().cpu())

    @staticmethod
    def _on_block_output(erasures: list[RowErasure], capture: ActivationCapture | None, hidden: Tensor,
                         context: HookContext) -> Tensor | None:
        if erasures:
            hidden = erase_rows(hidden, context, erasures)
        if capture is not None:
            capture(hidden, context)
        return hidden if erasures else None

    def predict_step(self, batch: list[PromptItem], batch_idx: int, dataloader_idx: int = 0) -> GenerationOutput:
        return self.generate(batch)
