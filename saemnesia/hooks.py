"""Read or replace one UNet block's output during generation, knowing which sampling step it belongs to.

Two plain torch hooks do the work: a forward pre-hook on the UNet maps its timestep argument to the
sampling step (position in `scheduler.timesteps`, never a call counter, so consecutive or interrupted
generations cannot drift), and a forward hook on the block hands its output `[B, C, H, W]` to a callback
that may return a replacement. Both are removed on exit, also when the generation raises.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any, Literal, NamedTuple, Protocol, get_args

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from torch import Tensor, nn

PUBLISHED_HOOKPOINT = "unet.up_blocks.1.attentions.1"
"""The SD1.5 block SAeUron and SAEmnesia read and erase at (docs/method.md §1)."""

Halves = Literal["cond", "uncond", "both"]
HALVES: tuple[str, ...] = get_args(Halves)


class HookContext(NamedTuple):
    """What a block callback knows about the UNet call it runs in."""

    hookpoint: str
    """Dotted path of the hooked block, e.g. `unet.up_blocks.1.attentions.1`."""
    step: int
    """Sampling step index `0..num_steps-1` (the first UNet call of a generation is step 0)."""
    num_steps: int
    """T, the number of entries in `scheduler.timesteps` for this generation."""
    timestep: Tensor | float
    """The timestep argument the UNet received."""
    do_cfg: bool
    """Classifier-free guidance is on: the batch is `[unconditional; conditional]`, half each."""

    def select(self, hidden: Tensor, halves: Halves) -> Tensor:
        """The rows of a block output that belong to the requested CFG half (all rows for "both").

        Without CFG the only half is the conditional one.
        """
        if not self.do_cfg:
            if halves == "uncond":
                raise ValueError(
                    "halves='uncond' needs classifier-free guidance (guidance_scale > 1); without it the UNet "
                    "batch holds only the conditional half."
                )
            return hidden
        if halves == "both":
            return hidden
        uncond, cond = hidden.chunk(2)  # [B, C, H, W] each: diffusers stacks [uncond; cond]
        return cond if halves == "cond" else uncond


OutputCallback = Callable[[Tensor, HookContext], Tensor | None]
"""Receives the block output `[B, C, H, W]`; a returned tensor of the same shape replaces it."""


def resolve_hookpoint(pipe_or_root: DiffusionPipeline | nn.Module, path: str) -> nn.Module:
    """The module at a dotted path. For a pipeline the first component names a pipeline component
    (`unet.up_blocks.1.attentions.1`); for a plain module the path is relative to it. Integer
    components index ModuleLists."""
    if isinstance(pipe_or_root, nn.Module):
        components, component, rest = {"": pipe_or_root}, "", path
    else:
        components = {name: module for name, module in pipe_or_root.components.items() if isinstance(module, nn.Module)}
        component, _, rest = path.partition(".")
    try:
        return components[component].get_submodule(rest)
    except (KeyError, AttributeError):
        candidates = [
            f"{prefix}.{name}" if prefix and name else prefix or name
            for prefix, module in components.items()
            for name, _ in module.named_modules()
        ]
        closest = difflib.get_close_matches(path, candidates, n=5, cutoff=0.6)
        hint = f"closest valid paths: {closest}" if closest else f"paths start with one of {sorted(components)}"
        raise ValueError(f"Hookpoint {path!r} does not exist; {hint}.") from None


class StepIndex:
    """The sampling step of a UNet timestep: its position in `scheduler.timesteps`.

    The timestep list is read to the host once per generation (`set_timesteps` makes a new tensor), so a UNet
    call costs one host read, of its own timestep argument.
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler, self._timesteps = scheduler, None  # `_timesteps`: the list `_steps` was read from
        self._steps: dict[float, int | None] = {}  # timestep value → step; None where the list repeats it

    def __call__(self, timestep: Tensor | float) -> int:
        timesteps: Tensor | None = getattr(self.scheduler, "timesteps", None)
        name = type(self.scheduler).__name__
        if timesteps is None:
            raise ValueError(f"{name} has no timesteps yet; set_timesteps must run before a timestep maps to a step.")
        if timesteps is not self._timesteps:
            self._timesteps, self._steps = timesteps, {}
            for position, value in enumerate(timesteps.tolist()):
                self._steps[value] = None if value in self._steps else position
        # Some pipelines broadcast t to [B]; one read of all its values is the call's only host sync.
        values = timestep.reshape(-1).tolist() if isinstance(timestep, Tensor) else [timestep]
        if len(set(values)) != 1:
            raise ValueError(f"The UNet received differing timesteps {values}; one step has one timestep.")
        if values[0] not in self._steps:
            raise ValueError(f"Timestep {values[0]} is not among the {len(timesteps)} timesteps of {name} "
                             f"({timesteps[0]}..{timesteps[-1]}); the UNet was called outside its sampling loop.")
        step = self._steps[values[0]]
        if step is None:
            raise ValueError(f"{name} repeats timestep {values[0]}, so its step index is ambiguous; use a scheduler "
                             "with one UNet call per step such as DDIM.")
        return step


