"""SparseAutoencoder against hand-written float64 references (docs/method.md §1, §2.1)."""

import pytest
import torch

from saemnesia.sae import SaeConfig, SparseAutoencoder, geometric_median


def make_sae(d: int = 6, latents: int = 24, k: int = 3, **cfg) -> SparseAutoencoder:
    torch.manual_seed(0)
    sae = SparseAutoencoder(d, SaeConfig(num_latents=latents, k=k, **cfg), dtype=torch.float64)
    with torch.no_grad():  # non-trivial biases so every term of the formulas is exercised
        sae.encoder.bias.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


def naive_pre_acts(sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
    W, b = sae.encoder.weight.detach(), sae.encoder.bias.detach()
    return torch.stack([torch.clamp(W @ (token - sae.b_dec.detach()) + b, min=0) for token in x])


def dense_code(values: torch.Tensor, indices: torch.Tensor, num_latents: int,
               offsets: torch.Tensor | None = None) -> torch.Tensor:
    """The dense code `[..., L]` of a per-token code, or `[N, L]` of a flat one, token by token from its offsets."""
    if offsets is None:
        return torch.zeros(*values.shape[:-1], num_latents, dtype=values.dtype).scatter(-1, indices, values)
    bounds = [*offsets.tolist(), len(values)]
    dense = torch.zeros(len(offsets), num_latents, dtype=values.dtype)
    for token in range(len(offsets)):
        for position in range(bounds[token], bounds[token + 1]):
            assert dense[token, indices[position]] == 0  # each latent once per token
            dense[token, indices[position]] = values[position]
    return dense


def test_per_token_topk_keeps_the_k_largest_and_decodes_like_dense():
    sae = make_sae()
    x = torch.randn(10, 6, dtype=torch.float64)
    expected_pre = naive_pre_acts(sae, x)
    torch.testing.assert_close(sae.pre_acts(x), expected_pre)

    acts, indices = sae.encode(x)
    assert acts.shape == indices.shape == (10, 3)
    for token in range(10):
        expected = sorted(expected_pre[token].tolist(), reverse=True)[:3]
        assert sorted(acts[token].tolist(), reverse=True) == pytest.approx(expected)
    dense = dense_code(acts, indices, 24)
    torch.testing.assert_close(sae.decode(acts, indices), dense @ sae.W_dec + sae.b_dec)


def test_batch_topk_keeps_k_times_n_largest_over_the_batch():
    sae = make_sae(batch_topk=True)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    code = sae.training_topk(sae.pre_acts(x))
    assert code.acts.shape == code.indices.shape == (30,) and code.offsets.shape == (10,)  # k·N values, flat
    dense = dense_code(code.acts, code.indices, 24, code.offsets)  # [10, 24]
    pre = naive_pre_acts(sae, x.reshape(10, 6))
    threshold = pre.flatten().sort(descending=True).values[3 * 10 - 1]
    torch.testing.assert_close(dense, torch.where(pre >= threshold, pre, 0.0))
    out = sae(x)  # the forward decodes the same code
    torch.testing.assert_close(out.sae_out, (dense @ sae.W_dec.detach() + sae.b_dec.detach()).reshape(2, 5, 6))
    assert torch.equal(out.latent_offsets, code.offsets) and torch.equal(out.latent_indices, code.indices)


@pytest.mark.parametrize("crowded", [False, True])
def test_batch_topk_is_exact_when_one_token_holds_more_than_its_candidates(crowded):
    """Each token offers its top 2k latents as candidates; a token with more entries than that among the batch's top
    k·N (here token 0, all of whose 24 entries exceed every other token's) must not lose them."""
    sae = make_sae(k=1, batch_topk=True)
    torch.manual_seed(1)
    pre = torch.rand(8, 24, dtype=torch.float64)  # [N, L]; k·N = 8 kept, 2 candidates per token
    if crowded:
        pre[0] += 10.0
    code = sae.training_topk(pre)
    threshold = pre.flatten().sort(descending=True).values[7]
    dense = dense_code(code.acts, code.indices, 24, code.offsets)
    torch.testing.assert_close(dense, torch.where(pre >= threshold, pre, 0.0))
    assert (dense[0] > 0).sum() == (8 if crowded else (pre[0] >= threshold).sum())


def test_sample_topk_keeps_k_per_sample():
    sae = make_sae(sample_topk=True)
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    code = sae.training_topk(sae.pre_acts(x))
    dense = dense_code(code.acts, code.indices, 24, code.offsets).reshape(3, 4, 24)
    for sample in range(3):
        pre = naive_pre_acts(sae, x[sample])
        threshold = pre.flatten().sort(descending=True).values[2]
        torch.testing.assert_close(dense[sample], torch.where(pre >= threshold, pre, 0.0))
    reference = dense.reshape(12, 24) @ sae.W_dec.detach() + sae.b_dec.detach()  # [12, 6]
    variance = ((x.reshape(12, 6) - x.reshape(12, 6).mean(0)) ** 2).sum()
    expected_fvu = (((reference - x.reshape(12, 6)) ** 2).sum() / variance).item()
    assert sae(x).fvu.item() == pytest.approx(expected_fvu, rel=1e-10)
    with pytest.raises(ValueError, match="sample_topk needs inputs shaped"):
        sae.training_topk(sae.pre_acts(x[0, 0]))


@pytest.mark.parametrize("variant", ["batch_topk", "sample_topk"])
def test_encode_is_per_token_whatever_the_training_variant(variant):
    """An SAE trained with batch or sample TopK still encodes each token alone: its code does not depend on the
    other tokens of the call."""
    sae = make_sae(**{variant: True})
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    acts, indices = sae.encode(x)
    assert acts.shape == indices.shape == (2, 5, 3)
    pre = naive_pre_acts(sae, x.reshape(10, 6))
    for token, (token_acts, token_indices) in enumerate(zip(acts.reshape(10, 3), indices.reshape(10, 3))):
        expected = pre[token].sort(descending=True)
        assert sorted(token_acts.tolist(), reverse=True) == pytest.approx(expected.values[:3].tolist())
        assert set(token_indices.tolist()) == set(expected.indices[:3].tolist())


def test_fvu_and_multi_topk_against_float64_reference():
    sae = make_sae(multi_topk=True, k=2)
    x = torch.randn(12, 6, dtype=torch.float64)
    out = sae(x)
    pre = naive_pre_acts(sae, x)
    variance = ((x - x.mean(0)) ** 2).sum()
    for k, value in ((2, out.fvu), (8, out.multi_topk_fvu)):
        top = pre.topk(k).values[:, -1:]
        reconstruction = torch.where(pre >= top, pre, 0.0) @ sae.W_dec.detach() + sae.b_dec.detach()
        assert value.item() == pytest.approx((((reconstruction - x) ** 2).sum() / variance).item(), rel=1e-10)


def test_auxk_matches_spec_and_only_trains_dead_latents():
    sae = make_sae(d=8, latents=32, k=2)
    x = torch.randn(7, 8, dtype=torch.float64)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[1, 5, 9, 20, 31]] = True  # 5 dead latents, d/2 = 4: k_aux = 4, scale = 1
    out = sae(x, dead_mask=dead)

    pre = naive_pre_acts(sae, x)
    x_hat = out.sae_out.detach()
    variance = ((x - x.mean(0)) ** 2).sum()
    loss = 0.0
    for token in range(7):
        dead_values = pre[token].masked_fill(~dead, float("-inf"))
        top = dead_values.topk(4)
        prediction = sum(v * sae.W_dec.detach()[i] for v, i in zip(top.values, top.indices))  # no b_dec
        loss += ((prediction - (x[token] - x_hat[token])) ** 2).sum()
    assert out.auxk_loss.item() == pytest.approx((loss / variance).item(), rel=1e-10)

    out.auxk_loss.backward()
    trained_rows = sae.W_dec.grad.abs().sum(1) > 0
    assert trained_rows.any() and not (trained_rows & ~dead).any()  # the residual is a constant


