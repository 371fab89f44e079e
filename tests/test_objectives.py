"""Training objectives against naive per-sample loops in float64 (docs/method.md §2), and the concept assignment."""

import math

import pytest
import torch

from saemnesia.concepts import NO_STYLE, ConceptVocabulary
from saemnesia.objectives import SupervisedObjective, UnsupervisedObjective
from saemnesia.sae import SaeConfig, SparseAutoencoder

VOCABULARY = ConceptVocabulary(objects=("Bears", "Cats"), styles=("Cubism", "Monet"))
LATENTS = {"Bears": 7, "Cats": 2, "Cubism": 11, "Monet": 0}


def supervised(sae: SparseAutoencoder, vocabulary: ConceptVocabulary = VOCABULARY,
               concept_latents: dict[str, int] = LATENTS, **options) -> SupervisedObjective:
    objective = SupervisedObjective(concept_latents=concept_latents, **options)
    objective.bind(sae, vocabulary)
    return objective


def make_sae(batch_topk: bool = False) -> SparseAutoencoder:
    torch.manual_seed(0)
    sae = SparseAutoencoder(5, SaeConfig(num_latents=20, k=3, batch_topk=batch_topk), dtype=torch.float64)
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.3)
    return sae


def naive_supervised(sae, x, objects, styles, object_latents, style_latents, weights, logits_before_relu):
    """docs/method.md §2.2 written out sample by sample and pair by pair."""
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
def test_supervised_loss_and_hit_rates_match_naive_loop(concept_logits):
    sae = make_sae(batch_topk=True)  # fine-tuning must use per-token TopK even from a BatchTopK SAE
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    objects = torch.tensor([0, 1, 1, 0])
    styles = torch.tensor([1, NO_STYLE, 0, 0])
    object_latents, style_latents = torch.tensor([7, 2]), torch.tensor([11, 0])
    objective = supervised(sae, rec_weight=1.0, concept_weight=3.0, sparsity_weight=0.01, concept_logits=concept_logits)
    terms = objective(sae, {"act": x, "object": objects, "style": styles})
    expected = naive_supervised(sae, x, objects, styles, object_latents, style_latents, (1.0, 3.0, 0.01),
                                logits_before_relu=concept_logits == "pre_relu")
    for name, value in expected.items():
        assert getattr(terms, name).item() == pytest.approx(value, rel=1e-9), name
    assert terms.concept_logits.shape == (4, 4) and terms.l0.item() == 3.0  # k = 3 positive values per token

    # Hit rates: the share of samples whose own latent has the largest logit among the objects' (styles'), styles
    # over the styled samples only.
    logits = terms.concept_logits
    object_hits = [int(logits[b, :2].argmax()) == int(objects[b]) for b in range(4)]
    style_hits = [int(logits[b, 2:].argmax()) == int(styles[b]) for b in range(4) if styles[b] != NO_STYLE]
    rates = {name: metric.compute().item() for name, metric in objective.epoch_metrics("train").items()}
    assert rates == pytest.approx({"object_hit_rate": sum(object_hits) / 4, "style_hit_rate": sum(style_hits) / 3})
    assert objective.epoch_metrics("val")["object_hit_rate"].weight == 0  # training mode updates the train rates


def test_post_relu_logits_cannot_go_below_zero_but_pre_relu_can():
    sae = make_sae()
    with torch.no_grad():
        sae.encoder.bias[3] = -50.0  # latent 3 never fires
    batch = {"act": torch.randn(2, 3, 5, dtype=torch.float64), "object": torch.tensor([0, 0]),
             "style": torch.tensor([NO_STYLE, NO_STYLE])}
    objects_only = ConceptVocabulary(objects=("Bears",))
    args = dict(vocabulary=objects_only, concept_latents={"Bears": 3})
    assert supervised(sae, concept_logits="post_relu", **args)(sae, batch).concept_logits.min() == 0.0
    assert supervised(sae, concept_logits="pre_relu", **args)(sae, batch).concept_logits.max() < -40.0
    assert supervised(sae, **args)(sae, batch).decorrelation.item() == 0.0  # no styles: nothing to decorrelate


def test_unsupervised_loss_combines_terms_with_its_weights():
    sae = make_sae()
    sae.cfg.multi_topk = True
    x = torch.randn(16, 5, dtype=torch.float64)
    objective = UnsupervisedObjective(auxk_alpha=0.5, multi_topk_weight=0.25, dead_feature_threshold=10)
    objective.bind(sae, None)
    objective.tokens_since_fired[:6] = 10  # 6 dead latents
    dead = objective.dead_mask.clone()
    terms = objective(sae, {"act": x})
    out = sae(x, dead_mask=dead)
    assert terms.loss.item() == pytest.approx((out.fvu + 0.5 * out.auxk_loss + 0.25 * out.multi_topk_fvu).item())
    assert terms.auxk.item() > 0 and terms.multi_topk_fvu.item() > 0 and terms.l0.item() == 3.0
    objective.eval()  # validation: no AuxK, counters unchanged
    counters = objective.tokens_since_fired.clone()
    assert objective(sae, {"act": x}).auxk.item() == 0.0 and torch.equal(objective.tokens_since_fired, counters)


def test_negative_weights_are_refused_naming_them():
    with pytest.raises(ValueError, match=r"model.objective weights must be >= 0; got \{'concept_weight': -3.0\}"):
        SupervisedObjective(concept_weight=-3.0)
    with pytest.raises(ValueError, match=r"model.objective weights must be >= 0; got \{'auxk_alpha': -1\}"):
        UnsupervisedObjective(auxk_alpha=-1)
    assert SupervisedObjective(sparsity_weight=0.0).sparsity_weight == 0.0  # zero switches a term off


def test_supervised_objective_needs_the_vocabulary_and_valid_latents():
    sae = make_sae()
    with pytest.raises(ValueError, match="needs the concept vocabulary"):
        SupervisedObjective().bind(sae, None)
    with pytest.raises(ValueError, match="model.objective.concept_latents binds several concepts"):
        supervised(sae, concept_latents={"Bears": 1, "Cats": 1, "Cubism": 2, "Monet": 3})
    unassigned = SupervisedObjective()
    unassigned.bind(sae, VOCABULARY)
    assert unassigned.concept_latents is None and supervised(sae).concept_latents == LATENTS
