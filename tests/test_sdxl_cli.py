"""The SDXL configs (configs/sdxl/) through the CLI on a tiny random SDXL pipeline (two text encoders, size/crop time
embeddings): caching, both fits, the statistics and an unlearning run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import QUIET
from PIL import Image

from cli import main
from saemnesia.class_params import save_class_params
from saemnesia.pipelines import TinyPipelineConfig, save_tiny_pipeline
from saemnesia.sae import SparseAutoencoder

REPO = Path(__file__).resolve().parents[1]
HOOKPOINT = "unet.up_blocks.1.attentions.1"  # the tiny layout has no attentions in up_blocks.0, SDXL's hookpoint
ON_THE_TINY_PIPELINE = ["--trainer.accelerator=cpu", "--model.init_args.pipeline=runs/sdxl/pipeline",
                        "--model.init_args.dtype=float32", f"--model.init_args.hookpoint={HOOKPOINT}",
                        "--model.init_args.height=64", "--model.init_args.width=64", "--model.init_args.num_steps=3",
                        "--data.init_args.objects=[Bears, Cats]", "--data.init_args.seeds=[0, 1]",
                        "--data.init_args.batch_size=4", *QUIET]
"""A predict config of configs/sdxl/ run on the tiny SDXL pipeline: 2 objects, 2 seeds, 3 steps, 64 px, CPU."""
FIT_ON_CPU = ["--trainer.accelerator=cpu", "--trainer.precision=32", "--trainer.fast_dev_run=2",
              "--data.init_args.num_workers=0", "--data.init_args.shuffle_buffer=256", *QUIET]


def config(name: str) -> str:
    return str(REPO / "configs/sdxl" / f"{name}.yaml")


@pytest.fixture
def sdxl_cwd(tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores are shared; one thread per process is fastest here
    monkeypatch.chdir(tmp_path)
    save_tiny_pipeline(tmp_path / "runs/sdxl/pipeline", TinyPipelineConfig(sdxl=True))
    yield tmp_path
    torch.set_num_threads(threads)


def test_the_sdxl_configs_cache_fit_compute_statistics_and_unlearn(sdxl_cwd):
    main(["predict", "-c", config("cache"), *ON_THE_TINY_PIPELINE, "--data.init_args.styles=[Cubism]",
          "--trainer.callbacks.max_samples=4"])  # 8 prompts × steps 0 and 2: 4 shards, one held out
    main(["fit", "-c", config("sae"), *FIT_ON_CPU])
    main(["fit", "-c", config("sae_supervised"), *FIT_ON_CPU])
    sae = SparseAutoencoder.load("runs/sdxl/sae_supervised", HOOKPOINT)
    assert (sae.d_in, sae.num_latents) == (64, 1024)
    main(["predict", "-c", config("stats"), *ON_THE_TINY_PIPELINE])
    save_class_params("runs/sdxl/class_params.json",
                      {name: {"percentile": 99.0, "multiplier": -10.0} for name in ("Bears", "Cats")})
    main(["predict", "-c", config("unlearn"), *ON_THE_TINY_PIPELINE, "--data.init_args.styles=[Cubism]",
          "--data.init_args.targets=[Bears, none]"])
    images = Path("runs/sdxl/unlearn/images")
    records = [json.loads(line) for line in (images / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 2 * 2 * 2  # targets × objects × (style + plain) × seeds
    for record in (record for record in records if record["target"] == "Bears"):
        erased = np.asarray(Image.open(images / record["file"]), dtype=np.int16)
        kept = np.asarray(Image.open(images / record["file"].replace("Bears/", "none/", 1)), dtype=np.int16)
        assert np.abs(erased - kept).mean() > 1.0, record["file"]  # a random SAE's erasure changes every image