def test_auxk_with_fewer_dead_latents_than_d_over_2_decodes_all_of_them():
    sae = make_sae(d=8, latents=32, k=2, batch_topk=True)
    x = torch.randn(7, 8, dtype=torch.float64)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[4, 17, 30]] = True  # 3 dead latents < d/2 = 4: k_aux = 3, scale = 3/4
    out = sae(x, dead_mask=dead)
    pre = naive_pre_acts(sae, x)
    prediction = pre[:, dead] @ sae.W_dec.detach()[dead]  # every dead latent of every token
    variance = ((x - x.mean(0)) ** 2).sum()
    expected = 0.75 * ((prediction - (x - out.sae_out.detach())) ** 2).sum() / variance
    assert out.auxk_loss.item() == pytest.approx(expected.item(), rel=1e-10)


def test_auxk_scale_with_few_dead_latents():
    sae = make_sae(d=8, latents=32, k=2)
    x = torch.randn(7, 8, dtype=torch.float64)
    one_dead = torch.zeros(32, dtype=torch.bool)
    one_dead[3] = True
    pre = naive_pre_acts(sae, x)
    variance = ((x - x.mean(0)) ** 2).sum()
    out = sae(x, dead_mask=one_dead)
    prediction = pre[:, 3:4] * sae.W_dec.detach()[3]
    expected = 0.25 * ((prediction - (x - out.sae_out.detach())) ** 2).sum() / variance  # scale = 1 / (d/2)
    assert out.auxk_loss.item() == pytest.approx(expected.item(), rel=1e-10)
    assert sae(x, dead_mask=torch.zeros(32, dtype=torch.bool)).auxk_loss.item() == 0.0


