"""The TopK sparse autoencoder (docs/method.md §1) and its checkpoint formats (docs/method.md §7).

Everything acts on tokens: `x` is `[..., d_in]` and the leading dimensions are flattened to `N` tokens,
except for `sample_topk`, which needs the sample dimension (`x` is `[B, N, d_in]`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from saemnesia.checkpoints import read_checkpoint, state_digest, write_checkpoint
from saemnesia.hub import local_path

EncoderBackward = Literal["sparse", "dense"]
"""How `SparseAutoencoder.forward` backpropagates into the encoder (see there)."""
ENCODER_BACKWARDS: tuple[str, ...] = get_args(EncoderBackward)


CANDIDATES_PER_TOKEN = 2
"""Candidates per token of a pooled TopK, in units of k (`_pool_topk`). A batch TopK keeps k entries per token on
average; the top 2k of each bound its threshold closely enough that only a small multiple of `k·n` entries lie above
it (benchmarks/RESULTS.md)."""


@dataclass
class SaeConfig:
    """Architecture of a sparse autoencoder; the field names are those of the published `cfg.json`."""

    expansion_factor: int = 16
    """Latents per input dimension; used when `num_latents` is 0. Published: 16 (1280 → 20480)."""
    normalize_decoder: bool = True
    """Keep decoder rows at unit norm during unsupervised training (the fine-tuning stage does not)."""
    num_latents: int = 0
    """Number of latents L; 0 means `expansion_factor * d_in`."""
    k: int = 32
    """Active latents per token (TopK). Published: 32."""
    batch_topk: bool = False
    """Keep the `k·N` largest activations over the flattened batch of N tokens (SAeUron pre-training)."""
    sample_topk: bool = False
    """Keep the `k` largest activations over each whole sample `[N, L]` (rare)."""
    input_unit_norm: bool = False
    """Kept for checkpoint compatibility; the published checkpoints use False and True is refused."""
    multi_topk: bool = False
    """Add the Multi-TopK auxiliary FVU (reconstruction from the top `4k` latents) to the unsupervised loss."""


class SparseCode(NamedTuple):
    """A TopK code: per token `[..., K]` (`offsets` None), or flat `[M]` grouped by token with `offsets [N]`, the start
    of each token's values (the layout of `F.embedding_bag`; batch and sample TopK keep a varying number per token)."""

    acts: Tensor
    """Values of the active latents."""
    indices: Tensor
    """Their latent indices, in the layout of `acts`."""
    offsets: Tensor | None
    """`[N]` start of each token's values in a flat code; None for a per-token code."""


class ForwardOutput(NamedTuple):
    """What one forward pass computes; shapes for `x` of shape `[..., d]` and `N` tokens."""

    sae_out: Tensor
    """Reconstruction `[..., d]`."""
    latent_acts: Tensor
    """Values of the active latents: `[..., k]` per token, or flat `[M]` for batch/sample TopK (`latent_offsets`)."""
    latent_indices: Tensor
    """Indices of the active latents, in the layout of `latent_acts`."""
    fvu: Tensor
    """Fraction of variance unexplained, a scalar (docs/method.md §2.1)."""
    auxk_loss: Tensor
    """AuxK dead-latent loss, a scalar; 0 when no dead mask is given or no latent is dead."""
    multi_topk_fvu: Tensor
    """FVU of the top-`4k` reconstruction, a scalar; 0 unless `cfg.multi_topk`."""
    latent_offsets: Tensor | None = None
    """Batch/sample TopK: `[N]` start of each token's values in the flat code (`SparseCode.offsets`); else None."""


