"""`SAEModule`: the LightningModule of `fit` — unsupervised pre-training or supervised concept binding.

Lightning owns the loop, DDP, precision, clipping, checkpoints and logging; this module owns the SAE, the
objective, the dead-latent counters and the concept → latent assignment, all of which are restored exactly by
`--ckpt_path` (buffers and checkpoint entries).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from saemnesia.concepts import NO_STYLE, ConceptVocabulary, assign_latents, check_concept_latents, load_concept_latents
from saemnesia.objectives import SupervisedLoss, SupervisedTerms, UnsupervisedLoss, UnsupervisedTerms
from saemnesia.sae import SaeConfig, SparseAutoencoder
from saemnesia.stats import ConceptStats

Reduce = Callable[[Tensor], Tensor]
"""Sums a tensor over DDP ranks (the identity on one process)."""

# The hyper-parameters stored in Lightning checkpoints include these plain dataclasses; allow them through
# `torch.load(weights_only=True)`, which resuming uses.
torch.serialization.add_safe_globals([ConceptVocabulary, SaeConfig, UnsupervisedLoss, SupervisedLoss])


class DeadLatentTracker(nn.Module):
    """Tokens seen since each latent last fired, summed over DDP ranks (SPEC §2.1).

    A latent is alive if it fired on *any* rank: the per-rank "fired" counts and token counts are summed across
    ranks before the counters move, so every rank holds the same counters.
    """

    def __init__(self, num_latents: int, threshold: int):
        super().__init__()
        self.threshold = threshold
        self.register_buffer("tokens_since_fired", torch.zeros(num_latents, dtype=torch.long))

    @property
    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.threshold

    @torch.no_grad()
    def update(self, latent_indices: Tensor, latent_acts: Tensor, reduce: Reduce | None = None) -> None:
        """Record one step's codes `[N, K]`; `reduce(tensor)` sums a tensor over ranks (identity when None)."""
        fired = torch.zeros_like(self.tokens_since_fired)
        fired.index_add_(0, latent_indices.flatten(), (latent_acts.flatten() > 0).long())  # [L] firing counts
        tokens = torch.tensor([latent_indices.shape[0]], device=fired.device)
        if reduce is not None:
            fired, tokens = reduce(fired), reduce(tokens)
        self.tokens_since_fired += tokens
        self.tokens_since_fired[fired > 0] = 0