def test_decoder_rows_stay_unit_norm_and_gradient_loses_its_parallel_part():
    sae = make_sae()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(24, dtype=torch.float64))
    sae(torch.randn(9, 6, dtype=torch.float64)).fvu.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert parallel.abs().max() < 1e-12 and sae.W_dec.grad.abs().max() > 0
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.set_decoder_norm_to_unit_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(24, dtype=torch.float64))


def test_geometric_median_is_a_stationary_point_of_the_distance_sum():
    torch.manual_seed(1)
    points = torch.randn(200, 5, dtype=torch.float64) * torch.tensor([1.0, 2, 3, 4, 5], dtype=torch.float64)
    points[:20] += 50.0  # outliers pull the mean away, not the median
    median = geometric_median(points, max_iter=1000, tol=1e-12)
    unit_vectors = (points - median) / (points - median).norm(dim=1, keepdim=True)
    assert unit_vectors.sum(0).norm() < 1e-6 * len(points)
    distance = lambda p: (points - p).norm(dim=1).sum()  # noqa: E731
    assert distance(median) < distance(points.mean(0))


def test_init_rejects_unsupported_options():
    with pytest.raises(ValueError, match="input_unit_norm"):
        SparseAutoencoder(4, SaeConfig(input_unit_norm=True))
    with pytest.raises(ValueError, match="exclusive"):
        SparseAutoencoder(4, SaeConfig(batch_topk=True, sample_topk=True))
    for cfg in (SaeConfig(num_latents=8, k=9), SaeConfig(k=0), SaeConfig(expansion_factor=0)):
        with pytest.raises(ValueError, match=r"needs num_latents .* and k in \[1, num_latents\]; got d_in=4"):
            SparseAutoencoder(4, cfg)
    assert SparseAutoencoder(4, SaeConfig(num_latents=8, k=8)).num_latents == 8  # k = L is allowed


