"""Erasing concepts at inference: the SAE intervention on a block output (docs/method.md §4).

For each target concept c and step t the statistics give the selected latents `I_{c,t}` (docs/method.md §3.3), their
scale `σ_t[j] = m_c · μ_c[t, j]` and a threshold `τ_t[j]` = the unweighted mean over ALL concepts of `μ_{c'}[t, j]`.
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

import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from saemnesia.class_params import entries_for, load_class_params, validate_class_params
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
    """Per-step tables `[T, K]` (K the most latents selected at any step) on the SAE's device; the float ones are in
    the rule's dtype, float32 (float64 for a float64 SAE). Padding slots have `valid` False, an infinite threshold."""

    latents: Tensor
    """int64 latent indices of `I_t`, ascending in the valid slots."""
    valid: Tensor
    """bool: whether the slot holds a selected latent (False in padding)."""
    thresholds: Tensor
    """`τ_t[j]`, the unweighted mean of every concept's `μ[t, j]`; `inf` in padding, so no padding slot fires."""
    scales: Tensor
    """`σ_t[j] = m_c · μ_c[t, j]` of the target that owns the latent; with `use_beta`, `m_c` alone."""
    row_norms: Tensor
    """`‖W_dec[j]‖₂ + ε`, the `use_beta` scale's denominator."""
    decoder_rows: Tensor
    """`[T, K, C]` in the SAE's dtype: `W_dec[j]` of each slot, the directions the change is decoded from."""


def build_tables(sae: SparseAutoencoder, stats: ConceptStats, params: Mapping[str, ConceptParamsLike],
                 use_beta: bool) -> ErasureTables:
    """The tables of docs/method.md §4 for the targets in `params`, computed once for all T steps."""
    num_steps, num_latents = stats.num_steps, stats.num_latents
    selected = torch.zeros(num_steps, num_latents, dtype=torch.bool)
    multipliers = torch.zeros(num_steps, num_latents)
    concept_means = torch.zeros(num_steps, num_latents)
    for concept, entry in params.items():
        mask = stats.selection_mask(concept, entry["percentile"]).cpu()  # [T, L]; an unknown concept fails here
        # Later targets overwrite earlier ones on shared latents: the last target's scale wins (module docstring).
        selected |= mask
        multipliers[mask] = entry["multiplier"]
        concept_means = torch.where(mask, stats.means[stats.index(concept)].cpu(), concept_means)
    width = max(1, int(selected.sum(dim=1).max()))
    # A stable descending sort of the mask puts each step's selected latents first, in ascending order.
    latents = selected.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :width]  # [T, K]
    valid = selected.gather(1, latents)  # [T, K]
    device = sae.W_dec.device
    rule_dtype = torch.promote_types(sae.W_dec.dtype, torch.float32)
    multipliers, concept_means, thresholds = (table.gather(1, latents).to(device, rule_dtype) for table in
                                              (multipliers, concept_means, stats.means.cpu().mean(dim=0)))  # [T, K]
    latents, valid = latents.to(device), valid.to(device)
    decoder_rows = sae.W_dec.detach()[latents]  # [T, K, C]
    return ErasureTables(
        latents=latents,
        valid=valid,
        thresholds=thresholds.masked_fill(~valid, torch.inf),
        scales=multipliers if use_beta else multipliers * concept_means,
        row_norms=decoder_rows.to(rule_dtype).norm(dim=-1) + BETA_EPS,
        decoder_rows=decoder_rows,
    )


