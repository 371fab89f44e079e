"""SAEmnesia: concept erasure in text-to-image diffusion models with supervised sparse autoencoders.

The library door, importable without Lightning (each name is loaded on first use):

    import saemnesia
    eraser = saemnesia.ConceptEraser.from_files(sae="runs/toy/sae_supervised",
                                                stats="runs/toy/stats/concept_stats.safetensors",
                                                params={"Circle": {"percentile": 99.999, "multiplier": -10}})
    with saemnesia.erase(pipe, eraser, hookpoint="unet.up_blocks.1.attentions.1"):
        image = pipe("An image of Circle in Neon style.", num_inference_steps=20).images[0]
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

PUBLIC = {
    "ConceptEraser": "saemnesia.unlearning",
    "ConceptStats": "saemnesia.stats",
    "SparseAutoencoder": "saemnesia.sae",
    "capture": "saemnesia.hooks",
    "erase": "saemnesia.hooks",
    "load_pipeline": "saemnesia.pipelines",
}
"""Public name → the module defining it."""
__all__ = sorted(PUBLIC)


def __getattr__(name: str) -> Any:
    # Lazy (PEP 562): `import saemnesia` stays cheap, and torch and diffusers load with the first name used.
    if name not in PUBLIC:
        raise AttributeError(f"module 'saemnesia' has no attribute {name!r}")
    return getattr(import_module(PUBLIC[name]), name)
