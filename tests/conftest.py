"""Session-wide fixtures: one tiny Stable Diffusion folder, saved once and loaded once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffusers import StableDiffusionPipeline

from saemnesia.pipelines import load_pipeline, save_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `TinyPipelineConfig()` pipeline saved with `save_pretrained` (safetensors). Treat as read-only."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("pipelines") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_pipeline_dir: Path) -> StableDiffusionPipeline:
    """The tiny pipeline loaded through `load_pipeline` (DDIM, float32, CPU). Do not leave hooks on it."""
    return load_pipeline(tiny_pipeline_dir)
