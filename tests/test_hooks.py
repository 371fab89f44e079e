"""Hookpoint paths, step indices from timesteps, capturing and replacing a block output."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput

import saemnesia
from saemnesia.hooks import (
    ActivationCapture,
    HookContext,
    StepIndex,
    _block_hidden,
    _with_hidden,
    hook_block,
    resolve_hookpoint,
)

HOOKPOINT = "unet.up_blocks.1.attentions.1"
PROMPTS = ["An image of Bears.", "An image of Cats in Cubism style."]


def generate(pipe, steps: int = 5, guidance: float = 7.5, output_type: str = "latent", **kwargs):
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, output_type=output_type,
                generator=torch.Generator().manual_seed(0), **kwargs).images


def assert_no_hooks(pipe) -> None:
    assert not pipe.unet._forward_pre_hooks
    assert not resolve_hookpoint(pipe, HOOKPOINT)._forward_hooks


def test_resolve_hookpoint_from_pipeline_or_module(tiny_pipeline):
    block = tiny_pipeline.unet.up_blocks[1].attentions[1]
    assert resolve_hookpoint(tiny_pipeline, HOOKPOINT) is block
    assert resolve_hookpoint(tiny_pipeline.unet, "up_blocks.1.attentions.1") is block
    assert block.transformer_blocks[0].attn2.is_cross_attention  # the published hookpoint's kind of block


@pytest.mark.parametrize("typo", ["unet.up_blocks.1.attention.1", "unte.up_blocks.1.attentions.1",
                                  "unet.up_blocks.1.attentions.7"])
def test_unknown_hookpoint_lists_close_matches(tiny_pipeline, typo):
    message = rf"Hookpoint '{typo}' does not exist; closest valid paths: \[.*'unet\.up_blocks\.1\.attentions\.1'"
    with pytest.raises(ValueError, match=message):
        resolve_hookpoint(tiny_pipeline, typo)


def test_step_index_is_the_position_in_the_timestep_list():
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    step_index = StepIndex(scheduler)
    for steps in (10, 4):  # a new generation's set_timesteps is read afresh
        scheduler.set_timesteps(steps)
        for position, timestep in enumerate(scheduler.timesteps.tolist()):
            assert step_index(timestep) == position
            assert step_index(scheduler.timesteps[position]) == position
            assert step_index(torch.tensor([timestep, timestep])) == position
    with pytest.raises(ValueError, match="Timestep 5 is not among the 4 timesteps of DDIMScheduler"):
        step_index(5)
    with pytest.raises(ValueError, match=r"differing timesteps \[999, 749\]"):
        step_index(torch.tensor([999, 749]))
    with pytest.raises(ValueError, match="repeats timestep 7, so its step index is ambiguous"):
        StepIndex(SimpleNamespace(timesteps=torch.tensor([9, 7, 7, 3])))(7)
    assert StepIndex(SimpleNamespace(timesteps=torch.tensor([9, 7, 7, 3])))(3) == 3
    with pytest.raises(ValueError, match="has no timesteps yet"):
        StepIndex(SimpleNamespace(timesteps=None))(7)


@pytest.mark.parametrize("steps", [10, 20])
def test_step_index_per_unet_call_restarts_every_generation(tiny_pipeline, steps):
    seen: list[tuple[int, int]] = []
    with hook_block(tiny_pipeline, HOOKPOINT, lambda hidden, context: seen.append((context.step, context.num_steps))):
        generate(tiny_pipeline, steps=steps)
        generate(tiny_pipeline, steps=steps)
    expected = [(step, steps) for step in range(steps)]
    assert seen == expected + expected
    assert_no_hooks(tiny_pipeline)


def record_and_capture(capture: ActivationCapture, raw: dict[int, torch.Tensor]):
    """A callback that keeps the raw block output per step and then runs `capture`."""
    def callback(hidden: torch.Tensor, context: HookContext) -> None:
        raw[context.step] = hidden.clone()
        return capture(hidden, context)
    return callback


@pytest.mark.parametrize("guidance, halves, rows", [
    (7.5, "cond", slice(2, 4)), (7.5, "uncond", slice(0, 2)), (7.5, "both", slice(0, 4)), (1.0, "cond", slice(0, 2)),
])
@pytest.mark.parametrize("height, width", [(64, 64), (64, 96)])
def test_capture_keeps_the_requested_half_as_tokens(tiny_pipeline, guidance, halves, rows, height, width):
    capture, raw = ActivationCapture(halves=halves), {}
    with hook_block(tiny_pipeline, HOOKPOINT, record_and_capture(capture, raw)):
        generate(tiny_pipeline, steps=3, guidance=guidance, height=height, width=width)
    assert sorted(capture.tokens) == [0, 1, 2]
    hidden = raw[1][rows]  # [B, C, H, W]; tiny UNet: 64 channels at latent/2 resolution
    assert hidden.shape == (rows.stop - rows.start, 64, height // 16, width // 16)
    batch, channels, rows_h, cols_w = hidden.shape
    naive = torch.empty(batch, rows_h * cols_w, channels)
    for b in range(batch):
        for h in range(rows_h):
            for w in range(cols_w):
                naive[b, h * cols_w + w] = hidden[b, :, h, w]
    torch.testing.assert_close(capture.tokens[1], naive, rtol=0, atol=0)
    assert not capture.tokens[1].requires_grad


def test_unconditional_half_comes_first(tiny_pipeline):
    # With the same starting latents for both prompts, only the conditional rows can differ.
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1)
    uncond, cond = ActivationCapture(halves="uncond", steps=[0]), ActivationCapture(halves="cond", steps=[0])

    def capture_both(hidden: torch.Tensor, context: HookContext) -> None:
        uncond(hidden, context)
        cond(hidden, context)

    with hook_block(tiny_pipeline, HOOKPOINT, capture_both):
        generate(tiny_pipeline, steps=2, latents=latents)
    assert torch.equal(uncond.tokens[0][0], uncond.tokens[0][1])
    assert not torch.equal(cond.tokens[0][0], cond.tokens[0][1])


def test_capture_selects_steps_and_stacks_in_order(tiny_pipeline):
    every_third, chosen = ActivationCapture(every=3, dtype=torch.float16), ActivationCapture(steps=[4, 1])

    def capture_both(hidden: torch.Tensor, context: HookContext) -> None:
        every_third(hidden, context)
        chosen(hidden, context)

    with hook_block(tiny_pipeline, HOOKPOINT, capture_both):
        generate(tiny_pipeline, steps=10)
    assert sorted(every_third.tokens) == [0, 3, 6, 9]
    assert every_third.tokens[3].dtype == torch.float16
    stacked = chosen.stack()  # [B, S, H*W, C]
    assert stacked.shape == (2, 2, 16, 64)
    assert torch.equal(stacked[:, 0], chosen.tokens[1]) and torch.equal(stacked[:, 1], chosen.tokens[4])


def test_capture_refuses_the_missing_uncond_half_and_bad_options(tiny_pipeline):
    with pytest.raises(ValueError, match=r"halves='uncond' needs classifier-free guidance \(guidance_scale > 1\)"):
        with hook_block(tiny_pipeline, HOOKPOINT, ActivationCapture(halves="uncond")):
            generate(tiny_pipeline, guidance=1.0)
    assert_no_hooks(tiny_pipeline)
    reused = ActivationCapture(steps=[0])
    with pytest.raises(RuntimeError, match="Nothing was captured"):
        reused.stack()
    with pytest.raises(RuntimeError, match="Step 0 was already captured; use a new ActivationCapture per generation"):
        with hook_block(tiny_pipeline, HOOKPOINT, reused):
            generate(tiny_pipeline, steps=2)
            generate(tiny_pipeline, steps=2)
    with pytest.raises(ValueError, match="halves='cfg' is not supported"):
        ActivationCapture(halves="cfg")
    with pytest.raises(ValueError, match="every=0 must be a positive step interval"):
        ActivationCapture(every=0)


def test_replacing_the_output_changes_the_image_and_identity_does_not(tiny_pipeline):
    baseline = generate(tiny_pipeline, output_type="np")
    with hook_block(tiny_pipeline, HOOKPOINT, lambda hidden, context: hidden.clone()):
        identity = generate(tiny_pipeline, output_type="np")
    with hook_block(tiny_pipeline, HOOKPOINT, lambda hidden, context: hidden * 0.5 if context.step >= 2 else None):
        halved_late = generate(tiny_pipeline, output_type="np")
    assert (identity == baseline).all()
    assert (halved_late != baseline).any()
    assert_no_hooks(tiny_pipeline)


def test_hooks_are_removed_when_the_callback_raises(tiny_pipeline):
    baseline = generate(tiny_pipeline)

    def fail_at_step_two(hidden: torch.Tensor, context: HookContext) -> None:
        if context.step == 2:
            raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        with hook_block(tiny_pipeline, HOOKPOINT, fail_at_step_two):
            generate(tiny_pipeline)
    assert_no_hooks(tiny_pipeline)
    assert torch.equal(generate(tiny_pipeline), baseline)


def test_hook_block_refuses_bad_hookpoints_and_replacements(tiny_pipeline):
    with pytest.raises(ValueError, match="Hookpoint 'vae.decoder.mid_block' is not inside the UNet"):
        with hook_block(tiny_pipeline, "vae.decoder.mid_block", lambda hidden, context: None):
            pass
    message = rf"The callback on {HOOKPOINT} returned \(4, 64, 4\); expected None or a tensor \(4, 64, 4, 4\)"
    with pytest.raises(ValueError, match=message):
        with hook_block(tiny_pipeline, HOOKPOINT, lambda hidden, context: hidden[..., 0]):
            generate(tiny_pipeline)
    assert_no_hooks(tiny_pipeline)


@pytest.mark.parametrize("output", [
    (torch.zeros(1, 2, 3, 4),),
    (torch.zeros(1, 2, 3, 4), (torch.ones(1),)),
    Transformer2DModelOutput(sample=torch.zeros(1, 2, 3, 4)),
    torch.zeros(1, 2, 3, 4),
])
def test_block_outputs_of_every_container_type_are_read_and_rewrapped(output):
    replacement = torch.ones(1, 2, 3, 4)
    rewrapped = _with_hidden(output, replacement)
    assert type(rewrapped) is type(output)
    assert torch.equal(_block_hidden(output), torch.zeros(1, 2, 3, 4))
    assert _block_hidden(rewrapped) is replacement
    if isinstance(output, tuple):
        assert rewrapped[1:] == output[1:]


def test_erase_refuses_a_pipeline_without_guidance_and_a_block_outside_the_unet(tiny_pipeline):
    unchanged = SimpleNamespace(num_steps=3, apply=lambda hidden, step: hidden)
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2, layers_per_block=1, norm_num_groups=4)
    with pytest.raises(ValueError, match="DDPMPipeline is not a UNet pipeline with guidance; expected SD or SDXL."):
        with saemnesia.erase(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()), unchanged, "unet.mid_block"):
            pass
    with pytest.raises(ValueError, match="Hookpoint 'vae.decoder.mid_block' is not inside the UNet; expected a path "
                                         "starting with 'unet.'."):
        with saemnesia.erase(tiny_pipeline, unchanged, "vae.decoder.mid_block"):
            pass
