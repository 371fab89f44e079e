"""Training objectives (SPEC §2): unsupervised TopK pre-training and supervised concept binding.

Each objective is a dataclass of its weights (configured from YAML) that is called on an SAE and a batch and
returns a NamedTuple of every term, so the trainer logs exactly what it optimises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from saemnesia.concepts import NO_STYLE
from saemnesia.sae import EncoderBackward, SparseAutoencoder


class UnsupervisedTerms(NamedTuple):
    loss: Tensor
    """`fvu + auxk_alpha · auxk + multi_topk_weight · multi_topk_fvu`, a scalar."""
    fvu: Tensor
    auxk: Tensor
    multi_topk_fvu: Tensor
    latent_indices: Tensor
    """Active latents `[N, K]` of the TopK code, for the dead-latent counters."""
    latent_acts: Tensor
    """Their values `[N, K]` (zeros are padding in batch TopK codes)."""


@dataclass
class UnsupervisedLoss:
    """SAeUron-style pre-training loss (SPEC §2.1)."""

    auxk_alpha: float = 1 / 32
    """Weight of the AuxK dead-latent loss; 1/32 as published (Gao et al. 2024)."""
    multi_topk_weight: float = 1 / 8
    """Weight of the Multi-TopK FVU; only used when the SAE's `cfg.multi_topk` is set."""
    encoder_backward: EncoderBackward = "sparse"
    """How the encoder's gradient is computed (`SparseAutoencoder.forward`), the same gradient either way. `sparse`
    (used whenever this loss is): only through the latents it reads (TopK code, AuxK dead latents, Multi-TopK code),
    O(N·k·d) instead of O(N·L·d); at the published size on one CPU core forward + backward take half the time, 0.8×
    with AuxK at its widest (benchmarks/RESULTS.md). `dense`: through the dense `[N, L]` pre-activations. (The
    supervised loss is always dense: its L1 penalty and pooled concept logits read every latent.)"""

    def __post_init__(self) -> None:
        if min(self.auxk_alpha, self.multi_topk_weight) < 0:
            raise ValueError(f"model.unsupervised weights must be >= 0; got auxk_alpha={self.auxk_alpha}, "
                             f"multi_topk_weight={self.multi_topk_weight}.")

    def __call__(self, sae: SparseAutoencoder, x: Tensor, dead_mask: Tensor | None = None) -> UnsupervisedTerms:
        """`x`: tokens `[..., d]` (token-level batches, or maps `[B, N, d]` that are read as B·N tokens)."""
        out = sae(x, dead_mask=dead_mask, encoder_backward=self.encoder_backward)
        loss = out.fvu + self.auxk_alpha * out.auxk_loss + self.multi_topk_weight * out.multi_topk_fvu
        width = out.latent_indices.shape[-1]
        return UnsupervisedTerms(loss, out.fvu, out.auxk_loss, out.multi_topk_fvu,
                                 out.latent_indices.reshape(-1, width), out.latent_acts.reshape(-1, width))


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
    concept_logits: Tensor
    """Pooled logits of the assigned latents `[B, n_objects + n_styles]`, objects first."""
    latent_indices: Tensor
    """Active latents `[B·N, k]` of the per-token TopK code."""
    latent_acts: Tensor
    """Their values `[B·N, k]`."""