class ConceptEraser:
    """Erase every concept of `params` from a block output `[B, C, H, W]` at each sampling step (docs/method.md §4).

    The constructor checks that `stats` come from this SAE (latent count, and its checkpoint digest where both
    record one) and precomputes the tables on the SAE's device: build the eraser after moving the SAE. Steps before
    `start_step` pass the block output through untouched.
    """

    def __init__(self, sae: SparseAutoencoder, stats: ConceptStats, params: Mapping[str, ConceptParamsLike],
                 error_mode: str = "exact", start_step: int = 0, use_beta: bool = False) -> None:
        if error_mode not in ERROR_MODES:
            raise ValueError(f"error_mode must be one of {list(ERROR_MODES)}; got {error_mode!r}.")
        source = stats.from_source
        if stats.num_latents != sae.num_latents:
            raise ValueError(f"The concept statistics{source} have {stats.num_latents} latents but the SAE has "
                             f"{sae.num_latents}; recompute the statistics with this SAE.")
        digest = stats.metadata.get("sae_digest")
        if None not in (digest, sae.checkpoint_digest) and digest != sae.checkpoint_digest:
            raise ValueError(f"The concept statistics{source} were computed with another SAE (digest {digest}) than "
                             f"this one ({sae.checkpoint_digest}); recompute them with this SAE.")
        params = validate_class_params(params, source="ConceptEraser params")
        if not params:
            raise ValueError("ConceptEraser params must name at least one target concept.")
        if not 0 <= start_step < stats.num_steps:
            raise ValueError(f"start_step must lie in [0, {stats.num_steps}) for the concept statistics{source} of "
                             f"{stats.num_steps} steps; got {start_step}.")
        self.sae = sae
        self.error_mode = error_mode
        self.start_step = start_step
        self.use_beta = use_beta
        self.tables = build_tables(sae, stats, params, use_beta)

    @classmethod
    def from_files(cls, sae: str | os.PathLike, stats: str | os.PathLike,
                   params: Mapping[str, ConceptParamsLike] | str | os.PathLike, concepts: Sequence[str] | None = None,
                   hookpoint: str | None = None, device: str | torch.device = "cpu", error_mode: str = "exact",
                   start_step: int = 0, use_beta: bool = False) -> ConceptEraser:
        """The eraser of `concepts` (default: every concept of `params`) from files: the SAE folder (or its parent
        of `<hookpoint>/` folders), the statistics (ours, or the published `.pkl`), and `params` as a mapping or a
        class_params file (`.json`, or the published `.pth`), e.g. a search's choice for every concept. The SAE is
        loaded onto `device`, where the pipeline runs."""
        loaded = SparseAutoencoder.load(sae, hookpoint, device=device)
        source = "ConceptEraser.from_files params" if isinstance(params, Mapping) else f"The class_params file {params}"
        if not isinstance(params, Mapping):
            params = load_class_params(params)
        chosen = entries_for(params, concepts, source) if concepts is not None else params
        return cls(loaded, ConceptStats.read(stats), chosen, error_mode=error_mode, start_step=start_step,
                   use_beta=use_beta)

    @property
    def num_steps(self) -> int:
        return self.tables.latents.shape[0]

    @torch.no_grad()
    def apply(self, hidden: Tensor, step: int) -> Tensor:
        """Erase the targets from `hidden` `[B, C, H, W]` at sampling step `step`; same shape and dtype back."""
        if not 0 <= step < self.num_steps:
            raise ValueError(f"Step {step} is outside the statistics' {self.num_steps} sampling steps.")
        if hidden.ndim != 4 or hidden.shape[1] != self.sae.d_in:
            raise ValueError(f"ConceptEraser.apply expects a block output [B, {self.sae.d_in}, H, W]; got shape "
                             f"{tuple(hidden.shape)}: erase with the SAE trained at this hookpoint.")
        if step < self.start_step:
            return hidden
        batch, channels, height, width = hidden.shape
        tokens = hidden.flatten(2).transpose(1, 2)  # [B, H·W, C]
        acts, indices = self.sae.encode(tokens.to(self.sae.W_dec.dtype))  # [B, N, k]
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
        latents, _, thresholds, scales, row_norms, decoder_rows = (table[step] for table in self.tables)  # [K], [K, C]
        acts = acts.to(thresholds.dtype)  # the rule runs in the tables' dtype, float32 at least
        matches = indices.unsqueeze(-1) == latents  # [B, N, k, K]; TopK indices are distinct, so ≤ 1 match per slot
        values = (acts.unsqueeze(-1) * matches).sum(dim=-2)  # [B, N, K]: z_j, 0 when j is inactive
        if self.use_beta:
            scales = scales * acts.norm(dim=-1, keepdim=True) / row_norms  # [B, N, K]: m · ‖z‖₂ / ‖W_dec[j]‖₂
        # An inactive latent (z_j = 0) changes nothing whether or not it passes the threshold.
        deltas = torch.where(values > thresholds, values * (scales - 1), 0.0)  # [B, N, K]: z'_j − z_j
        return deltas.to(decoder_rows.dtype) @ decoder_rows  # [B, N, C]
