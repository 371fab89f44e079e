"""ConceptEraser (docs/method.md §4) against hand-computed examples and a naive per-token dense implementation."""

from __future__ import annotations

import math

import pytest
import torch

from saemnesia.sae import SaeConfig, SparseAutoencoder
from saemnesia.stats import ConceptStats
from saemnesia.unlearning import ERROR_MODES, ConceptEraser

D_IN, NUM_LATENTS, K, NUM_STEPS = 8, 32, 4, 3
CONCEPTS = ["Bears", "Cats", "Dogs", "Monet"]


def random_sae(dtype: torch.dtype = torch.float64, seed: int = 0) -> SparseAutoencoder:
    """A small SAE with non-zero biases and decoder rows of unequal norms (so `use_beta` sees them)."""
    torch.manual_seed(seed)
    sae = SparseAutoencoder(D_IN, SaeConfig(num_latents=NUM_LATENTS, k=K), dtype=dtype)
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.3)
        sae.W_dec.mul_(torch.rand(NUM_LATENTS, 1, dtype=dtype) + 0.5)
    return sae


def random_stats(seed: int = 0, num_latents: int = NUM_LATENTS) -> ConceptStats:
    """Concept means on the scale of the SAE's mean codes, so some active latents fall below the threshold."""
    generator = torch.Generator().manual_seed(seed)
    means = 0.6 * torch.rand(len(CONCEPTS), NUM_STEPS, num_latents, generator=generator)  # [C, T, L]
    return ConceptStats(CONCEPTS, means, counts=torch.tensor([3, 2, 4, 1]))


def random_hidden(batch: int, height: int, width: int, seed: int = 1,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, D_IN, height, width, generator=generator).to(dtype)


def naive_erase(sae: SparseAutoencoder, stats: ConceptStats, params: dict, hidden: torch.Tensor, step: int,
                error_mode: str, start_step: int = 0, use_beta: bool = False) -> torch.Tensor:
    """docs/method.md §4 one token at a time in float64: dense code, the rule per target (a later target overwrites an
    earlier one on a shared latent), two dense decodes."""
    if step < start_step:
        return hidden
    W_enc, b_enc = sae.encoder.weight.double(), sae.encoder.bias.double()
    W_dec, b_dec = sae.W_dec.double(), sae.b_dec.double()
    thresholds = stats.means[:, step].double().mean(0)  # [L]
    out = torch.empty(hidden.shape, dtype=torch.float64)
    for b in range(hidden.shape[0]):
        for h in range(hidden.shape[2]):
            for w in range(hidden.shape[3]):
                x = hidden[b, :, h, w].double()
                pre_acts = torch.relu(W_enc @ (x - b_dec) + b_enc)
                top = pre_acts.topk(sae.cfg.k)
                z = torch.zeros(sae.num_latents, dtype=torch.float64)
                z[top.indices] = top.values
                erased = z.clone()
                for concept, entry in params.items():
                    for j in stats.selection_mask(concept, entry["percentile"])[step].nonzero().flatten().tolist():
                        if z[j] > thresholds[j]:
                            if use_beta:
                                scale = entry["multiplier"] * z.norm() / (W_dec[j].norm() + 1e-8)
                            else:
                                scale = entry["multiplier"] * float(stats.means[stats.index(concept), step, j])
                            erased[j] = z[j] * scale
                r, r_erased = z @ W_dec + b_dec, erased @ W_dec + b_dec
                out[b, :, h, w] = {"reference": r_erased + (r - x), "exact": x + (r_erased - r), "none": r_erased}[
                    error_mode]
    return out


def hand_sae(k: int = 2) -> SparseAutoencoder:
    """d = L = 2 with identity encoder and decoder and zero biases: `z = TopK(ReLU(x))`, `decode(z) = z`."""
    sae = SparseAutoencoder(2, SaeConfig(num_latents=2, k=k), dtype=torch.float64)
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.eye(2))
        sae.encoder.bias.zero_()
        sae.W_dec.copy_(torch.eye(2))
        sae.b_dec.zero_()
    return sae


