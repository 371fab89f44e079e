"""Loading pipeline folders and the tiny offline pipeline."""

from __future__ import annotations

import json
import re
import shutil
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionXLPipeline

import saemnesia
from saemnesia.hooks import hook_block
from saemnesia.pipelines import (
    TinyPipelineConfig,
    build_tiny_pipeline,
    build_tiny_tokenizer,
    load_pipeline,
    save_tiny_pipeline,
)
from saemnesia.sae import SaeConfig, SparseAutoencoder
from saemnesia.stats import ConceptStats

PROMPTS = ["An image of Bears.", "An image of Cats in Cubism style."]


def generate(pipe, output_type: str, **kwargs):
    return pipe(PROMPTS, num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                output_type=output_type, **kwargs).images


def copy_with_index(source: Path, target: Path, **changes) -> Path:
    """A copy of a pipeline folder whose model_index.json has `changes` applied."""
    shutil.copytree(source, target)
    index = json.loads((target / "model_index.json").read_text())
    (target / "model_index.json").write_text(json.dumps({**index, **changes}))
    return target


def test_loaded_pipeline_reproduces_the_built_one(tiny_pipeline):
    assert isinstance(tiny_pipeline.scheduler, DDIMScheduler)
    latents = generate(tiny_pipeline, "latent", guidance_scale=7.5)
    assert latents.shape == (2, 4, 8, 8)  # 64 px default, VAE factor 8
    built = build_tiny_pipeline()
    built.unet.to(memory_format=torch.channels_last)  # the layout load_pipeline gives (it changes the rounding)
    built_latents = generate(built, "latent", guidance_scale=7.5)
    torch.testing.assert_close(latents, built_latents, rtol=0, atol=0)
    images = generate(tiny_pipeline, "pil", guidance_scale=7.5, height=64, width=96)
    assert [image.size for image in images] == [(96, 64), (96, 64)]
    assert len({np.asarray(image).tobytes() for image in images}) == 2  # different prompts, different images


def test_scheduler_is_replaced_by_ddim_or_kept(tiny_pipeline_dir, tmp_path):
    folder = copy_with_index(tiny_pipeline_dir, tmp_path / "pndm", scheduler=["diffusers", "PNDMScheduler"])
    kept = load_pipeline(folder, scheduler="keep")
    replaced = load_pipeline(folder, scheduler="ddim")
    assert isinstance(kept.scheduler, PNDMScheduler)
    assert isinstance(replaced.scheduler, DDIMScheduler)
    torch.testing.assert_close(replaced.scheduler.betas, kept.scheduler.betas)  # same noise schedule
    with pytest.raises(ValueError, match="scheduler 'euler' is not supported"):
        load_pipeline(folder, scheduler="euler")


def test_dtype_is_applied_and_checked(tiny_pipeline_dir):
    pipe = load_pipeline(tiny_pipeline_dir, dtype="bfloat16")
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype 'float33' is not a torch dtype name"):
        load_pipeline(tiny_pipeline_dir, dtype="float33")


