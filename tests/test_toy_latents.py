"""ToyCanvas text-to-image training inputs: the pools of encoded renders."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from saemnesia.pipelines import build_tiny_pipeline
from saemnesia.toy.data import ToyRenderDataset
from saemnesia.toy.latents import LatentPool, PoolBatches, ToyLatentDataModule
from saemnesia.toy.text_to_image import ToyDiffusionModule, to_vae_range, toy_pipeline_config


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    build_tiny_pipeline(toy_pipeline_config()).vae.save_pretrained(folder)
    return folder


def attach(datamodule: ToyLatentDataModule, model: object, rank: int, world_size: int) -> None:
    """Give the datamodule the parts of a Trainer it reads (rank, world size, device, model)."""
    datamodule.trainer = SimpleNamespace(global_rank=rank, world_size=world_size, lightning_module=model,
                                         strategy=SimpleNamespace(root_device=torch.device("cpu")))


def test_each_rank_encodes_its_share_of_the_renders(vae_folder):
    model = ToyDiffusionModule(vae=str(vae_folder))
    datamodule = ToyLatentDataModule(batch_size=2, pool_size=10, val_size=4, seed=3, val_seed=4,
                                     encode_batch_size=3)  # 3 does not divide the share: a partial last batch
    attach(datamodule, model, rank=1, world_size=2)
    datamodule.setup("fit")

    renders = ToyRenderDataset(10, seed=3)
    share = renders.__getitems__([1, 3, 5, 7, 9])
    assert datamodule.train_pool.prompts == [sample["prompt"] for sample in share]
    with torch.no_grad():  # the same renders encoded in one batch
        posterior = model.vae.encode(to_vae_range(torch.stack([sample["image"] for sample in share]))).latent_dist
    torch.testing.assert_close(datamodule.train_pool.mean, posterior.mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(datamodule.train_pool.std, posterior.std, rtol=1e-4, atol=1e-5)
    assert datamodule.val_pool.prompts == [sample["prompt"] for sample in
                                           ToyRenderDataset(4, seed=4).__getitems__([1, 3])]


def numbered_pool(size: int) -> LatentPool:
    """A pool whose sample i has mean i, std -i and prompt `p{i}`, so a batch shows which samples it holds."""
    values = torch.arange(size, dtype=torch.float32).view(size, 1, 1, 1).expand(size, 4, 2, 2)  # [N, 4, 2, 2]
    return LatentPool(values, -values, [f"p{i}" for i in range(size)])


def test_training_batches_are_endless_reshuffled_passes_over_the_pool():
    stream = iter(PoolBatches(numbered_pool(10), batch_size=4, seed=0))
    passes = [[next(stream) for _ in range(2)] for _ in range(3)]  # a pass: 2 whole batches, 2 samples left out
    orders = []
    for batches in passes:
        indices = [int(i) for batch in batches for i in batch["latent_mean"][:, 0, 0, 0]]
        assert all(batch["latent_mean"].shape == (4, 4, 2, 2) for batch in batches)
        assert len(set(indices)) == 8  # no sample twice within a pass
        for batch in batches:  # the three fields of a batch belong to the same samples
            assert batch["prompt"] == [f"p{int(i)}" for i in batch["latent_mean"][:, 0, 0, 0]]
            torch.testing.assert_close(batch["latent_std"], -batch["latent_mean"])
        orders.append(indices)
    assert orders[0] != orders[1] != orders[2]
    replay = iter(PoolBatches(numbered_pool(10), batch_size=4, seed=0))
    assert next(replay)["prompt"] == passes[0][0]["prompt"]  # the order is a function of the seed


def test_validation_batches_are_one_pass_in_pool_order():
    batches = list(PoolBatches(numbered_pool(10), batch_size=4, seed=None))
    assert [batch["prompt"] for batch in batches] == [["p0", "p1", "p2", "p3"], ["p4", "p5", "p6", "p7"], ["p8", "p9"]]


def test_pool_batches_are_drawn_from_their_posteriors(vae_folder):
    model = ToyDiffusionModule(vae=str(vae_folder))
    mean, std = torch.randn(3, 4, 8, 8), torch.rand(3, 4, 8, 8)
    batch = {"latent_mean": mean, "latent_std": std, "prompt": ["a", "b", "c"]}
    latents = model.clean_latents(batch, torch.Generator().manual_seed(7))
    expected = (mean + std * torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(7)))
    torch.testing.assert_close(latents, expected * model.vae.config.scaling_factor)


def test_latent_datamodule_refuses_bad_settings():
    with pytest.raises(ValueError, match="data.seed and data.val_seed are both 2"):
        ToyLatentDataModule(seed=2, val_seed=2)
    datamodule = ToyLatentDataModule(batch_size=2, pool_size=4, val_size=2)
    attach(datamodule, SimpleNamespace(), rank=0, world_size=1)
    with pytest.raises(ValueError, match="encodes renders with the model's `vae`, and SimpleNamespace has no"):
        datamodule.setup("fit")


def test_every_process_needs_a_whole_batch_of_the_pool(vae_folder):
    """24 renders hold a batch of 16 in one process but not in two: there the stream would never yield."""
    model = ToyDiffusionModule(vae=str(vae_folder))
    datamodule = ToyLatentDataModule(batch_size=16, pool_size=24, val_size=2)
    attach(datamodule, model, rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"data.pool_size 24 leaves 12 renders to each of 2 processes, fewer than "
                                         r"data.batch_size 16\.$"):
        datamodule.setup("fit")
    attach(datamodule, model, rank=0, world_size=1)
    datamodule.setup("fit")
    assert len(next(iter(datamodule.train_dataloader()))["prompt"]) == 16


def test_diffusion_module_refuses_batches_of_renders(vae_folder):
    model = ToyDiffusionModule(vae=str(vae_folder))
    with pytest.raises(ValueError, match=r"trains on encoded renders .*; got a batch of \['image', 'prompt'\]\.$"):
        model.clean_latents({"image": torch.rand(2, 3, 32, 32), "prompt": ["a", "b"]})