def tokens_to_map(tokens: list[list[float]]) -> torch.Tensor:
    """Tokens `[N, 2]` as a `[1, 2, 1, N]` block output."""
    return torch.tensor(tokens, dtype=torch.float64).T.reshape(1, 2, 1, len(tokens))


# Concept A is latent 0 (importance [0.67, -0.67]); the threshold of latent 0 is (1.0 + 0.2) / 2 = 0.6.
HAND_STATS = ConceptStats(["A", "B"], torch.tensor([[[1.0, 0.2]], [[0.2, 1.0]]]), torch.tensor([1, 1]))
# Above the threshold, below it, and with a negative input channel (so the SAE error is non-zero).
HAND_TOKENS = [[0.9, 0.3], [0.5, 0.7], [-0.4, 0.8]]


@pytest.mark.parametrize(("error_mode", "expected"), [
    # z = [0.9, 0.3] → [0.9 · (−2 · 1.0), 0.3]; [0.5, 0.7] stays; [−0.4, 0.8] codes to r = [0, 0.8].
    ("exact", [[-1.8, 0.3], [0.5, 0.7], [-0.4, 0.8]]),
    ("reference", [[-1.8, 0.3], [0.5, 0.7], [0.4, 0.8]]),  # r' + (r − x): the error enters with the wrong sign
    ("none", [[-1.8, 0.3], [0.5, 0.7], [0.0, 0.8]]),
])
def test_multiplicative_masking_by_hand(error_mode: str, expected: list[list[float]]) -> None:
    eraser = ConceptEraser(hand_sae(), HAND_STATS, {"A": {"percentile": 50, "multiplier": -2.0}}, error_mode=error_mode)
    assert eraser.tables.latents[0, eraser.tables.valid[0]].tolist() == [0]
    out = eraser.apply(tokens_to_map(HAND_TOKENS), step=0)
    torch.testing.assert_close(out, tokens_to_map(expected))


def test_beta_scale_by_hand() -> None:
    """`use_beta`: z_0 ← z_0 · m · ‖z‖₂ / ‖W_dec[0]‖₂, with decoder row 0 of norm 2."""
    sae = hand_sae()
    with torch.no_grad():
        sae.W_dec[0] = torch.tensor([2.0, 0.0])
    eraser = ConceptEraser(sae, HAND_STATS, {"A": {"percentile": 50, "multiplier": -2.0}}, use_beta=True,
                           error_mode="none")
    out = eraser.apply(tokens_to_map([[0.9, 0.3]]), step=0)
    z0 = 0.9 * -2.0 * math.sqrt(0.9**2 + 0.3**2) / (2.0 + 1e-8)
    torch.testing.assert_close(out, tokens_to_map([[2.0 * z0, 0.3]]))


@pytest.mark.parametrize(("order", "scale"), [(("A", "B"), -2.7), (("B", "A"), -2.0)])
def test_latent_shared_by_two_targets_uses_the_last_scale(order: tuple[str, str], scale: float) -> None:
    """A and B both select latent 0 (threshold (1.0 + 0.9 + 0.1) / 3); the scales do not compose (that would give
    0.9 · (−2.0) · (−2.7) > 0, amplifying the latent): the last target in `params` wins, as in the reference."""
    stats = ConceptStats(["A", "B", "C"], torch.tensor([[[1.0, 0.1]], [[0.9, 0.1]], [[0.1, 1.0]]]), torch.ones(3))
    params = {"A": {"percentile": 50, "multiplier": -2.0}, "B": {"percentile": 50, "multiplier": -3.0}}
    eraser = ConceptEraser(hand_sae(), stats, {name: params[name] for name in order}, error_mode="none")
    assert eraser.tables.valid.sum() == 1  # latent 0 once, not twice
    out = eraser.apply(tokens_to_map([[0.9, 0.3], [0.6, 0.3]]), step=0)
    torch.testing.assert_close(out, tokens_to_map([[0.9 * scale, 0.3], [0.6, 0.3]]))


