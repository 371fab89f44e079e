"""Erasing concepts at inference: the SAE intervention on a block output (SPEC §4).

For each target concept c and step t the statistics give the selected latents `I_{c,t}` (SPEC §3.3), their scale
`σ_t[j] = m_c · μ_c[t, j]` and a threshold `τ_t[j]` = the unweighted mean over ALL concepts of `μ_{c'}[t, j]`.
Per token, every active latent `j ∈ I_t` with `z_j > τ_t[j]` becomes `z_j · σ_t[j]` (or `z_j · m_c · ‖z‖₂ / ‖W_dec[j]‖₂`
with `use_beta`), and the block output is rebuilt according to `error_mode` (see `ERROR_MODES`).

Only the few modified latents change the output, so the eraser never forms the dense `[tokens, L]` code: it runs the
encoder (TopK needs every pre-activation), then decodes just the change `Δ = Σ_j (z'_j − z_j) W_dec[j]` over the
selected latents, plus a k-sparse reconstruction for the modes that need `r`.

A latent selected for several targets at one step is scaled ONCE, by the last of those targets (in `params` order).
The reference writes the per-concept results back with one indexed assignment, where the last write wins;
composing the scales instead would multiply two negative factors into a positive one and amplify the latent.

TopK is always per token here (the reference switches batch/sample TopK off at inference).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from saemnesia.class_params import validate_class_params
from saemnesia.sae import SparseAutoencoder
from saemnesia.stats import ConceptStats

ERROR_MODES = ("reference", "exact", "none")
"""How the SAE error enters the output, with `r`/`r'` the reconstructions before/after erasing and `x` the input:
`reference`: `r' + (r − x)`, what the published code computes (with nothing selected it returns `2r − x`);
`exact`: `x + (r' − r)`, the error preserved (with nothing selected it returns `x`); `none`: `r'`."""

BETA_EPS = 1e-8
"""Added to the decoder-row norm in the `use_beta` scale, as the reference does."""

ConceptParamsLike = Mapping[str, Any]
"""One concept's entry of `params`: at least `percentile` and `multiplier`."""


class ErasureTables(NamedTuple):
    """Per-step latent tables `[T, K]`, K the most latents selected at any step; padding slots have `valid` False."""

    latents: Tensor
    """int64 latent indices of `I_t`, ascending in the valid slots."""
    valid: Tensor
    """bool: whether the slot holds a selected latent (False in padding)."""
    multipliers: Tensor
    """float32 `m_c` of the target that owns the latent."""
    concept_means: Tensor
    """float32 `μ_c[t, j]` of the target that owns the latent; `σ = multiplier · concept_mean`."""
    thresholds: Tensor
    """float32 `τ_t[j]`, the unweighted mean of every concept's `μ[t, j]`."""

    def to(self, device: torch.device) -> ErasureTables:
        return ErasureTables(*(table.to(device) for table in self))


def build_tables(stats: ConceptStats, params: Mapping[str, ConceptParamsLike]) -> ErasureTables:
    """The tables of SPEC §4 for the targets in `params`, computed once for all T steps."""
    num_steps, num_latents = stats.num_steps, stats.num_latents
    selected = torch.zeros(num_steps, num_latents, dtype=torch.bool)
    multipliers = torch.zeros(num_steps, num_latents)
    concept_means = torch.zeros(num_steps, num_latents)
    for concept, entry in params.items():
        mask = stats.selection_mask(concept, entry["percentile"]).cpu()  # [T, L]
        # Later targets overwrite earlier ones on shared latents: the last target's scale wins (module docstring).
        selected |= mask
        multipliers[mask] = entry["multiplier"]
        concept_means = torch.where(mask, stats.means[stats.index(concept)].cpu(), concept_means)
    width = max(1, int(selected.sum(dim=1).max()))
    # A stable descending sort of the mask puts each step's selected latents first, in ascending order.
    latents = selected.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :width]  # [T, K]
    thresholds = stats.means.cpu().mean(dim=0)  # [T, L]
    return ErasureTables(
        latents=latents,
        valid=selected.gather(1, latents),
        multipliers=multipliers.gather(1, latents),
        concept_means=concept_means.gather(1, latents),
        thresholds=thresholds.gather(1, latents),
    )