def _block_hidden(output: Any) -> Tensor:
    """The `[B, C, H, W]` map inside a block's output (a tensor, a tuple led by it, or a diffusers output)."""
    if isinstance(output, tuple):  # CrossAttn*Block2D calls its transformers with return_dict=False
        output = output[0]
    elif isinstance(output, BaseOutput):
        output = output.sample
    if not isinstance(output, Tensor) or output.ndim != 4:
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise ValueError(f"The hooked block returned {shape}; expected a block output [B, C, H, W].")
    return output


def _with_hidden(output: Any, hidden: Tensor) -> Any:
    """`output` with its `[B, C, H, W]` map swapped for `hidden`, in the same container type."""
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, BaseOutput):
        return dataclasses.replace(output, sample=hidden)
    return hidden


@contextmanager
def hook_block(pipe: DiffusionPipeline, hookpoint: str, on_output: OutputCallback) -> Iterator[nn.Module]:
    """Call `on_output(hidden, context)` on every output of the block at `hookpoint` while the context
    is open; a tensor it returns replaces the output. Yields the hooked block."""
    block = resolve_hookpoint(pipe, hookpoint)
    unet: nn.Module | None = getattr(pipe, "unet", None)
    if unet is None or not hasattr(type(pipe), "do_classifier_free_guidance"):
        raise ValueError(f"{type(pipe).__name__} is not a UNet pipeline with guidance; expected SD or SDXL.")
    if not any(module is block for module in unet.modules()):
        raise ValueError(f"Hookpoint {hookpoint!r} is not inside the UNet; expected a path starting with 'unet.'.")
    current: list[HookContext] = []  # the context of the UNet call in progress (set by the pre-hook)
    step_index = StepIndex(pipe.scheduler)

    def read_timestep(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]  # unet(sample, timestep, ...)
        context = HookContext(
            hookpoint=hookpoint,
            step=step_index(timestep),
            num_steps=len(pipe.scheduler.timesteps),
            timestep=timestep,
            do_cfg=bool(pipe.do_classifier_free_guidance),
        )
        current[:] = [context]

    def on_block_output(_: nn.Module, __: tuple[Any, ...], output: Any) -> Any:
        hidden = _block_hidden(output)
        replacement = on_output(hidden, current[0])
        if replacement is None:
            return None
        if not isinstance(replacement, Tensor) or replacement.shape != hidden.shape:
            got = tuple(replacement.shape) if isinstance(replacement, Tensor) else type(replacement).__name__
            expected = tuple(hidden.shape)
            raise ValueError(f"The callback on {hookpoint} returned {got}; expected None or a tensor {expected}.")
        return _with_hidden(output, replacement)

    handles = [
        unet.register_forward_pre_hook(read_timestep, with_kwargs=True),
        block.register_forward_hook(on_block_output),
    ]
    try:
        yield block
    finally:
        for handle in handles:
            handle.remove()


