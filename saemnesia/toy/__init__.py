"""ToyCanvas: a miniature UnlearnCanvas (8 shapes × 8 styles + plain, 32 px) on which the whole method runs on
a CPU in minutes. The trained pipeline and classifiers ship under `assets/`; `make toy-assets` retrains them
from `configs/toy/toy_{classifiers,vae,model}.yaml`."""

from pathlib import Path

from saemnesia.toy.vocabulary import PLAIN_LABEL, TOY_OBJECTS, TOY_STYLES, TOY_VOCABULARY, toy_prompt

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TOY_PIPELINE_DIR = ASSETS_DIR / "pipeline"
"""The shipped text-to-image model: a diffusers `StableDiffusionPipeline` folder for `load_pipeline`."""
TOY_CLASSIFIERS_DIR = ASSETS_DIR / "classifiers"
"""The shipped classifiers: `object/` and `style/` folders for `saemnesia.classifiers.load_classifier`."""

__all__ = ["ASSETS_DIR", "PLAIN_LABEL", "TOY_CLASSIFIERS_DIR", "TOY_OBJECTS", "TOY_PIPELINE_DIR", "TOY_STYLES",
           "TOY_VOCABULARY", "toy_prompt"]