class ConceptEraser:
    """Erase every concept of `params` from a block output `[B, C, H, W]` at each sampling step (SPEC §4).

    `stats` must come from this SAE and from sampling with the same number of steps (see `check_steps`).
    Steps before `start_step` pass the block output through untouched.
    """

    def __init__(self, sae: SparseAutoencoder, stats: ConceptStats, params: Mapping[str, ConceptParamsLike],
                 error_mode: str = "exact", start_step: int = 0, use_beta: bool = False) -> None:
        if error_mode not in ERROR_MODES:
            raise ValueError(f"error_mode must be one of {list(ERROR_MODES)}; got {error_mode!r}.")
        stats.check_compatible(sae.num_latents)
        params = validate_class_params(params, source="ConceptEraser params")
        if not params:
            raise ValueError("ConceptEraser params must name at least one target concept.")
        for concept in params:
            stats.index(concept)  # fails with the list of known concepts
        if not 0 <= start_step < stats.num_steps:
            raise ValueError(f"start_step must lie in [0, {stats.num_steps}) for statistics of {stats.num_steps} "
                             f"steps; got {start_step}.")
        self.sae = sae
        self.stats = stats
        self.params = params
        self.error_mode = error_mode
        self.start_step = start_step
        self.use_beta = use_beta
        self.tables = build_tables(stats, params).to(sae.W_dec.device)

    @property
    def num_steps(self) -> int:
        return self.stats.num_steps

    def check_steps(self, num_steps: int) -> None:
        """Refuse a sampling run whose step count differs from the statistics' T."""
        self.stats.check_compatible(self.sae.num_latents, num_steps)

    @torch.no_grad()
    def apply(self, hidden: Tensor, step: int) -> Tensor:
        """Erase the targets from `hidden` `[B, C, H, W]` at sampling step `step`; same shape and dtype back."""
        if not 0 <= step < self.num_steps:
            raise ValueError(f"Step {step} is outside the statistics' {self.num_steps} sampling steps.")
        if hidden.ndim != 4 or hidden.shape[1] != self.sae.d_in:
            raise ValueError(f"ConceptEraser.apply expects a block output [B, {self.sae.d_in}, H, W]; "
                             f"got shape {tuple(hidden.shape)}.")
        if step < self.start_step:
            return hidden
        batch, channels, height, width = hidden.shape
        tokens = hidden.flatten(2).transpose(1, 2)  # [B, H·W, C]
        sae_dtype = self.sae.W_dec.dtype
        acts, indices = self.sae.encode(tokens.to(sae_dtype))  # [B, N, k]
        change = self._change(acts, indices, step)  # [B, N, C]
        if self.error_mode == "exact":
            out = tokens + change
        else:
            reconstruction = self.sae.decode(acts, indices)  # [B, N, C], k-sparse
            out = reconstruction + change
            if self.error_mode == "reference":
                out = out + (reconstruction - tokens)
        return out.to(hidden.dtype).transpose(1, 2).reshape(batch, channels, height, width).contiguous()  # [B, C, H, W]

    def _change(self, acts: Tensor, indices: Tensor, step: int) -> Tensor:
        """`r' − r = Σ_j (z'_j − z_j) W_dec[j]` `[B, N, C]` from the TopK code `(acts, indices)` `[B, N, k]`."""
        if self.tables.latents.device != acts.device:
            self.tables = self.tables.to(acts.device)
        # The rule runs in float32 at least (float64 with a float64 SAE), whatever the SAE's dtype.
        rule_dtype = torch.promote_types(acts.dtype, torch.float32)
        latents, valid = self.tables.latents[step], self.tables.valid[step]  # [K]
        multipliers, concept_means, thresholds = (
            table[step].to(rule_dtype)
            for table in (self.tables.multipliers, self.tables.concept_means, self.tables.thresholds)
        )  # each [K]
        matches = indices.unsqueeze(-1) == latents  # [B, N, k, K]; TopK indices are distinct, so ≤ 1 match per slot
        values = (acts.unsqueeze(-1).to(rule_dtype) * matches).sum(dim=-2)  # [B, N, K]: z_j, 0 when j is inactive
        modified = matches.any(dim=-2) & valid & (values > thresholds)  # [B, N, K]
        decoder_rows = self.sae.W_dec[latents]  # [K, C]
        if self.use_beta:
            code_norm = acts.to(rule_dtype).norm(dim=-1, keepdim=True)  # [B, N, 1]: ‖z‖₂ (zeros outside TopK)
            scales = multipliers * code_norm / (decoder_rows.to(rule_dtype).norm(dim=-1) + BETA_EPS)  # [B, N, K]
        else:
            scales = multipliers * concept_means  # [K]
        deltas = torch.where(modified, values * (scales - 1), 0.0)  # [B, N, K]: z'_j − z_j
        return deltas.to(decoder_rows.dtype) @ decoder_rows  # [B, N, C]