class SAEModule(pl.LightningModule):
    """Trains a `SparseAutoencoder` on activation batches of an `ActivationDataModule`."""

    def __init__(
        self,
        d_in: int,
        activations_hookpoint: str,
        vocabulary: ConceptVocabulary | None = None,
        objective: Literal["unsupervised", "supervised"] = "unsupervised",
        sae: SaeConfig | None = None,
        init_from: str | None = None,
        unsupervised: UnsupervisedLoss | None = None,
        supervised: SupervisedLoss | None = None,
        concept_latents: dict[str, int] | str | None = None,
        assignment_batches: int = 32,
        lr: float = 4e-4,
        lr_schedule: Literal["constant", "linear_decay", "cosine"] = "linear_decay",
        warmup_steps: int = 0,
        dead_feature_threshold: int = 10_000_000,
    ):
        """
        Args:
            d_in: Activation width; linked from the data manifest (`data.d_in`).
            activations_hookpoint: Block the activations come from; linked from the manifest (`data.hookpoint`),
                names the exported SAE folder. (Not `hookpoint`: that names the block to hook in `predict` runs.)
            vocabulary: Concepts of the data; linked from the manifest. Needed by the supervised objective.
            objective: `unsupervised` (FVU + AuxK, SPEC §2.1) or `supervised` (concept binding, SPEC §2.2).
            sae: Architecture of a fresh SAE (ignored with `init_from`). Default: expansion 16, k 32.
            init_from: SAE checkpoint folder to start from (fine-tuning, as published); `None` = fresh init.
            unsupervised: Weights of the unsupervised loss.
            supervised: Weights of the supervised loss.
            concept_latents: Explicit `{concept: latent}` or a `concept_latents.json` path; `None` = assign
                greedily from importance scores of the starting SAE on `assignment_batches` training batches.
            assignment_batches: At most this many batches per process, read in one ordered pass over the training
                shards (each image once), estimate the importance scores for the assignment. Too few make it a
                draw: on ToyCanvas, 16 batches (about 100 images) gave Square a different latent with every seed.
            lr: Adam learning rate. Published: 4e-4 (unsupervised), 5e-6 (supervised).
            lr_schedule: `linear_decay` to 0 over `trainer.max_steps` (published unsupervised), `constant`
                (published supervised) or `cosine` to 0.
            warmup_steps: Linear warm-up steps before the schedule (published: none).
            dead_feature_threshold: Tokens without firing after which a latent counts as dead. Published: 10M.
        """
        super().__init__()
        self.save_hyperparameters()
        if lr <= 0:
            raise ValueError(f"model.lr must be positive, got {lr}.")
        if init_from is not None:
            self.sae = SparseAutoencoder.load(init_from, activations_hookpoint)  # the folder or its parent
            if self.sae.d_in != d_in:
                raise ValueError(f"model.init_from {init_from} is an SAE for d_in={self.sae.d_in} but the "
                                 f"activation data has d_in={d_in}.")
        else:
            self.sae = SparseAutoencoder(d_in, sae or SaeConfig())
        self.objective = objective
        self.unsupervised_loss = unsupervised or UnsupervisedLoss()
        self.supervised_loss = supervised or SupervisedLoss()
        self.dead_latents = DeadLatentTracker(self.sae.num_latents, dead_feature_threshold)
        self.vocabulary = vocabulary
        self.concept_latents: dict[str, int] | None = None
        self._latent_tensors: tuple[Tensor, Tensor] | None = None  # concept_latents as index tensors, cached
        # Validation hit rates are weighted means synced over ranks at epoch end: a rank whose batches hold no
        # styled sample still takes part in the reduction (a plain `self.log` of a missing key would hang DDP).
        self.val_hit_rates = nn.ModuleDict({name: MeanMetric() for name in HIT_RATES})
        if objective == "supervised":
            if vocabulary is None:
                raise ValueError("model.objective=supervised needs the concept vocabulary (link data.vocabulary).")
            if isinstance(concept_latents, str):
                self.concept_latents = load_concept_latents(concept_latents, vocabulary, self.sae.num_latents)
            elif concept_latents is not None:
                check_concept_latents(concept_latents, "model.concept_latents", vocabulary, self.sae.num_latents)
                self.concept_latents = dict(concept_latents)

    # -- set-up ---------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.objective == "supervised" and self.concept_latents is None:
            data, batches = self.trainer.datamodule, self.hparams.assignment_batches
            self.concept_latents = estimate_concept_latents(
                self.sae, data.train_pass_dataloader(batches), self.vocabulary, num_steps=data.num_steps,
                num_batches=batches, reduce=self._sum_over_ranks)

    def on_after_batch_transfer(self, batch: dict[str, Tensor], dataloader_idx: int) -> dict[str, Tensor]:
        # Batches come as stored (float16): converting here, on the device, halves what the loader moves.
        batch["act"] = batch["act"].to(self.sae.W_dec.dtype)
        return batch

    def on_train_batch_start(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        fresh = self.hparams.init_from is None and self.global_step == 0 and batch_idx == 0
        if fresh and self.objective == "unsupervised":
            # Every rank must start from the same b_dec: rank 0's median is broadcast (SPEC §2.1 init).
            self.sae.init_b_dec_to_geometric_median(batch["act"])
            self.sae.b_dec.data.copy_(self.trainer.strategy.broadcast(self.sae.b_dec.data, src=0))

    def _sum_over_ranks(self, tensor: Tensor) -> Tensor:
        return self.trainer.strategy.reduce(tensor, reduce_op="sum")

    # -- steps ----------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        terms = self._loss(batch, dead_mask=self.dead_latents.dead_mask)
        self.dead_latents.update(terms.latent_indices, terms.latent_acts, reduce=self._sum_over_ranks)
        self._log_terms("train", terms, batch, on_step=True)
        self.log("train/dead_fraction", self.dead_latents.dead_mask.float().mean())
        return terms.loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._log_terms("val", self._loss(batch, dead_mask=None), batch, on_step=False)

    def _loss(self, batch: dict[str, Tensor], dead_mask: Tensor | None) -> UnsupervisedTerms | SupervisedTerms:
        if self.objective == "unsupervised":
            return self.unsupervised_loss(self.sae, batch["act"], dead_mask)
        object_latents, style_latents = self._assigned_latents()
        return self.supervised_loss(self.sae, batch["act"], batch["object"], batch["style"],
                                    object_latents, style_latents)

    def _assigned_latents(self) -> tuple[Tensor, Tensor]:
        """The latents of the vocabulary's objects `[n_objects]` and styles `[n_styles]`."""
        if self._latent_tensors is None or self._latent_tensors[0].device != self.device:
            self._latent_tensors = tuple(
                torch.tensor([self.concept_latents[name] for name in names], device=self.device, dtype=torch.long)
                for names in (self.vocabulary.objects, self.vocabulary.styles))
        return self._latent_tensors

    def _log_terms(self, stage: str, terms: UnsupervisedTerms | SupervisedTerms, batch: dict[str, Tensor],
                   on_step: bool) -> None:
        """Every loss term, L0 and (supervised) the concept hit rates; epoch means synced over ranks."""
        options = dict(on_step=on_step, on_epoch=not on_step, sync_dist=not on_step, batch_size=1)
        for name, value in terms._asdict().items():
            if value.ndim == 0:
                self.log(f"{stage}/{name}", value.detach(), prog_bar=name == "loss", **options)
        self.log(f"{stage}/l0", (terms.latent_acts > 0).sum(-1).float().mean(), **options)
        if self.objective != "supervised":
            return
        hits = concept_hit_rates(terms.concept_logits.detach(), batch["object"], batch["style"],
                                 len(self.vocabulary.objects))
        for name, (rate, count) in hits.items():
            if stage == "val":
                self.val_hit_rates[name].update(rate, weight=count)
                self.log(f"val/{name}", self.val_hit_rates[name], on_step=False, on_epoch=True)
            elif count > 0:
                self.log(f"{stage}/{name}", rate, **options)

    # -- optimisation ---------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.Adam(self.sae.parameters(), lr=self.hparams.lr)
        total, warmup, schedule = self.trainer.max_steps, self.hparams.warmup_steps, self.hparams.lr_schedule
        if schedule != "constant" and total <= 0:
            raise ValueError(f"model.lr_schedule={schedule} needs trainer.max_steps > 0 (training runs on step "
                             "counts).")

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            if schedule == "linear_decay":
                return 1.0 - progress
            if schedule == "cosine":
                return 0.5 * (1.0 + math.cos(math.pi * progress))
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._renormalises_decoder:
            self.sae.remove_gradient_parallel_to_decoder_directions()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self._renormalises_decoder:
            self.sae.set_decoder_norm_to_unit_norm()

    @property
    def _renormalises_decoder(self) -> bool:
        # Fine-tuning leaves the decoder free (SPEC §2.2); pre-training keeps unit rows if the config asks.
        return self.objective == "unsupervised" and self.sae.cfg.normalize_decoder

    # -- checkpoints ----------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["concept_latents"] = self.concept_latents

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.concept_latents = checkpoint.get("concept_latents")
        self._latent_tensors = None


HIT_RATES = ("object_hit_rate", "style_hit_rate")


def concept_hit_rates(logits: Tensor, objects: Tensor, styles: Tensor, num_objects: int
                      ) -> dict[str, tuple[Tensor, int]]:
    """`(rate, samples)` per hit rate: the share of samples whose object latent has the largest pooled logit
    among the object latents, and the same for styles over the styled samples (rate 0 when there are none)."""
    object_hits = (logits[:, :num_objects].argmax(1) == objects).float()
    styled = styles != NO_STYLE
    style_hits = (logits[styled, num_objects:].argmax(1) == styles[styled]).float()
    return {"object_hit_rate": (object_hits.mean(), len(object_hits)),
            "style_hit_rate": (style_hits.sum() / max(1, len(style_hits)), len(style_hits))}


@torch.no_grad()
def estimate_concept_latents(sae: SparseAutoencoder, batches: Iterable[dict[str, Tensor]],
                             vocabulary: ConceptVocabulary, num_steps: int, num_batches: int | None = None,
                             reduce: Reduce | None = None) -> dict[str, int]:
    """SPEC §2.2 steps 1-3 on training batches: importance of every concept per step with the starting SAE,
    averaged over the steps every concept was seen at, then the greedy assignment.

    `SAEModule` passes the ordered training pass (`ActivationDataModule.train_pass_dataloader`). Images per
    (concept, step) can still differ (a cap stops mid-pass, a run may keep only some steps), so each step's
    statistics weight the concepts by that step's own counts. `num_batches` caps any iterable (`None`: all of it).
    """
    num_objects, num_concepts = len(vocabulary.objects), len(vocabulary.concepts)
    sums = torch.zeros(num_concepts, num_steps, sae.num_latents, dtype=torch.float64, device=sae.W_dec.device)
    counts = torch.zeros(num_concepts, num_steps, dtype=torch.float64, device=sae.W_dec.device)
    for batch in itertools.islice(batches, num_batches):
        x = batch["act"].to(sae.W_dec.device, sae.W_dec.dtype)  # [B, N, d], delivered as stored (float16)
        acts, indices = sae.encode(x)  # [B, N, k], per-token TopK as fine-tuning uses
        codes = torch.zeros(*x.shape[:2], sae.num_latents, device=x.device).scatter_(-1, indices, acts)
        codes_mean = codes.mean(1).double()  # [B, L]: token-averaged code per sample
        steps = batch["step"].to(x.device)
        styled = batch["style"].to(x.device) != NO_STYLE
        for concept, rows in ((batch["object"].to(x.device), slice(None)),
                              (num_objects + batch["style"].to(x.device)[styled], styled)):
            sums.index_put_((concept, steps[rows]), codes_mean[rows], accumulate=True)
            counts.index_put_((concept, steps[rows]), torch.ones_like(concept, dtype=counts.dtype), accumulate=True)
    if reduce is not None:
        sums, counts = reduce(sums), reduce(counts)
    seen = (counts > 0).all(0)  # steps at which every concept has samples
    if not seen.any():
        raise ValueError(f"The assignment batches (model.assignment_batches={num_batches}) do not show every concept "
                         f"of {vocabulary.concepts} at one step; raise it or give model.concept_latents.")
    scores = torch.stack([
        ConceptStats(vocabulary.concepts, (sums[:, t] / counts[:, t, None])[:, None], counts[:, t].long())
        .importance_all()[:, 0] for t in seen.nonzero().flatten().tolist()
    ]).mean(0)  # ā_c: [C, L]
    return assign_latents(scores, vocabulary)