@dataclass
class SupervisedLoss:
    """SAEmnesia's concept-binding loss (SPEC §2.2); published weights `(1.0, 3.0, 0.01)`."""

    rec_weight: float = 1.0
    """λ_rec: weight of the reconstruction MSE."""
    concept_weight: float = 3.0
    """λ_ce: weight of the concept term (BCE + decorrelation)."""
    decorrelation_weight: float = 0.1
    """Weight of the object/style decorrelation inside the concept term; 0.1 as published."""
    sparsity_weight: float = 0.01
    """λ_sp: weight of the L1 penalty on the dense activations."""
    sparsity_clamp: float = 100.0
    """Activations are clamped to ±this before the L1 penalty, as published, so outliers do not dominate."""
    concept_logits: Literal["post_relu", "pre_relu"] = "post_relu"
    """Pool the post-ReLU activations (faithful: logits ≥ 0, so negatives never go below σ(0) = 0.5) or the
    pre-ReLU ones (negatives can be pushed down)."""

    def __post_init__(self) -> None:
        weights = {name: getattr(self, name) for name in
                   ("rec_weight", "concept_weight", "decorrelation_weight", "sparsity_weight", "sparsity_clamp")}
        negative = {name: value for name, value in weights.items() if value < 0}
        if negative:  # a negative weight rewards its term: the loss falls without bound instead of training
            raise ValueError(f"model.supervised weights must be >= 0; got {negative}.")

    def __call__(self, sae: SparseAutoencoder, x: Tensor, objects: Tensor, styles: Tensor,
                 object_latents: Tensor, style_latents: Tensor) -> SupervisedTerms:
        """Loss of a batch of maps.

        Args:
            x: activations `[B, N, d]`, one image × one step per sample.
            objects: object index per sample `[B]`.
            styles: style index per sample `[B]`, `NO_STYLE` (-1) for plain prompts.
            object_latents: latent of each object `[n_objects]`; style_latents: of each style `[n_styles]`.
        """
        batch, tokens, _ = x.shape
        pre_relu = sae.pre_relu_acts(x)  # [B, N, L]
        dense = F.relu(pre_relu)  # A: the dense pre-TopK code
        # Fine-tuning always uses per-token TopK, whatever the pre-trained SAE used (SPEC §2.2).
        top_acts, top_indices = sae.topk(dense)  # [B, N, k]
        x_hat = sae.decode(top_acts, top_indices)  # [B, N, d]
        reconstruction = (x_hat - x).pow(2).mean()

        assigned = torch.cat([object_latents, style_latents])  # S: [n_objects + n_styles]
        pooled_source = dense if self.concept_logits == "post_relu" else pre_relu
        logits = pooled_source[..., assigned].mean(dim=1)  # Ā restricted to S: [B, |S|]
        targets = concept_targets(objects, styles, len(object_latents), len(style_latents)).to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, targets)
        decorrelation = squared_correlation(logits[:, : len(object_latents)], logits[:, len(object_latents):])
        sparsity = dense.clamp(-self.sparsity_clamp, self.sparsity_clamp).abs().mean()

        loss = (self.rec_weight * reconstruction
                + self.concept_weight * (bce + self.decorrelation_weight * decorrelation)
                + self.sparsity_weight * sparsity)
        flat_x = x.reshape(batch * tokens, -1)  # [B·N, d]
        fvu = (x_hat.reshape(batch * tokens, -1) - flat_x).pow(2).sum() / (flat_x - flat_x.mean(0)).pow(2).sum()
        return SupervisedTerms(loss, reconstruction, bce, decorrelation, sparsity, fvu.detach(), logits,
                               top_indices.reshape(batch * tokens, -1), top_acts.reshape(batch * tokens, -1))


def concept_targets(objects: Tensor, styles: Tensor, num_objects: int, num_styles: int) -> Tensor:
    """Multi-hot targets `[B, n_objects + n_styles]`: the sample's object and (unless plain) its style."""
    targets = torch.zeros(len(objects), num_objects + num_styles, device=objects.device)
    rows = torch.arange(len(objects), device=objects.device)
    targets[rows, objects] = 1.0
    styled = styles != NO_STYLE
    targets[rows[styled], num_objects + styles[styled]] = 1.0
    return targets


def squared_correlation(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Mean over column pairs of the squared Pearson correlation across the batch: `a [B, P]`, `b [B, Q]`."""
    if a.shape[1] == 0 or b.shape[1] == 0:
        return a.new_zeros(())
    a = a - a.mean(0)
    b = b - b.mean(0)
    correlation = (a.T @ b) / (a.pow(2).sum(0).add(eps).sqrt()[:, None] * b.pow(2).sum(0).add(eps).sqrt()[None, :])
    return correlation.pow(2).mean()  # [P, Q] → scalar
