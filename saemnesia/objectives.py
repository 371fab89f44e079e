"""Training objectives (docs/method.md §2): `nn.Module`s chosen in YAML by class path, each with its own options.

Called on the SAE and a batch, an objective returns a NamedTuple of its terms (`SAEModule` logs every scalar); its
training state (dead-latent counters, the concept → latent assignment) is in buffers, so `--ckpt_path` restores it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from saemnesia.assignment import estimate_concept_latents
from saemnesia.concepts import NO_STYLE, ConceptVocabulary, check_concept_latents, load_concept_latents
from saemnesia.sae import EncoderBackward, SparseAutoencoder

if TYPE_CHECKING:
    from saemnesia.training import SAEModule


def check_weights(**weights: float) -> None:
    """Refuse negative loss weights: a negative weight rewards its term, so the loss falls without bound."""
    negative = {name: value for name, value in weights.items() if value < 0}
    if negative:
        raise ValueError(f"model.objective weights must be >= 0; got {negative}.")


class Objective(nn.Module):
    """The hooks `SAEModule` calls, as no-ops; `forward(sae, batch)` returns the objective's terms, `loss` first."""

    renormalises_decoder = False
    """Keep decoder rows at unit norm around each optimizer step (docs/method.md §2.1; fine-tuning leaves them free)."""

    def bind(self, sae: SparseAutoencoder, vocabulary: ConceptVocabulary | None) -> None:
        """Size the state for `sae` and check what the objective needs; `SAEModule.__init__` calls it once."""

    def on_fit_start(self, module: SAEModule) -> None:
        """Set-up before the first step, with the trainer and data attached."""

    def on_train_batch_start(self, module: SAEModule, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Before each training batch."""

    def epoch_metrics(self, stage: str) -> dict[str, Metric]:
        """Metrics of `stage` (`train`, `val`) updated by `forward`, logged as epoch values synced over ranks."""
        return {}

    @property
    def concept_latents(self) -> dict[str, int] | None:
        """The `{concept: latent}` assignment, once there is one."""
        return None


class UnsupervisedTerms(NamedTuple):
    loss: Tensor
    """`fvu + auxk_alpha · auxk + multi_topk_weight · multi_topk_fvu`, a scalar."""
    fvu: Tensor
    auxk: Tensor
    multi_topk_fvu: Tensor
    l0: Tensor
    """Active latents per token."""
    dead_fraction: Tensor
    """Share of latents counted dead after this batch."""


class UnsupervisedObjective(Objective):
    """SAeUron-style pre-training (docs/method.md §2.1): FVU + AuxK (+ Multi-TopK) with the SAE's TopK variant."""

    def __init__(self, auxk_alpha: float = 1 / 32, multi_topk_weight: float = 1 / 8,
                 encoder_backward: EncoderBackward = "sparse", dead_feature_threshold: int = 10_000_000):
        """
        Args:
            auxk_alpha: Weight of the AuxK dead-latent loss; 1/32 as published (Gao et al. 2024).
            multi_topk_weight: Weight of the Multi-TopK FVU; only used when the SAE's `cfg.multi_topk` is set.
            encoder_backward: How the encoder's gradient is computed (`SparseAutoencoder.forward`), the same gradient
                either way: `sparse` through the latents the loss reads only, `dense` through the `[N, L]`
                pre-activations. Timings in benchmarks/RESULTS.md.
            dead_feature_threshold: Tokens without firing after which a latent counts as dead. Published: 10M.
        """
        super().__init__()
        check_weights(auxk_alpha=auxk_alpha, multi_topk_weight=multi_topk_weight)
        self.auxk_alpha, self.multi_topk_weight = auxk_alpha, multi_topk_weight
        self.encoder_backward, self.dead_feature_threshold = encoder_backward, dead_feature_threshold

    def bind(self, sae: SparseAutoencoder, vocabulary: ConceptVocabulary | None) -> None:
        self.renormalises_decoder = sae.cfg.normalize_decoder
        self.register_buffer("tokens_since_fired", torch.zeros(sae.num_latents, dtype=torch.long,
                                                               device=sae.W_dec.device))

    @property
    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.dead_feature_threshold

    def on_train_batch_start(self, module: SAEModule, batch: dict[str, Tensor], batch_idx: int) -> None:
        if module.hparams.init_from is None and module.global_step == 0 and batch_idx == 0:
            # A fresh SAE's b_dec starts at the geometric median of rank 0's first batch, on every rank
            # (docs/method.md §2.1).
            module.sae.init_b_dec_to_geometric_median(batch["act"])
            module.sae.b_dec.data.copy_(module.trainer.strategy.broadcast(module.sae.b_dec.data, src=0))

    def forward(self, sae: SparseAutoencoder, batch: dict[str, Tensor]) -> UnsupervisedTerms:
        """`batch["act"]`: tokens `[..., d]`. In training mode AuxK reads the dead latents and the counters move."""
        x = batch["act"]
        tokens = x.numel() // sae.d_in
        out = sae(x, dead_mask=self.dead_mask if self.training else None, encoder_backward=self.encoder_backward)
        if self.training:
            self.record_firing(out.latent_indices, out.latent_acts, tokens)
        loss = out.fvu + self.auxk_alpha * out.auxk_loss + self.multi_topk_weight * out.multi_topk_fvu
        return UnsupervisedTerms(loss, out.fvu, out.auxk_loss, out.multi_topk_fvu, (out.latent_acts > 0).sum() / tokens,
                                 self.dead_mask.float().mean())

    @torch.no_grad()
    def record_firing(self, latent_indices: Tensor, latent_acts: Tensor, tokens: int) -> None:
        """Move the counters by one batch of `tokens` tokens whose code is `latent_indices`/`latent_acts` (any layout),
        summed over DDP ranks first: a latent that fired on any rank is alive on every rank. No host sync."""
        counts = torch.zeros(len(self.tokens_since_fired) + 1, dtype=torch.long, device=latent_indices.device)
        counts.index_add_(0, latent_indices.flatten(), (latent_acts.flatten() > 0).long())  # [L] firings
        counts[-1] = tokens  # [L + 1]: the token count travels in the same reduction
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        self.tokens_since_fired.add_(counts[-1]).masked_fill_(counts[:-1] > 0, 0)


class SupervisedTerms(NamedTuple):
    loss: Tensor
    """`λ_rec·reconstruction + λ_ce·(bce + decorrelation_weight·decorrelation) + λ_sp·sparsity`, a scalar."""
    reconstruction: Tensor
    """Plain MSE `mean((x̂ − x)²)` over all elements."""
    bce: Tensor
    """Masked BCE of the pooled activations of the assigned latents against the sample's concepts."""
    decorrelation: Tensor
    """Mean squared Pearson correlation between object-latent and style-latent logits across the batch."""
    sparsity: Tensor
    """`mean(|clamp(A, −c, c)|)` of the dense pre-TopK activations."""
    fvu: Tensor
    """Fraction of variance unexplained of the reconstruction (logged, not optimised)."""
    l0: Tensor
    """Active latents per token."""
    concept_logits: Tensor
    """Pooled logits of the assigned latents `[B, n_objects + n_styles]`, objects first (not logged)."""


class SupervisedObjective(Objective):
    """SAEmnesia's concept binding (docs/method.md §2.2): per-token TopK fine-tuning that ties each concept to one
    latent."""

    def __init__(self, rec_weight: float = 1.0, concept_weight: float = 3.0, decorrelation_weight: float = 0.1,
                 sparsity_weight: float = 0.01, sparsity_clamp: float = 100.0,
                 concept_logits: Literal["post_relu", "pre_relu"] = "post_relu",
                 concept_latents: dict[str, int] | str | None = None, assignment_batches: int = 32):
        """
        Args:
            rec_weight: λ_rec, weight of the reconstruction MSE. Published: 1.0.
            concept_weight: λ_ce, weight of the concept term (BCE + decorrelation). Published: 3.0.
            decorrelation_weight: Weight of the object/style decorrelation inside the concept term. Published: 0.1.
            sparsity_weight: λ_sp, weight of the L1 penalty on the dense activations. Published: 0.01.
            sparsity_clamp: Activations are clamped to ±this before the L1 penalty, as published.
            concept_logits: Pool the post-ReLU activations (faithful: logits ≥ 0, so negatives never go below
                σ(0) = 0.5) or the pre-ReLU ones (negatives can be pushed down).
            concept_latents: Explicit `{concept: latent}` or a `concept_latents.json` path; `None` = assign greedily
                from importance scores of the starting SAE on `assignment_batches` training batches.
            assignment_batches: At most this many batches per process, read in one ordered pass over the training
                shards (each image once), estimate the importance scores for the assignment; too few make it a draw
                (docs/toycanvas.md).
        """
        super().__init__()
        check_weights(rec_weight=rec_weight, concept_weight=concept_weight, decorrelation_weight=decorrelation_weight,
                      sparsity_weight=sparsity_weight, sparsity_clamp=sparsity_clamp)
        self.rec_weight, self.concept_weight, self.decorrelation_weight = rec_weight, concept_weight, decorrelation_weight
        self.sparsity_weight, self.sparsity_clamp, self.concept_logits = sparsity_weight, sparsity_clamp, concept_logits
        self.given_latents, self.assignment_batches = concept_latents, assignment_batches

    def bind(self, sae: SparseAutoencoder, vocabulary: ConceptVocabulary | None) -> None:
        if vocabulary is None:
            raise ValueError("model.objective SupervisedObjective needs the concept vocabulary (link data.vocabulary).")
        self.vocabulary = vocabulary
        # The latent of each concept of the vocabulary, objects first; -1 until assigned.
        self.register_buffer("latents", torch.full((len(vocabulary.concepts),), -1, device=sae.W_dec.device))
        if isinstance(self.given_latents, str):
            self.assign(load_concept_latents(self.given_latents, vocabulary, sae.num_latents))
        elif self.given_latents is not None:
            check_concept_latents(self.given_latents, "model.objective.concept_latents", vocabulary, sae.num_latents)
            self.assign(self.given_latents)
        names = ("object_hit_rate", "style_hit_rate") if vocabulary.styles else ("object_hit_rate",)
        self.hit_rates = nn.ModuleDict({f"{stage}_{name}": WeightedMean()
                                        for stage in ("train", "val") for name in names})

    def assign(self, concept_latents: dict[str, int]) -> None:
        self.latents.copy_(torch.tensor([concept_latents[name] for name in self.vocabulary.concepts]))

    @property
    def concept_latents(self) -> dict[str, int] | None:
        latents = self.latents.tolist()
        return None if min(latents) < 0 else dict(zip(self.vocabulary.concepts, latents))

    def on_fit_start(self, module: SAEModule) -> None:
        if self.concept_latents is None:  # not given, nor restored from a checkpoint
            data = module.trainer.datamodule
            self.assign(estimate_concept_latents(module.sae, data.train_pass_dataloader(self.assignment_batches),
                                                 self.vocabulary, data.num_steps, self.assignment_batches))

    def epoch_metrics(self, stage: str) -> dict[str, Metric]:
        return {name.removeprefix(f"{stage}_"): metric for name, metric in self.hit_rates.items()
                if name.startswith(f"{stage}_")}

    def forward(self, sae: SparseAutoencoder, batch: dict[str, Tensor]) -> SupervisedTerms:
        """Loss of a batch of maps: `act [B, N, d]` (one image × one step per sample), `object [B]` and `style [B]`
        indices (`NO_STYLE` for plain prompts). Updates the hit rates of the mode's stage."""
        x, objects, styles = batch["act"], batch["object"], batch["style"]
        dense = sae.pre_acts(x)  # A [B, N, L]: the dense pre-TopK code, the only [B, N, L] tensor kept
        top_acts, top_indices = sae.topk(dense)  # [B, N, k]: per-token TopK whatever the SAE was trained with
        x_hat = sae.decode(top_acts, top_indices)  # [B, N, d]
        reconstruction = (x_hat - x).pow(2).mean()

        num_objects = len(self.vocabulary.objects)
        if self.concept_logits == "post_relu":
            pooled = dense[..., self.latents]  # [B, N, |S|]
        else:  # the assigned latents' pre-ReLU values alone
            pooled = F.linear(x - sae.b_dec, sae.encoder.weight[self.latents], sae.encoder.bias[self.latents])
        logits = pooled.mean(1)  # Ā_S [B, |S|]
        concepts = torch.stack([objects, torch.where(styles == NO_STYLE, objects, num_objects + styles)], 1)  # [B, 2]
        targets = torch.zeros_like(logits).scatter_(1, concepts, 1.0)  # the object's and (unless plain) style's
        bce = F.binary_cross_entropy_with_logits(logits, targets)
        decorrelation = squared_correlation(logits[:, :num_objects], logits[:, num_objects:])
        sparsity = dense.clamp(max=self.sparsity_clamp).mean()  # mean |clamp(A, −c, c)| of A ≥ 0
        loss = (self.rec_weight * reconstruction + self.concept_weight * (bce + self.decorrelation_weight * decorrelation)
                + self.sparsity_weight * sparsity)

        flat_x, flat_x_hat = x.reshape(-1, sae.d_in), x_hat.reshape(-1, sae.d_in)  # [B·N, d]
        fvu = (flat_x_hat - flat_x).pow(2).sum() / (flat_x - flat_x.mean(0)).pow(2).sum()
        self._update_hit_rates(logits.detach(), objects, styles, num_objects)
        return SupervisedTerms(loss, reconstruction, bce, decorrelation, sparsity, fvu.detach(),
                               (top_acts > 0).sum() / len(flat_x), logits)

    def _update_hit_rates(self, logits: Tensor, objects: Tensor, styles: Tensor, num_objects: int) -> None:
        """The share of samples whose object latent has the largest logit among the object latents, and the same for
        styles over the styled samples, as weighted means that sync over ranks (no host sync)."""
        stage = "train" if self.training else "val"
        self.hit_rates[f"{stage}_object_hit_rate"].update((logits[:, :num_objects].argmax(1) == objects).float())
        if self.vocabulary.styles:
            self.hit_rates[f"{stage}_style_hit_rate"].update((logits[:, num_objects:].argmax(1) == styles).float(),
                                                             weight=(styles != NO_STYLE).float())


class WeightedMean(Metric):
    """`Σ w·v / Σ w` over an epoch and the DDP ranks. (torchmetrics' MeanMetric checks for NaN with a host sync
    per update, and without the check it drops the weights.)"""

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("weight", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, value: Tensor, weight: Tensor | None = None) -> None:
        weight = torch.ones_like(value) if weight is None else weight
        self.total += (value * weight).sum()
        self.weight += weight.sum()

    def compute(self) -> Tensor:
        return self.total / self.weight


def squared_correlation(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Mean over column pairs of the squared Pearson correlation across the batch: `a [B, P]`, `b [B, Q]`."""
    if a.shape[1] == 0 or b.shape[1] == 0:
        return a.new_zeros(())
    a, b = a - a.mean(0), b - b.mean(0)
    correlation = (a.T @ b) / (a.pow(2).sum(0).add(eps).sqrt()[:, None] * b.pow(2).sum(0).add(eps).sqrt()[None, :])
    return correlation.pow(2).mean()  # [P, Q] → scalar
