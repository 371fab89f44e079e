"""How much of the drawn object passes through a hookpoint: activation patching on the ToyCanvas model.

    python -m saemnesia.toy.patching                                    # unet.up_blocks.1.attentions.1, both halves
    python -m saemnesia.toy.patching --hookpoint unet.up_blocks.1.attentions.2 --halves cond

Each object's plain prompt is generated with the hooked block's output replaced, at every sampling step, by the
output the block gave for another object's prompt (the next one, or `--shift` places on; same seed, same step);
the object classifier then says whose object the image shows. What still shows the prompt's own object when the
whole block speaks for another one (`PatchingResult.source`) is out of reach of any eraser that edits only this
block; what the block does carry is within reach of a good enough edit.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import NamedTuple

import torch
from diffusers import DiffusionPipeline
from torch import Tensor

from saemnesia.hooks import HALVES, Halves, HookContext, hook_block
from saemnesia.pipelines import load_pipeline
from saemnesia.toy import TOY_CLASSIFIERS_DIR, TOY_OBJECTS, TOY_PIPELINE_DIR, toy_prompt
from saemnesia.toy.classifiers import load_toy_classifier


class PatchingResult(NamedTuple):
    """Object classifier verdicts on the patched images, fractions in [0, 1]."""

    source: float
    """Images showing the object their prompt asked for."""
    patched_in: float
    """Images showing the object whose activations were patched in."""


def plain_images(pipe: DiffusionPipeline, objects: Sequence[int], seeds: Sequence[int], num_steps: int,
                 guidance_scale: float) -> Tensor:
    """`[len(objects), 3, H, W]`: the plain prompt of each object with its seed (pairs in order)."""
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return pipe([toy_prompt(TOY_OBJECTS[obj], None) for obj in objects], num_inference_steps=num_steps,
                guidance_scale=guidance_scale, generator=generators, output_type="pt").images


@torch.no_grad()
def patch_hookpoint(pipe: DiffusionPipeline, hookpoint: str, halves: Halves = "both", seeds: Sequence[int] = range(4),
                    num_steps: int = 20, guidance_scale: float = 7.5, shift: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Generate every object's plain prompt × `seeds` with `hookpoint`'s output (`halves` of the CFG batch) taken
    from the prompt of object `(i + shift) % 8`; returns (images `[N, 3, H, W]`, prompt objects `[N]`, patched-in
    objects `[N]`). `shift=0` patches each prompt with its own activations (images equal to unpatched ones)."""
    if halves not in HALVES:
        raise ValueError(f"halves (--halves) must be one of {list(HALVES)}, got {halves!r}.")
    pairs = [(obj, seed) for obj in range(len(TOY_OBJECTS)) for seed in seeds]
    objects = [obj for obj, _ in pairs]
    donors = [(obj + shift) % len(TOY_OBJECTS) for obj in objects]
    recorded: dict[int, Tensor] = {}

    def record(hidden: Tensor, context: HookContext) -> None:
        recorded[context.step] = hidden.clone()  # [2B, C, H, W] with CFG: [uncond; cond]

    def patch(hidden: Tensor, context: HookContext) -> Tensor:
        donor = recorded[context.step]
        if halves == "both" or not context.do_cfg:
            return donor
        uncond, cond = hidden.chunk(2)  # [B, C, H, W] each
        donor_uncond, donor_cond = donor.chunk(2)
        return torch.cat([uncond, donor_cond] if halves == "cond" else [donor_uncond, cond])

    seed_list = [seed for _, seed in pairs]
    with hook_block(pipe, hookpoint, record):
        plain_images(pipe, donors, seed_list, num_steps, guidance_scale)
    with hook_block(pipe, hookpoint, patch):
        images = plain_images(pipe, objects, seed_list, num_steps, guidance_scale)
    return images, torch.tensor(objects), torch.tensor(donors)


def main(args: list[str] | None = None) -> PatchingResult:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default=str(TOY_PIPELINE_DIR), help="diffusers pipeline folder")
    parser.add_argument("--classifiers", default=str(TOY_CLASSIFIERS_DIR), help="folder with object/")
    parser.add_argument("--hookpoint", default="unet.up_blocks.1.attentions.1")
    parser.add_argument("--halves", default="both", choices=HALVES, help="CFG halves whose output is replaced")
    parser.add_argument("--seeds", type=int, default=4, help="seeds 0..N-1 per prompt")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (the toy configs': 20)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--shift", type=int, default=1, help="object i gets the activations of object i + shift")
    options = parser.parse_args(args)
    classifier = load_toy_classifier(options.classifiers, "object")
    images, objects, donors = patch_hookpoint(load_pipeline(options.pipeline), options.hookpoint, options.halves,
                                              range(options.seeds), options.steps, options.guidance,
                                              options.shift)
    with torch.no_grad():
        predicted = classifier(images).argmax(1)
    result = PatchingResult(source=(predicted == objects).float().mean().item(),
                            patched_in=(predicted == donors).float().mean().item())
    print(json.dumps({"hookpoint": options.hookpoint, "halves": options.halves, "shift": options.shift,
                      **result._asdict()}))
    return result


if __name__ == "__main__":
    main()