def test_nothing_selected_gives_identity_or_the_plain_reconstruction() -> None:
    sae, stats = random_sae(dtype=torch.float32), random_stats()
    hidden = random_hidden(2, 2, 3, dtype=torch.float32)
    params = {"Bears": {"percentile": 100, "multiplier": -30.0}}  # nothing lies above the maximum
    r = naive_erase(sae, stats, params, hidden, 0, "none").float()
    torch.testing.assert_close(r, sae.decode(*sae.encode(hidden.flatten(2).mT)).mT.reshape(hidden.shape))
    expected = {"exact": hidden, "reference": 2 * r - hidden, "none": r}
    for error_mode in ERROR_MODES:
        eraser = ConceptEraser(sae, stats, params, error_mode=error_mode)
        assert not eraser.tables.valid.any()
        for step in range(NUM_STEPS):
            torch.testing.assert_close(eraser.apply(hidden, step), expected[error_mode], rtol=1e-6, atol=1e-6)


# Two targets with different percentiles; at L = 32, 90 selects the top 4 latents and 80 the top 7.
TWO_TARGETS = {"Bears": {"percentile": 90.0, "multiplier": -5.0}, "Monet": {"percentile": 80.0, "multiplier": -1.5}}


@pytest.mark.parametrize("use_beta", [False, True])
@pytest.mark.parametrize("error_mode", ERROR_MODES)
def test_matches_naive_dense_implementation(error_mode: str, use_beta: bool) -> None:
    sae, stats = random_sae(), random_stats()
    eraser = ConceptEraser(sae, stats, TWO_TARGETS, error_mode=error_mode, use_beta=use_beta)
    hidden = random_hidden(4, 2, 3)  # a CFG-like batch [uncond; cond] of 2 + 2 non-square maps
    changed = 0
    for step in range(NUM_STEPS):
        expected = naive_erase(sae, stats, TWO_TARGETS, hidden, step, error_mode, use_beta=use_beta)
        out = eraser.apply(hidden, step)
        assert out.shape == hidden.shape and out.dtype == hidden.dtype and out.is_contiguous()
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
        changed += int((expected != naive_erase(sae, stats, {}, hidden, step, error_mode)).any(dim=1).sum())
    assert 0 < changed < 3 * hidden[:, 0].numel()  # the rule fired on some tokens and spared others


@pytest.mark.parametrize("batch", [1, 2, 6])
def test_batch_sizes_and_single_target(batch: int) -> None:
    sae, stats = random_sae(seed=3), random_stats(seed=3)
    params = {"Cats": {"percentile": 75.0, "multiplier": -10.0}}
    eraser = ConceptEraser(sae, stats, params, error_mode="reference")
    hidden = random_hidden(batch, 3, 2, seed=batch)
    for step in range(NUM_STEPS):
        torch.testing.assert_close(eraser.apply(hidden, step), naive_erase(sae, stats, params, hidden, step,
                                                                           "reference"), rtol=1e-9, atol=1e-9)


def test_tokens_are_independent_of_the_batch() -> None:
    """Each image's result must not depend on what else is in the batch (CFG halves are processed together)."""
    sae, stats = random_sae(), random_stats()
    eraser = ConceptEraser(sae, stats, TWO_TARGETS, error_mode="exact")
    hidden = random_hidden(4, 2, 3)
    together = eraser.apply(hidden, 1)
    torch.testing.assert_close(eraser.apply(hidden[:2], 1), together[:2])
    torch.testing.assert_close(eraser.apply(hidden[2:], 1), together[2:])