def test_folders_that_are_not_pipelines_fail_clearly(tiny_pipeline_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pipeline(tmp_path / "missing")
    message = f"{tmp_path} is not a diffusers pipeline folder: it has no model_index.json"
    with pytest.raises(ValueError, match=re.escape(message)):
        load_pipeline(tmp_path)
    flux = copy_with_index(tiny_pipeline_dir, tmp_path / "flux", _class_name="FluxPipeline")
    with pytest.raises(ValueError, match="names pipeline class 'FluxPipeline'; expected one of"):
        load_pipeline(flux)


def test_tokenizer_splits_any_ascii_prompt_into_characters():
    tokenizer = build_tiny_tokenizer()
    prompt = "An image of " + string.ascii_letters + string.digits + string.punctuation + " in Pop Art style."
    # Independent expectation: CLIP lower-cases, splits words/digits/punctuation runs, and with no merges
    # every word is its characters, the last one carrying the end-of-word suffix.
    words = re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", prompt.lower())
    expected = [token for word in words for token in [*word[:-1], word[-1] + "</w>"]]
    ids = tokenizer(prompt).input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["<|startoftext|>", *expected, "<|endoftext|>"]
    assert tokenizer.model_max_length == 77


def test_tiny_pipeline_is_seeded(tiny_pipeline):
    again = build_tiny_pipeline()
    other = build_tiny_pipeline(TinyPipelineConfig(seed=1))
    for name, weight in tiny_pipeline.unet.state_dict().items():
        assert torch.equal(weight, again.unet.state_dict()[name])
    assert not torch.equal(tiny_pipeline.text_encoder.get_input_embeddings().weight,
                           other.text_encoder.get_input_embeddings().weight)


def test_tiny_config_and_save_refuse_bad_input(tiny_pipeline_dir):
    with pytest.raises(ValueError, match="needs at least 3 levels"):
        TinyPipelineConfig(block_out_channels=(32, 64))
    with pytest.raises(ValueError, match="channel count 12 is not divisible by norm_num_groups=8"):
        TinyPipelineConfig(vae_block_out_channels=(8, 12))
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        save_tiny_pipeline(tiny_pipeline_dir)


def test_sdxl_folder_loads_with_ddim_and_its_unet_calls_map_to_steps(tmp_path):
    folder = save_tiny_pipeline(tmp_path / "tiny-sdxl", TinyPipelineConfig(sdxl=True))
    pipe = load_pipeline(copy_with_index(folder, tmp_path / "pndm", scheduler=["diffusers", "PNDMScheduler"]))
    assert isinstance(pipe, StableDiffusionXLPipeline) and pipe.text_encoder_2.config.projection_dim == 64
    assert isinstance(pipe.scheduler, DDIMScheduler)
    steps: list[int] = []
    with hook_block(pipe, "unet.up_blocks.1.attentions.1", lambda hidden, context: steps.append(context.step)):
        latents = generate(pipe, "latent", guidance_scale=5.0)
    assert latents.shape == (2, 4, 8, 8)
    assert steps == list(range(5))


def test_the_python_api_erases_and_captures_in_an_sdxl_pipeline(tmp_path):
    """`saemnesia.erase` and `capture` on the pipeline class diffusers loads for SDXL: two text encoders and the
    size/crop time embeddings, the same hookpoint layout."""
    pipe = load_pipeline(save_tiny_pipeline(tmp_path / "tiny-sdxl", TinyPipelineConfig(sdxl=True)))
    torch.manual_seed(0)
    sae = SparseAutoencoder(64, SaeConfig(num_latents=256, k=8))
    stats = ConceptStats(["A", "B"], torch.rand(2, 5, 256) * 0.05, torch.tensor([4, 4]))  # [C, T, L], 5 steps
    eraser = saemnesia.ConceptEraser(sae, stats, {"A": {"percentile": 99.0, "multiplier": -10.0}})
    unerased = generate(pipe, "latent", guidance_scale=5.0)
    with saemnesia.erase(pipe, eraser), saemnesia.capture(pipe, halves="both") as activations:
        erased = generate(pipe, "latent", guidance_scale=5.0)
    assert activations.stack().shape == (4, 5, 16, 64)  # both CFG halves of 2 prompts, 5 steps, 4×4 tokens
    assert not torch.allclose(erased, unerased, atol=1e-3)
    torch.testing.assert_close(generate(pipe, "latent", guidance_scale=5.0), unerased)  # unhooked on exit


def test_erase_rewrites_a_float16_pipeline_with_a_float32_sae(tiny_pipeline_dir):
    """The eraser runs its rule in the SAE's float32 and hands the block float16 back, as on a GPU (here on the CPU)."""
    pipe = load_pipeline(tiny_pipeline_dir, dtype="float16")
    torch.manual_seed(0)
    stats = ConceptStats(["A", "B"], torch.rand(2, 5, 256) * 0.05, torch.tensor([4, 4]))  # [C, T, L], 5 steps
    eraser = saemnesia.ConceptEraser(SparseAutoencoder(64, SaeConfig(num_latents=256, k=8)), stats,
                                     {"A": {"percentile": 99.0, "multiplier": -10.0}})
    unerased = generate(pipe, "latent")
    with saemnesia.erase(pipe, eraser):
        erased = generate(pipe, "latent")
    assert erased.dtype == torch.float16 and torch.isfinite(erased).all()
    assert (erased.float() - unerased.float()).abs().max() > 1e-2
