"""Training objectives against naive per-sample loops in float64 (SPEC §2)."""

import math

import pytest
import torch

from saemnesia.concepts import NO_STYLE
from saemnesia.objectives import SupervisedLoss, UnsupervisedLoss
from saemnesia.sae import SaeConfig, SparseAutoencoder


def make_sae(batch_topk: bool = False) -> SparseAutoencoder:
    torch.manual_seed(0)
    sae = SparseAutoencoder(5, SaeConfig(num_latents=20, k=3, batch_topk=batch_topk), dtype=torch.float64)
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.3)
    return sae


def naive_supervised(sae, x, objects, styles, object_latents, style_latents, weights, logits_before_relu):
    """SPEC §2.2 written out sample by sample and pair by pair."""
    W, b, W_dec, b_dec = (t.detach() for t in (sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec))
    batch, tokens, _ = x.shape
    squared_error, pooled, l1 = 0.0, [], 0.0
    for sample in range(batch):
        sample_logits = []
        for token in range(tokens):
            pre_relu = W @ (x[sample, token] - b_dec) + b
            dense = pre_relu.clamp(min=0)
            kth = sorted(dense.tolist(), reverse=True)[sae.cfg.k - 1]
            x_hat = sum(dense[j] * W_dec[j] for j in range(20) if dense[j] >= kth) + b_dec
            squared_error += ((x_hat - x[sample, token]) ** 2).sum().item()
            l1 += dense.clamp(-100, 100).abs().sum().item()
            sample_logits.append(pre_relu if logits_before_relu else dense)
        pooled.append(torch.stack(sample_logits).mean(0))
    pooled = torch.stack(pooled)  # [B, L]
    reconstruction = squared_error / x.numel()
    sparsity = l1 / (batch * tokens * 20)

    bce_terms = []
    for sample in range(batch):
        positive = {object_latents[objects[sample]].item()}
        if styles[sample] != NO_STYLE:
            positive.add(style_latents[styles[sample]].item())
        for latent in [*object_latents.tolist(), *style_latents.tolist()]:
            p = 1 / (1 + math.exp(-pooled[sample, latent].item()))
            bce_terms.append(-math.log(p) if latent in positive else -math.log(1 - p))
    bce = sum(bce_terms) / len(bce_terms)

    correlations = []
    for o in object_latents.tolist():
        for s in style_latents.tolist():
            a = pooled[:, o] - pooled[:, o].mean()
            c = pooled[:, s] - pooled[:, s].mean()
            rho = (a * c).sum() / (math.sqrt((a * a).sum() + 1e-8) * math.sqrt((c * c).sum() + 1e-8))
            correlations.append(rho.item() ** 2)
    decorrelation = sum(correlations) / len(correlations)
    rec_w, ce_w, sp_w = weights
    loss = rec_w * reconstruction + ce_w * (bce + 0.1 * decorrelation) + sp_w * sparsity
    return {"loss": loss, "reconstruction": reconstruction, "bce": bce, "decorrelation": decorrelation,
            "sparsity": sparsity}


@pytest.mark.parametrize("concept_logits", ["post_relu", "pre_relu"])
def test_supervised_loss_matches_naive_loop(concept_logits):
    sae = make_sae(batch_topk=True)  # fine-tuning must use per-token TopK even from a BatchTopK SAE
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    objects = torch.tensor([0, 1, 1, 0])
    styles = torch.tensor([1, NO_STYLE, 0, 0])
    object_latents, style_latents = torch.tensor([7, 2]), torch.tensor([11, 0])
    objective = SupervisedLoss(rec_weight=1.0, concept_weight=3.0, sparsity_weight=0.01, concept_logits=concept_logits)
    terms = objective(sae, x, objects, styles, object_latents, style_latents)
    expected = naive_supervised(sae, x, objects, styles, object_latents, style_latents, (1.0, 3.0, 0.01),
                                logits_before_relu=concept_logits == "pre_relu")
    for name, value in expected.items():
        assert getattr(terms, name).item() == pytest.approx(value, rel=1e-9), name
    assert terms.concept_logits.shape == (4, 4) and terms.latent_indices.shape == (12, 3)


def test_post_relu_logits_cannot_go_below_zero_but_pre_relu_can():
    sae = make_sae()
    with torch.no_grad():
        sae.encoder.bias[3] = -50.0  # latent 3 never fires
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    no_styles = torch.tensor([], dtype=torch.long)
    args = (sae, x, torch.tensor([0, 0]), torch.tensor([NO_STYLE, NO_STYLE]), torch.tensor([3]), no_styles)
    assert SupervisedLoss(concept_logits="post_relu")(*args).concept_logits.min() == 0.0
    assert SupervisedLoss(concept_logits="pre_relu")(*args).concept_logits.max() < -40.0
    assert SupervisedLoss()(*args).decorrelation.item() == 0.0  # no styles: nothing to decorrelate


def test_unsupervised_loss_combines_terms_with_its_weights():
    sae = make_sae()
    sae.cfg.multi_topk = True
    x = torch.randn(16, 5, dtype=torch.float64)
    dead = torch.zeros(20, dtype=torch.bool)
    dead[:6] = True
    terms = UnsupervisedLoss(auxk_alpha=0.5, multi_topk_weight=0.25)(sae, x, dead)
    out = sae(x, dead_mask=dead)
    assert terms.loss.item() == pytest.approx((out.fvu + 0.5 * out.auxk_loss + 0.25 * out.multi_topk_fvu).item())
    assert terms.auxk.item() > 0 and terms.multi_topk_fvu.item() > 0


def test_negative_weights_are_refused_naming_them():
    with pytest.raises(ValueError, match=r"model.supervised weights must be >= 0; got \{'concept_weight': -3.0\}"):
        SupervisedLoss(concept_weight=-3.0)
    with pytest.raises(ValueError, match="model.unsupervised weights must be >= 0; got auxk_alpha=-1"):
        UnsupervisedLoss(auxk_alpha=-1)
    assert SupervisedLoss(sparsity_weight=0.0).sparsity_weight == 0.0  # zero switches a term off