def loss_and_gradients(sae: SparseAutoencoder, x: torch.Tensor, dead: torch.Tensor | None,
                       encoder_backward: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The summed unsupervised terms and the gradient of every parameter and of the input."""
    x = x.detach().requires_grad_()
    out = sae(x, dead_mask=dead, encoder_backward=encoder_backward)
    loss = out.fvu + out.auxk_loss + out.multi_topk_fvu
    named = dict(sae.named_parameters(), x=x)
    return loss.detach(), dict(zip(named, torch.autograd.grad(loss, list(named.values()))))


@pytest.mark.parametrize("period", [2, 16])
@pytest.mark.parametrize("cfg", [dict(), dict(batch_topk=True), dict(sample_topk=True), dict(multi_topk=True)])
def test_sparse_encoder_backward_gives_the_dense_gradients(cfg, period):
    """The sparse backward reaches the encoder only through the selected latents (TopK, AuxK, Multi-TopK): in float64
    every gradient must equal plain autograd through the dense pre-activations. With 16 dead latents (≥ d/2) AuxK's
    latents (which may overlap the TopK code) contribute too; with 2 (< d/2) AuxK's code holds zeroed live latents
    that must get no gradient."""
    sae = make_sae(d=8, latents=32, k=3, **cfg)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    dead = torch.arange(32) % period == 0
    dense_loss, dense = loss_and_gradients(sae, x, dead, "dense")
    sparse_loss, sparse = loss_and_gradients(sae, x, dead, "sparse")
    assert sparse_loss.item() == dense_loss.item()
    for name, gradient in dense.items():
        assert gradient.abs().max() > 0, name
        torch.testing.assert_close(sparse[name], gradient, rtol=1e-12, atol=1e-14, msg=name)


def test_sparse_encoder_backward_trains_exactly_the_selected_latents():
    sae = make_sae(d=8, latents=32, k=3)
    x = torch.randn(4, 8, dtype=torch.float64)
    _, gradients = loss_and_gradients(sae, x, None, "sparse")
    acts, indices = sae.encode(x)
    touched = (gradients["encoder.weight"].abs().sum(1) > 0).nonzero().flatten()
    assert touched.tolist() == indices[acts > 0].unique().tolist()
    with pytest.raises(ValueError, match="encoder_backward must be one of"):
        sae(x, encoder_backward="fast")


@pytest.mark.parametrize("encoder_backward", ["sparse", "dense"])
def test_bfloat16_autocast_and_bfloat16_weights_train_close_to_float64(encoder_backward):
    """Under CPU bf16 autocast (what Lightning's bf16-mixed uses) the encoder matmul, TopK and AuxK run in bf16 while
    the embedding-bag decode and every gradient stay in the parameters' float32; a bf16 SAE on bf16 inputs works too.
    Both must agree with the float64 computation to bf16 accuracy."""
    reference = make_sae(d=16, latents=64, k=4)
    x = torch.randn(32, 16, dtype=torch.float64)
    dead = torch.arange(64) % 2 == 0
    expected_loss, expected = loss_and_gradients(reference, x, dead, "dense")

    float32_sae = make_sae(d=16, latents=64, k=4).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_loss, autocast_grads = loss_and_gradients(float32_sae, x.bfloat16(), dead, encoder_backward)
    bfloat16_loss, bfloat16_grads = loss_and_gradients(make_sae(d=16, latents=64, k=4).bfloat16(), x.bfloat16(),
                                                       dead, encoder_backward)
    for loss, gradients, dtype in ((autocast_loss, autocast_grads, torch.float32),
                                   (bfloat16_loss, bfloat16_grads, torch.bfloat16)):
        assert loss.item() == pytest.approx(expected_loss.item(), rel=5e-2)
        for name in ("encoder.weight", "W_dec"):
            assert gradients[name].dtype == dtype
            error = (gradients[name].double() - expected[name]).norm() / expected[name].norm()
            assert error < 0.1, (name, error)


def test_mean_code_is_the_token_average_of_the_dense_code():
    sae = make_sae(batch_topk=True)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    expected = dense_code(*sae.encode(x), 24).mean(dim=1)  # [2, 24]
    torch.testing.assert_close(sae.mean_code(x), expected)