class SparseAutoencoder(nn.Module):
    """`pre_acts(x) = ReLU(W_enc (x − b_dec) + b_enc)`, TopK, `decode(z) = z W_dec + b_dec` (docs/method.md §1)."""

    def __init__(self, d_in: int, cfg: SaeConfig | None = None, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None):
        super().__init__()
        cfg = cfg or SaeConfig()
        if cfg.input_unit_norm:
            raise ValueError("SaeConfig.input_unit_norm=True is not supported; the published checkpoints use False.")
        if cfg.batch_topk and cfg.sample_topk:
            raise ValueError("SaeConfig.batch_topk and sample_topk are exclusive; set at most one of them.")
        self.d_in = d_in
        self.num_latents = cfg.num_latents or d_in * cfg.expansion_factor
        if d_in < 1 or self.num_latents < 1 or not 1 <= cfg.k <= self.num_latents:
            raise ValueError(f"SaeConfig (model.sae in a fit config) needs num_latents (or expansion_factor × d_in) "
                             f">= 1 and k in [1, num_latents]; got d_in={d_in}, num_latents={self.num_latents}, "
                             f"k={cfg.k}.")
        self.cfg = replace(cfg, num_latents=self.num_latents)  # explicit in every checkpoint we write

        self.encoder = nn.Linear(d_in, self.num_latents, device=device, dtype=dtype)
        self.encoder.bias.data.zero_()
        # The decoder starts as the encoder's transpose-free copy: rows are latent directions (docs/method.md §1).
        self.W_dec = nn.Parameter(self.encoder.weight.data.clone())
        self.set_decoder_norm_to_unit_norm()
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device, dtype=dtype))
        self.checkpoint_digest: str | None = None  # `state_digest` of the checkpoint this SAE was loaded from

    # -- encoding -------------------------------------------------------------------------------------------
    def pre_relu_acts(self, x: Tensor) -> Tensor:
        """`W_enc (x − b_dec) + b_enc`, dense: `[..., L]`."""
        return self.encoder(x - self.b_dec)

    def pre_acts(self, x: Tensor) -> Tensor:
        """Dense post-ReLU activations before TopK: `[..., L]`."""
        return F.relu(self.pre_relu_acts(x))

    def topk(self, pre_acts: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token TopK of dense activations `[..., L]`: the k largest of each token, `(acts, indices)` `[..., k]`."""
        return pre_acts.topk(self.cfg.k, dim=-1, sorted=False)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Inference code of `x [..., d]`: per-token TopK `(top_acts, top_indices)`, each `[..., k]`, whatever TopK
        variant the SAE was trained with (batch and sample TopK make a token's code depend on its batch)."""
        return self.topk(self.pre_acts(x))

    def mean_code(self, x: Tensor) -> Tensor:
        """The inference code of each sample's tokens `x [B, N, d]` averaged over its N tokens: `[B, L]`, scattered
        from the k values per token (the dense `[B, N, L]` code is never formed)."""
        acts, indices = self.encode(x)  # [B, N, k]
        sums = acts.new_zeros(x.shape[0], self.num_latents)
        sums.scatter_add_(1, indices.flatten(1), acts.flatten(1))  # [B, L] from [B, N·k] values
        return sums / x.shape[1]

    def training_topk(self, pre_acts: Tensor) -> SparseCode:
        """Sparsify dense activations `[..., L]` with the TopK variant of `cfg`, as unsupervised training uses it: per
        token, or one top-k over each pool of `n` tokens (the batch, or each sample `[n, L]` of `[B, n, L]`) keeping
        `k·n` (batch) or `k` (sample) values, returned flat and grouped by token (`SparseCode`)."""
        if not (self.cfg.batch_topk or self.cfg.sample_topk):
            return SparseCode(*self.topk(pre_acts), None)
        if self.cfg.sample_topk and pre_acts.ndim < 3:
            raise ValueError(f"sample_topk needs inputs shaped [B, N, d]; got {pre_acts.ndim - 1} dims before L.")
        tokens = pre_acts.shape[-2] if self.cfg.sample_topk else pre_acts.numel() // self.num_latents  # per pool
        keep = self.cfg.k if self.cfg.sample_topk else self.cfg.k * tokens
        acts, flat = self._pool_topk(pre_acts.reshape(-1, tokens, self.num_latents), keep)  # [P, keep] each
        flat = flat + torch.arange(0, pre_acts.numel(), tokens * self.num_latents, device=flat.device)[:, None]
        flat, order = flat.flatten().sort()  # [P·keep], grouped by token as the embedding bag needs
        token = flat // self.num_latents
        offsets = torch.searchsorted(token, torch.arange(pre_acts.numel() // self.num_latents, device=token.device))
        return SparseCode(acts.flatten()[order], flat % self.num_latents, offsets)

    def _pool_topk(self, pools: Tensor, keep: int) -> tuple[Tensor, Tensor]:
        """The `keep` largest entries of each pool of tokens `[P, n, L]`: values and `token·L + latent` within the
        pool, each `[P, keep]`, in no order.

        Each token's top `m = CANDIDATES_PER_TOKEN · k` latents are its candidates. A sample TopK keeps `k ≤ m` per
        pool, which no token's candidates can miss, so it selects among them. A batch TopK (one pool) can take more
        than `m` entries of one token, so the candidates only bound it from below: the pool's `keep`-th largest
        candidate is at most its `keep`-th largest entry, every entry above that bound is gathered (a little more
        than `keep`), and the top-k runs over those, much faster on a CPU than one over all `n·L` entries
        (benchmarks/sae_step.py). It reads the gathered count on the host, which would stall an accelerator's stream
        at every step, so there the top-k runs over all entries.
        """
        num_latents = pools.shape[-1]
        per_token = min(num_latents, keep, CANDIDATES_PER_TOKEN * self.cfg.k)
        exact = per_token in (num_latents, keep)  # a sample TopK, or every entry a candidate
        entries = pools.flatten()  # [n·L]: a batch TopK's single pool (used only when not `exact`)
        if not exact and entries.device.type != "cpu":
            acts, flat = entries.topk(keep, sorted=False)
            return acts[None], flat[None]
        candidates, latents = pools.topk(per_token, dim=-1, sorted=False)  # [P, n, m]
        if exact:
            acts, chosen = candidates.flatten(1).topk(keep, dim=-1, sorted=False)  # [P, keep]; token·m + slot
            return acts, (chosen // per_token) * num_latents + latents.flatten(1).gather(1, chosen)
        bound = candidates.flatten().topk(keep, sorted=False).values.min()
        above = (entries >= bound).nonzero().squeeze(1)  # [M ≥ keep] positions in the pool
        acts, chosen = entries[above].topk(keep, sorted=False)  # [keep]
        return acts[None], above[chosen][None]

    # -- decoding -------------------------------------------------------------------------------------------
    def decode(self, top_acts: Tensor, top_indices: Tensor, offsets: Tensor | None = None) -> Tensor:
        """`Σ_i v_i W_dec[idx_i] + b_dec` for each token: `[..., K]` → `[..., d]`, or a flat code `[M]` with `offsets`
        (`SparseCode`) → `[N, d]`; never forms the dense code."""
        return sparse_decode(top_acts, top_indices, self.W_dec, offsets) + self.b_dec

    # -- training forward -----------------------------------------------------------------------------------
    def forward(self, x: Tensor, dead_mask: Tensor | None = None,
                encoder_backward: EncoderBackward = "sparse") -> ForwardOutput:
        """Reconstruction, FVU, AuxK (with `dead_mask`) and Multi-TopK FVU of `x [..., d]`.

        Every output reads the encoder only through selected latents (the TopK code, the AuxK dead latents, the
        Multi-TopK code), so its encoder gradient is sparse. `encoder_backward="sparse"` exploits that: the dense
        `[N, L]` pre-activations are computed without autograd and `SparseEncoderGrad` backpropagates through the
        selected latents alone, O(N·k·d) instead of O(N·L·d) work and no `[N, L]` tensor kept for the backward.
        `"dense"` backpropagates through the dense pre-activations. Both give the same gradients.
        """
        if encoder_backward not in ENCODER_BACKWARDS:
            raise ValueError(f"encoder_backward must be one of {list(ENCODER_BACKWARDS)}, got {encoder_backward!r}.")
        sparse = encoder_backward == "sparse"
        centered = x - self.b_dec  # [..., d]: the encoder's input, differentiable in both modes
        with torch.set_grad_enabled(torch.is_grad_enabled() and not sparse):
            pre_acts = F.relu(self.encoder(centered))  # [..., L]
        flat_centered = centered.reshape(-1, self.d_in)  # [N, d]
        code = self.training_topk(pre_acts)
        top_acts = self._with_encoder_grad(code, centered if code.offsets is None else flat_centered, sparse)
        sae_out = self.decode(top_acts, code.indices, code.offsets).reshape(x.shape)  # [..., d]

        flat_x, flat_out = x.reshape(-1, self.d_in), sae_out.reshape(-1, self.d_in)  # [N, d]
        total_variance = (flat_x - flat_x.mean(0)).pow(2).sum()
        fvu = (flat_out - flat_x).pow(2).sum() / total_variance
        flat_pre_acts = pre_acts.reshape(-1, self.num_latents)  # [N, L]

        zero = fvu.new_zeros(())
        auxk_loss = zero
        if dead_mask is not None:
            # Top min(d/2, L) of the dead pre-activations with live ones zeroed: the top min(d/2, #dead) dead latents
            # and zeros, so no host sync is needed to size the top-k (docs/method.md §2.1).
            dead_acts = flat_pre_acts.masked_fill(~dead_mask, 0.0)  # [N, L]
            aux = SparseCode(*dead_acts.topk(min(self.d_in // 2, self.num_latents), dim=-1, sorted=False), None)
            residual_hat = sparse_decode(self._with_encoder_grad(aux, flat_centered, sparse), aux.indices, self.W_dec)
            scale = (dead_mask.sum() / (self.d_in // 2)).clamp(max=1.0)
            # e = x − x̂ is a constant target; ê has no b_dec: it predicts a residual.
            auxk_loss = scale * (residual_hat - (flat_x - flat_out).detach()).pow(2).sum() / total_variance
        multi_topk_fvu = zero
        if self.cfg.multi_topk:
            multi = SparseCode(*flat_pre_acts.topk(4 * self.cfg.k, dim=-1, sorted=False), None)
            multi_out = self.decode(self._with_encoder_grad(multi, flat_centered, sparse), multi.indices)  # [N, d]
            multi_topk_fvu = (multi_out - flat_x).pow(2).sum() / total_variance
        return ForwardOutput(sae_out, top_acts, code.indices, fvu, auxk_loss, multi_topk_fvu, code.offsets)

    def _with_encoder_grad(self, code: SparseCode, centered: Tensor, sparse: bool) -> Tensor:
        """The code's values; in sparse mode they were selected without autograd and get their encoder gradient from
        `SparseEncoderGrad` (`centered` holds the code's tokens: `[..., d]` per token, `[N, d]` for a flat code)."""
        if not sparse:
            return code.acts
        return SparseEncoderGrad.apply(code.acts, code.indices, code.offsets, centered, self.encoder.weight,
                                       self.encoder.bias)

    # -- decoder geometry -----------------------------------------------------------------------------------
    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        eps = torch.finfo(self.W_dec.dtype).eps
        self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True) + eps

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project each row's gradient onto the row's orthogonal complement, so steps keep the norm fixed."""
        if self.W_dec.grad is None:
            return
        directions = F.normalize(self.W_dec.data, dim=1)
        parallel = (self.W_dec.grad * directions).sum(dim=1, keepdim=True)  # [L, 1]
        self.W_dec.grad -= parallel * directions

    @torch.no_grad()
    def init_b_dec_to_geometric_median(self, x: Tensor) -> None:
        self.b_dec.data = geometric_median(x.reshape(-1, self.d_in).float()).to(self.b_dec.dtype)

    # -- checkpoints (docs/method.md §7) ------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write `cfg.json` + `sae.safetensors` into the folder `path`; both load in the published code."""
        write_checkpoint(Path(path), {**asdict(self.cfg), "d_in": self.d_in}, self.state_dict())

    @classmethod
    def load(cls, path: str | os.PathLike, hookpoint: str | None = None, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> SparseAutoencoder:
        """Load a checkpoint folder, or `path/hookpoint` when `path` is a parent of per-hookpoint SAE folders;
        accepts the legacy `state_dict.pth` layout too, and either on the Hub (`hf://owner/repo[@revision][/path]`)."""
        local = local_path(path)
        try:
            config, state = read_checkpoint(local, hookpoint)
        except (FileNotFoundError, ValueError) as error:
            if local == Path(path):
                raise
            raise type(error)(f"{path} (fetched to {local}): {error}") from error
        known = {field.name for field in fields(SaeConfig)}
        cfg = SaeConfig(**{key: value for key, value in config.items() if key in known})
        sae = cls(config["d_in"], cfg, device="meta")
        sae.load_state_dict(state, assign=True)
        sae.checkpoint_digest = state_digest(state)
        return sae.to(device=device, dtype=dtype)


def sparse_decode(top_acts: Tensor, top_indices: Tensor, W_dec: Tensor, offsets: Tensor | None = None) -> Tensor:
    """`Σ_i acts_i · W_dec[idx_i]` per token as an embedding bag (no dense code): a per-token code `[..., K]` →
    `[..., d]`, or a flat code `[M]` grouped by token with `offsets [N]` → `[N, d]`."""
    if offsets is None:  # one bag of K values per token
        offsets = torch.arange(0, top_acts.numel(), top_acts.shape[-1], device=top_acts.device)  # [N]
        out = sparse_decode(top_acts.flatten(), top_indices.flatten(), W_dec, offsets)  # [N, d]
        return out.reshape(*top_acts.shape[:-1], W_dec.shape[-1])  # [..., d]
    return F.embedding_bag(top_indices, W_dec, offsets, per_sample_weights=top_acts.to(W_dec.dtype), mode="sum")


class SparseEncoderGrad(torch.autograd.Function):
    """The encoder gradient of selected activations, without the dense pre-activations.

    Forward returns the values `acts` of a `SparseCode` (`indices`, `offsets`: post-ReLU activations selected from
    pre-activations computed without autograd) unchanged. Backward, with `g` their gradient where they are positive
    (ReLU's derivative; zero values, such as AuxK's zeroed live latents, get none) and `c = x − b_dec` per token:
    `∂/∂c = Σ_j g_j W_enc[idx_j]` is an embedding bag of encoder rows, `∂/∂W_enc[i] = Σ_{(n, j): idx_nj = i} g_nj c_n`
    is that bag's own weight gradient for the output gradient `c`, and `∂/∂b_enc[i] = Σ_{(n, j): idx_nj = i} g_nj`.
    One embedding-bag forward and backward replace the two dense `[N, L]`-sized matmuls of the dense backward.
    Gradients are computed in the encoder's dtype (float32 under autocast), whatever the dtype of `acts`.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, acts: Tensor, indices: Tensor, offsets: Tensor | None, centered: Tensor,
                weight: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(acts, indices, offsets, centered, weight)
        return acts.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_acts: Tensor) -> tuple[None, None, None, Tensor, Tensor, Tensor]:
        acts, indices, offsets, centered, weight = ctx.saved_tensors
        active_grad = torch.where(acts > 0, grad_acts, 0.0).to(weight.dtype)  # [..., K]
        weight_leaf = weight.detach().requires_grad_()
        with torch.enable_grad():
            grad_centered = sparse_decode(active_grad, indices, weight_leaf, offsets)  # the shape of `centered`
        (grad_weight,) = torch.autograd.grad(grad_centered, weight_leaf, centered.to(weight.dtype))  # [L, d]
        grad_bias = weight.new_zeros(weight.shape[0]).index_add_(0, indices.flatten(), active_grad.flatten())  # [L]
        return None, None, None, grad_centered.detach().to(centered.dtype), grad_weight, grad_bias


@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 100, tol: float = 1e-5) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to `points [N, d]`."""
    median = points.mean(0)
    for _ in range(max_iter):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(1e-8)  # [N]
        previous, median = median, (weights[:, None] * points).sum(0) / weights.sum()
        if (median - previous).norm() < tol * previous.norm().clamp_min(1e-8):
            break
    return median
