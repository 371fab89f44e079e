"""Shared test fixtures that build small on-disk artefacts."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from saemnesia.concepts import ConceptVocabulary
from saemnesia.shards import ShardManifest, ShardSink, sample_key

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
"""CLI overrides that keep test output short."""
TINY_PIPELINE = ["--model.init_args.pipeline=runs/toy/pipeline", "--model.init_args.height=64",
                 "--model.init_args.width=64"]
"""CLI overrides running a toy generation config on the tiny test pipeline linked at `runs/toy/pipeline` (64 px,
so that its hookpoint has 4×4 tokens like the shipped ToyCanvas model's at 32 px)."""
TOY_VOCABULARY = ConceptVocabulary(objects=("Bears", "Cats", "Dogs"), styles=("Cubism", "Monet"))


class SyntheticSample(NamedTuple):
    """What a synthetic shard folder stores for one sample key."""

    act: np.ndarray
    """float16 activations `[tokens_per_sample, d_in]`, exactly as written."""
    meta: dict
    """The sample's `json` metadata."""


def write_synthetic_shards(folder: str | Path, *, num_prompts: int = 12, num_steps: int = 3, tokens_per_sample: int = 4,
                           d_in: int = 8, samples_per_shard: int = 9, ranks: int = 1,
                           vocabulary: ConceptVocabulary = TOY_VOCABULARY, hookpoint: str = "unet.mid_block",
                           seed: int = 0) -> dict[str, SyntheticSample]:
    """Write a shard folder (shards + merged `manifest.json`) of random activations; return its samples by key.

    Prompt `p` is written by rank `p % ranks` (prefix `shard-r{rank}`), for every step `0..num_steps-1`, with object
    `objects[p % #objects]` and style `[*styles, None][(p // #objects) % (#styles + 1)]` (None = plain). Each shard
    holds about `samples_per_shard` samples (the sink closes shards only between prompts).
    """
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    styles = [*vocabulary.styles, None]
    samples: dict[str, SyntheticSample] = {}
    manifests = []
    for rank in range(ranks):
        with ShardSink(folder, f"shard-r{rank}", tokens_per_sample, d_in, max_samples=samples_per_shard,
                       vocabulary=vocabulary) as sink:
            for prompt_id in range(rank, num_prompts, ranks):
                obj = vocabulary.objects[prompt_id % len(vocabulary.objects)]
                style = styles[(prompt_id // len(vocabulary.objects)) % len(styles)]
                for step in range(num_steps):
                    key = sample_key(prompt_id, step)
                    act = rng.normal(size=(tokens_per_sample, d_in)).astype(np.float16)
                    meta = {"object": obj, "style": style, "step": step, "timestep": 999 - 333 * step,
                            "prompt_id": prompt_id, "prompt": f"An image of {obj}.", "seed": 188,
                            "hookpoint": hookpoint, "half": "cond"}
                    sink.write(key, act, meta)
                    samples[key] = SyntheticSample(act, meta)
        manifests.append(ShardManifest(hookpoint=hookpoint, d_in=d_in, tokens_per_sample=tokens_per_sample,
                                       num_steps=num_steps, concepts=vocabulary, shards=sink.close()))
    ShardManifest.merge(manifests).save(folder)
    return samples