class ActivationCapture:
    """An `on_output` callback that keeps the block output as tokens `[B, H·W, C]` per sampling step.

    Keeps the steps in `steps` (all when None) that are multiples of `every`, for the requested CFG
    half. Tokens are detached and moved to `device`/`dtype`; when both already match nothing is copied,
    and the stored tensor is a view of the block output (which diffusers never modifies in place).
    Use one capture per generation: a step seen twice is an error, not an overwrite.
    """

    def __init__(
        self,
        halves: Halves = "cond",
        steps: Collection[int] | None = None,
        every: int = 1,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        if halves not in HALVES:
            raise ValueError(f"halves={halves!r} is not supported; expected one of {HALVES}.")
        if every < 1:
            raise ValueError(f"every={every} must be a positive step interval.")
        self.halves = halves
        self.steps = None if steps is None else frozenset(steps)
        self.every = every
        self.device = torch.device(device)
        self.dtype = dtype
        self.tokens: dict[int, Tensor] = {}
        """Captured tokens per sampling step, each `[B, H·W, C]`."""

    def keeps(self, step: int) -> bool:
        """Whether `step` is one of the steps this capture stores."""
        return step % self.every == 0 and (self.steps is None or step in self.steps)

    def __call__(self, hidden: Tensor, context: HookContext) -> None:
        if not self.keeps(context.step):
            return None
        if context.step in self.tokens:
            raise RuntimeError(f"Step {context.step} was already captured; use a new ActivationCapture per generation.")
        half = context.select(hidden.detach(), self.halves)  # [B, C, H, W]
        tokens = half.flatten(2).transpose(1, 2)  # [B, H*W, C]
        # Cast before moving: a float16 copy crosses to the host at half the bytes.
        self.tokens[context.step] = tokens.to(dtype=self.dtype or tokens.dtype).to(self.device)
        return None

    def stack(self) -> Tensor:
        """All captured steps in sampling order, `[B, S, H·W, C]` (S = number of captured steps)."""
        if not self.tokens:
            raise RuntimeError("Nothing was captured; run a generation inside hook_block first.")
        return torch.stack([self.tokens[step] for step in sorted(self.tokens)], dim=1)  # [B, S, H*W, C]


class BlockEraser(Protocol):
    """What `erase` needs of an eraser (`saemnesia.unlearning.ConceptEraser`)."""

    @property
    def num_steps(self) -> int: ...

    def apply(self, hidden: Tensor, step: int) -> Tensor: ...


@contextmanager
def erase(pipe: DiffusionPipeline, eraser: BlockEraser, hookpoint: str = PUBLISHED_HOOKPOINT) -> Iterator[nn.Module]:
    """Erase with `eraser` while the context is open: every UNet call of `pipe` (any SD 1.x/2.x or SDXL pipeline as
    diffusers loads it) has the output of the block at `hookpoint` rewritten, in both CFG halves, at the sampling
    step the scheduler's timestep names. A generation with another number of steps than the eraser's statistics
    fails at its first UNet call. The hooks are removed on exit, also when the generation raises. Yields the block.

        with saemnesia.erase(pipe, eraser):
            image = pipe("An image of Dogs in Monet style.", num_inference_steps=eraser.num_steps).images[0]
    """
    def on_output(hidden: Tensor, context: HookContext) -> Tensor:
        if context.num_steps != eraser.num_steps:
            raise ValueError(f"The pipeline samples {context.num_steps} steps but the eraser's statistics have "
                             f"{eraser.num_steps}; call it with num_inference_steps={eraser.num_steps}.")
        return eraser.apply(hidden, context.step)

    with hook_block(pipe, hookpoint, on_output) as block:
        yield block


@contextmanager
def capture(pipe: DiffusionPipeline, hookpoint: str = PUBLISHED_HOOKPOINT, halves: Halves = "cond",
            steps: Collection[int] | None = None, every: int = 1, dtype: torch.dtype | None = None
            ) -> Iterator[ActivationCapture]:
    """Keep the block output at `hookpoint` of one generation of `pipe` as tokens, per sampling step (the CFG half
    `halves`, the `steps` that are multiples of `every`, on the CPU, in `dtype` or the block's own); yields the
    `ActivationCapture`, whose `stack()` is `[B, S, H·W, C]` once the generation ran.

        with saemnesia.capture(pipe) as activations:
            pipe("An image of Dogs.", num_inference_steps=50)
        tokens = activations.stack()
    """
    activations = ActivationCapture(halves=halves, steps=steps, every=every, device="cpu", dtype=dtype)
    with hook_block(pipe, hookpoint, activations):
        yield activations
