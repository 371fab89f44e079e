"""SAE checkpoints in every layout of docs/method.md §7, checked against raw tensors and the published loader's
rules."""

import json
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file

from saemnesia.sae import SaeConfig, SparseAutoencoder


@dataclass
class PublishedSaeConfig:
    """The published config class, field for field (docs/method.md §7): its loader does `PublishedSaeConfig(**cfg)`."""

    expansion_factor: int
    normalize_decoder: bool
    num_latents: int
    k: int
    batch_topk: bool
    sample_topk: bool
    input_unit_norm: bool
    multi_topk: bool


def raw_tensors(d: int = 6, latents: int = 16) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {"encoder.weight": torch.randn(latents, d, generator=generator),
            "encoder.bias": torch.randn(latents, generator=generator) * 0.1,
            "W_dec": torch.randn(latents, d, generator=generator),
            "b_dec": torch.randn(d, generator=generator) * 0.1}


def reference_forward(tensors: dict[str, torch.Tensor], x: torch.Tensor, k: int) -> torch.Tensor:
    """Per-token TopK SAE written from docs/method.md §1 with dense matrices."""
    pre = torch.relu((x - tensors["b_dec"]) @ tensors["encoder.weight"].T + tensors["encoder.bias"])
    kth = pre.topk(k).values[:, -1:]
    return torch.where(pre >= kth, pre, 0.0) @ tensors["W_dec"] + tensors["b_dec"]


def published_config(d: int = 6, latents: int = 16, **overrides) -> dict:
    return {"expansion_factor": 16, "normalize_decoder": True, "num_latents": latents, "k": 4,
            "batch_topk": False, "sample_topk": False, "input_unit_norm": False, "multi_topk": False,
            "d_in": d, **overrides}


def test_published_checkpoint_loads_with_identical_outputs(tmp_path):
    folder = tmp_path / "unet.up_blocks.1.attentions.1"
    folder.mkdir()
    tensors = raw_tensors()
    (folder / "cfg.json").write_text(json.dumps(published_config(signature="extra keys are ignored")))
    save_file(tensors, str(folder / "sae.safetensors"))
    x = torch.randn(5, 6)
    loads = (SparseAutoencoder.load(folder), SparseAutoencoder.load(tmp_path, "unet.up_blocks.1.attentions.1"),
             SparseAutoencoder.load(folder, "unet.up_blocks.1.attentions.1"))  # the folder itself, hookpoint given
    for sae in loads:
        assert (sae.d_in, sae.num_latents, sae.cfg.k) == (6, 16, 4)
        torch.testing.assert_close(sae(x).sae_out, reference_forward(tensors, x, k=4))


def test_our_checkpoint_loads_in_the_published_loader(tmp_path):
    sae = SparseAutoencoder(6, SaeConfig(expansion_factor=4, k=3))
    sae.save(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg.pop("d_in") == 6
    assert PublishedSaeConfig(**cfg).num_latents == 24
    stored = load_file(str(tmp_path / "sae" / "sae.safetensors"))
    assert set(stored) == {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    x = torch.randn(5, 6)
    torch.testing.assert_close(reference_forward(stored, x, k=3), sae(x).sae_out.detach())
    assert not list((tmp_path / "sae").glob("*.tmp"))


def test_legacy_state_dict_layout_and_config_aliases(tmp_path):
    tensors = raw_tensors()
    legacy = {"pre_bias": tensors["b_dec"], "latent_bias": tensors["encoder.bias"],
              "encoder.weight": tensors["encoder.weight"], "decoder.weight": tensors["W_dec"].T.contiguous(),
              "stats_last_nonzero": torch.zeros(16, dtype=torch.long)}
    torch.save({"state_dict": legacy}, tmp_path / "state_dict.pth")
    config = published_config()
    config["d_model"], config["n_dirs_local"] = config.pop("d_in"), config.pop("num_latents")
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    sae = SparseAutoencoder.load(tmp_path / "state_dict.pth")
    x = torch.randn(5, 6)
    torch.testing.assert_close(sae(x).sae_out, reference_forward(tensors, x, k=4))


def test_round_trip_keeps_dtype_request_and_weights(tmp_path):
    sae = SparseAutoencoder(6, SaeConfig(expansion_factor=2, k=2, batch_topk=True))
    sae.save(tmp_path)
    loaded = SparseAutoencoder.load(tmp_path, dtype=torch.float64)
    assert loaded.W_dec.dtype == torch.float64 and loaded.cfg.batch_topk
    for name, tensor in sae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name].float(), tensor)


def test_bad_checkpoints_fail_with_one_clear_sentence(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SparseAutoencoder.load(tmp_path / "nowhere")
    (tmp_path / "cfg.json").write_text(json.dumps(published_config()))
    with pytest.raises(FileNotFoundError, match="has no weights: expected sae.safetensors or state_dict.pth"):
        SparseAutoencoder.load(tmp_path)
    save_file(raw_tensors(d=7), str(tmp_path / "sae.safetensors"))
    with pytest.raises(ValueError, match=r"says d_in=6.*weights are \[16, 7\]"):
        SparseAutoencoder.load(tmp_path)

    parent = tmp_path / "parent"
    for hookpoint in ("a", "b"):
        SparseAutoencoder(4, SaeConfig(expansion_factor=2, k=4)).save(parent / hookpoint)
    with pytest.raises(FileNotFoundError, match=r"holds several SAEs \['a', 'b'\]: pass a hookpoint"):
        SparseAutoencoder.load(parent)
    SparseAutoencoder(4, SaeConfig(expansion_factor=2, k=4)).save(tmp_path / "only" / "b")
    alone, named = SparseAutoencoder.load(tmp_path / "only"), SparseAutoencoder.load(tmp_path / "only", "b")
    assert alone.checkpoint_digest == named.checkpoint_digest  # a parent of one SAE folder names it
    with pytest.raises(FileNotFoundError, match=r"has no hookpoint folder 'c'; found \['a', 'b'\]"):
        SparseAutoencoder.load(parent, "c")
    (parent / "a" / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        SparseAutoencoder.load(parent, "a")