def test_start_step_passes_earlier_steps_through() -> None:
    sae, stats = random_sae(), random_stats()
    eraser = ConceptEraser(sae, stats, TWO_TARGETS, error_mode="reference", start_step=2)
    hidden = random_hidden(2, 2, 3)
    for step in range(NUM_STEPS):
        out = eraser.apply(hidden, step)
        if step < 2:
            assert out is hidden
        else:
            expected = naive_erase(sae, stats, TWO_TARGETS, hidden, step, "reference", start_step=2)
            torch.testing.assert_close(out, expected)


def test_dtypes_follow_the_input_and_the_sae() -> None:
    """A float32 SAE on a bfloat16 map: computed in float32, returned in bfloat16."""
    sae, stats = random_sae(dtype=torch.float32), random_stats()
    hidden = random_hidden(2, 2, 3).to(torch.bfloat16)
    out = ConceptEraser(sae, stats, TWO_TARGETS, error_mode="exact").apply(hidden, 0)
    assert out.dtype == torch.bfloat16
    expected = naive_erase(sae, stats, TWO_TARGETS, hidden.double(), 0, "exact")
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)


def test_tables_are_computed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    sae, stats = random_sae(), random_stats()
    eraser = ConceptEraser(sae, stats, TWO_TARGETS)
    # Per step, exactly the union of both targets' selected latents, ascending.
    for step in range(NUM_STEPS):
        union = sorted({j for name, entry in TWO_TARGETS.items()
                        for j in stats.selection_mask(name, entry["percentile"])[step].nonzero().flatten().tolist()})
        assert eraser.tables.latents[step, eraser.tables.valid[step]].tolist() == union
    calls = []
    monkeypatch.setattr(stats, "importance", lambda *args: calls.append(args))
    monkeypatch.setattr(stats, "selection_mask", lambda *args: calls.append(args))
    for step in range(NUM_STEPS):
        eraser.apply(random_hidden(2, 2, 3), step)
    assert calls == []


def test_invalid_configuration_is_refused() -> None:
    sae, stats = random_sae(), random_stats()
    with pytest.raises(ValueError, match=r"Unknown concept 'Zebras'; the statistics cover \['Bears', 'Cats'"):
        ConceptEraser(sae, stats, {"Zebras": {"percentile": 99.0, "multiplier": -1.0}})
    with pytest.raises(ValueError, match="statistics have 16 latents but the SAE has 32"):
        ConceptEraser(sae, random_stats(num_latents=16), TWO_TARGETS)
    sae.checkpoint_digest, stats.metadata["sae_digest"] = "0123", "4567"  # statistics of another SAE of this size
    with pytest.raises(ValueError, match=r"computed with another SAE \(digest 4567\) than this one \(0123\)"):
        ConceptEraser(sae, stats, TWO_TARGETS)
    sae.checkpoint_digest = None  # an SAE made in memory has no digest to compare
    ConceptEraser(sae, stats, TWO_TARGETS)
    with pytest.raises(ValueError, match="entry of 'Bears' must have 'percentile' and 'multiplier'"):
        ConceptEraser(sae, stats, {"Bears": {"multiplier": -1.0}})
    with pytest.raises(ValueError, match="at least one target concept"):
        ConceptEraser(sae, stats, {})
    with pytest.raises(ValueError, match=r"error_mode must be one of \['reference', 'exact', 'none'\]; got 'exakt'"):
        ConceptEraser(sae, stats, TWO_TARGETS, error_mode="exakt")
    with pytest.raises(ValueError, match=r"start_step must lie in \[0, 3\)"):
        ConceptEraser(sae, stats, TWO_TARGETS, start_step=3)


def test_step_errors() -> None:
    eraser = ConceptEraser(random_sae(), random_stats(), TWO_TARGETS)
    with pytest.raises(ValueError, match="Step 3 is outside the statistics' 3 sampling steps"):
        eraser.apply(random_hidden(1, 2, 2), 3)
    with pytest.raises(ValueError, match=r"expects a block output \[B, 8, H, W\]; got shape \(1, 4, 2, 2\)"):
        eraser.apply(torch.zeros(1, 4, 2, 2, dtype=torch.float64), 0)
