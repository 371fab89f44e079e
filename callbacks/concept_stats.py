"""`ConceptStatsCallback`: per-concept mean SAE codes of a `predict` run, the concept statistics (docs/method.md §3.1).

`HookedDiffusion` captures the conditional CFG half at the hookpoint at every sampling step; this callback encodes
each captured map with the SAE (per-token TopK, as the eraser does), averages the code over the map's tokens by
scattering the k values of each token (the dense `[tokens, L]` code is never formed), and adds the `[B, L]` result to
streaming per-(concept, step) sums, so memory is `O(C·T·L)` whatever the number of images. When predicting ends the
ranks' sums are all-reduced and rank 0 writes `ConceptStats` (and, if asked, the published pickle format).

Which images count for which concept (`object_prompts`):
- `plain` (default, the published protocol): an object's statistics come from its plain prompts only, so they
  describe the object without any style; a style's from every styled prompt of that style.
- `all`: an object's statistics also include its styled prompts.
The statistics cover the concepts that receive at least one image, objects first, in vocabulary order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch

from callbacks.writer import PromptWriter
from saemnesia.generation import CaptureConfig, GenerationOutput, HookedDiffusion, PromptItem
from saemnesia.sae import SparseAutoencoder
from saemnesia.stats import ConceptStatsAccumulator

ObjectPrompts = Literal["plain", "all"]


def item_concepts(item: PromptItem, object_prompts: ObjectPrompts) -> list[str]:
    """The concepts whose statistics an image counts for: its style if styled, its object if plain (or always)."""
    counts_for_object = item.style is None or object_prompts == "all"
    return [*([item.object] if counts_for_object else []), *([item.style] if item.style is not None else [])]


class ConceptStatsCallback(PromptWriter):
    """Streams the mean SAE code per concept and sampling step of a capture run into a `ConceptStats` file."""

    needs_capture = CaptureConfig(halves="cond", every=1, steps=None)  # the conditional half at every step
    allows_erasure = False

    def __init__(self, sae: str, output: str, reference_pickle: str | None = None,
                 object_prompts: ObjectPrompts = "plain"):
        """
        Args:
            sae: SAE folder, or its parent holding `<model.hookpoint>/`: the (fine-tuned) SAE that will erase.
            output: Statistics file to write (`ConceptStats.save`), e.g. `runs/toy/stats/concept_stats.safetensors`.
            reference_pickle: Also write the published pickle format `{concept: Tensor[1, T, L]}` here; `None`: don't.
            object_prompts: `plain` (published): objects count only their plain prompts; `all`: also styled ones.
        """
        super().__init__()
        if object_prompts not in ("plain", "all"):
            raise ValueError(f"ConceptStatsCallback object_prompts must be 'plain' or 'all', got {object_prompts!r}.")
        self.sae_path, self.output = sae, Path(output)
        self.reference_pickle = Path(reference_pickle) if reference_pickle is not None else None
        self.object_prompts = object_prompts
        self.sae: SparseAutoencoder | None = None
        self.accumulator: ConceptStatsAccumulator | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.sae = SparseAutoencoder.load(self.sae_path, pl_module.hparams.hookpoint).to(pl_module.device)
        vocabulary = trainer.datamodule.vocabulary
        seen = {concept for item in trainer.datamodule.items for concept in item_concepts(item, self.object_prompts)}
        concepts = [name for name in vocabulary.concepts if name in seen]
        # On the module's device: NCCL all-reduces only device tensors.
        self.accumulator = ConceptStatsAccumulator(concepts, pl_module.hparams.num_steps, self.sae.num_latents,
                                                   device=pl_module.device)

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: HookedDiffusion, prediction: GenerationOutput,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        channels = prediction.activations.shape[-1]  # [B, T, N, C]
        if batch_idx == 0 and channels != self.sae.d_in:  # every batch comes from the same hookpoint
            raise ValueError(f"Hookpoint {pl_module.hparams.hookpoint} outputs {channels} channels but the SAE "
                             f"{self.sae_path} has d_in={self.sae.d_in}; use the SAE trained at this hookpoint.")
        # Every image counts for at least one concept (its style, or its object when plain), some for two.
        pairs = [(row, concept) for row, item in enumerate(prediction.items)
                 for concept in item_concepts(item, self.object_prompts)]
        rows = torch.tensor([row for row, _ in pairs], device=self.sae.W_dec.device)  # [P]
        concept_ids = self.accumulator.concept_ids([concept for _, concept in pairs])  # [P]
        for position, step in enumerate(prediction.steps):
            tokens = prediction.activations[:, position].to(self.sae.W_dec.device, self.sae.W_dec.dtype)  # [B, N, C]
            self.accumulator.update(concept_ids, step, self.sae.mean_code(tokens)[rows])  # [P, L]

    def on_predict_end(self, trainer: pl.Trainer, pl_module: HookedDiffusion) -> None:
        self.accumulator.all_reduce()
        if trainer.is_global_zero:
            stats = self.accumulator.finalize(metadata={
                "hookpoint": pl_module.hparams.hookpoint, "sae": str(self.sae_path),
                "sae_digest": self.sae.checkpoint_digest,
                "pipeline": pl_module.hparams.pipeline, "num_steps": pl_module.hparams.num_steps,
                "guidance_scale": pl_module.hparams.guidance_scale, "half": "cond",
                "object_prompts": self.object_prompts,
            })
            stats.save(self.output)
            if self.reference_pickle is not None:
                stats.to_reference(self.reference_pickle)
        trainer.strategy.barrier("concept-stats-written")
