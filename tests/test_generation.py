"""HookedDiffusion: step indices, capture, per-image seeding, erasure hook and bad input, on the tiny pipeline."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from diffusers import DDIMScheduler

from saemnesia.generation import CaptureConfig, HookedDiffusion, PromptItem, image_seed
from saemnesia.hooks import resolve_hookpoint

HOOKPOINT = "unet.up_blocks.1.attentions.1"
ITEMS = [PromptItem("Bears-Cubism-000-s188", "An image of Bears in Cubism style.", "Bears", "Cubism", 188),
         PromptItem("Cats-plain-000-s188", "An image of Cats.", "Cats", None, 188),
         PromptItem("Dogs-Monet-000-s3", "An image of Dogs in Monet style.", "Dogs", "Monet", 3)]


@pytest.fixture(autouse=True)
def one_thread():
    """The test machine's cores are shared; one thread keeps the tiny pipeline fast and timings stable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hooked(pipeline_dir, **options) -> HookedDiffusion:
    module = HookedDiffusion(str(pipeline_dir), **{"hookpoint": HOOKPOINT, "num_steps": 3, "height": 64,
                                                   "width": 64, **options})
    module.setup("predict")
    return module


def record_block_outputs(module: HookedDiffusion) -> tuple[list[torch.Tensor], torch.utils.hooks.RemovableHandle]:
    """Every output of the hooked block, in call order (one UNet call per DDIM step)."""
    outputs: list[torch.Tensor] = []
    block = resolve_hookpoint(module.pipe, HOOKPOINT)
    return outputs, block.register_forward_hook(lambda _, __, output: outputs.append(output[0].clone()))


@pytest.mark.parametrize("num_steps", [10, 20])
def test_captured_steps_timesteps_and_maps_match_the_sampling_loop(tiny_pipeline_dir, num_steps):
    module = hooked(tiny_pipeline_dir, num_steps=num_steps, capture=CaptureConfig(every=3))
    outputs, handle = record_block_outputs(module)
    try:
        result = module.generate(ITEMS[:2])
    finally:
        handle.remove()
    expected_steps = list(range(0, num_steps, 3))
    scheduler = DDIMScheduler.from_config(module.pipe.scheduler.config)
    scheduler.set_timesteps(num_steps)
    assert len(outputs) == num_steps
    assert result.steps == expected_steps
    assert result.timesteps == [int(scheduler.timesteps[step]) for step in expected_steps]
    assert result.activations.shape == (2, len(expected_steps), 16, 64) and result.activations.dtype == torch.float16
    for position, step in enumerate(expected_steps):
        cond = outputs[step][2:]  # [uncond; cond] rows, 2 prompts each
        tokens = cond.permute(0, 2, 3, 1).reshape(2, 16, 64)  # [B, H*W, C], row-major positions
        torch.testing.assert_close(result.activations[:, position], tokens.half(), rtol=0, atol=0)


def test_an_image_does_not_depend_on_its_batch(tiny_pipeline_dir):
    module = hooked(tiny_pipeline_dir, capture=CaptureConfig(halves="uncond"))
    alone = module.generate([ITEMS[1]])
    first_inputs: list[torch.Tensor] = []
    handle = module.pipe.unet.register_forward_pre_hook(lambda _, args: first_inputs.append(args[0].clone()))
    try:
        together = module.generate(ITEMS)
    finally:
        handle.remove()
    # Batched kernels may round differently (~1e-5); a different noise would differ by ~1.
    torch.testing.assert_close(together.images[1], alone.images[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(together.activations[1], alone.activations[0])
    # Each image starts from its own noise: randn from a generator seeded by (seed, prompt id) (DDIM's sigma is 1).
    for row, item in enumerate(ITEMS):
        generator = torch.Generator().manual_seed(image_seed(item.seed, item.prompt_id))
        torch.testing.assert_close(first_inputs[0][row], torch.randn(1, 4, 8, 8, generator=generator)[0])
    reseeded = module.generate([ITEMS[1]._replace(prompt_id="Cats-plain-000-s189", seed=189)])
    assert not torch.allclose(reseeded.images[0], alone.images[0], atol=1e-2)


def test_image_seed_depends_on_seed_and_prompt_id_only():
    seeds = {image_seed(seed, prompt_id) for seed in (0, 1, 188) for prompt_id in ("a", "b", "Bears-plain-000-s0")}
    assert len(seeds) == 9 and all(0 <= seed < 2**63 for seed in seeds)
    # Another process, with another string-hash salt, derives the same seeds (Python's `hash` would not).
    script = "from saemnesia.generation import image_seed; print(image_seed(188, 'Bears-plain-000-s0'))"
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert int(other.stdout) == image_seed(188, "Bears-plain-000-s0")


def test_images_are_decoded_when_asked_for(tiny_pipeline_dir):
    result = hooked(tiny_pipeline_dir, output_type="image").generate(ITEMS[:2])
    assert result.images.shape == (2, 3, 64, 64) and 0 <= result.images.min() and result.images.max() <= 1
    assert result.activations is None and result.steps == [] and result.timesteps == []


def test_bad_input_fails_with_one_sentence(tiny_pipeline_dir, tmp_path):
    with pytest.raises(ValueError, match=r"Hookpoint 'unet.up_blocks.1.attention.1' does not exist"):
        hooked(tiny_pipeline_dir, hookpoint="unet.up_blocks.1.attention.1")
    (tmp_path / "not-a-pipeline").mkdir()
    with pytest.raises(ValueError, match="is not a diffusers pipeline folder: it has no model_index.json"):
        hooked(tmp_path / "not-a-pipeline")
    with pytest.raises(ValueError, match=r"model.capture.steps \[3\] lie outside 0..2"):
        HookedDiffusion(str(tiny_pipeline_dir), num_steps=3, capture=CaptureConfig(steps=[0, 3]))
    with pytest.raises(ValueError, match=r"capture keeps no step: none of \[1, 3\] is a multiple of capture.every=2"):
        HookedDiffusion(str(tiny_pipeline_dir), num_steps=5, capture=CaptureConfig(every=2, steps=[1, 3]))
    with pytest.raises(ValueError, match="model.capture.every must be a positive step interval, got 0"):
        CaptureConfig(every=0)
    with pytest.raises(ValueError, match="model.height and model.width must be positive multiples of 8"):
        HookedDiffusion(str(tiny_pipeline_dir), height=60)
    with pytest.raises(ValueError, match="dtype 'half16' is not a torch dtype name"):
        HookedDiffusion(str(tiny_pipeline_dir), dtype="half16")


def test_a_missing_pipeline_folder_fails_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="Pipeline folder .* does not exist"):
        hooked(tmp_path / "runs/toy/pipeline")
