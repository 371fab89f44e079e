"""The workflow through the CLI on a tiny random SDXL pipeline (two text encoders, size/crop time embeddings):
caching, both fits, the statistics and an unlearning run, with the toy configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import QUIET, TINY_PIPELINE
from PIL import Image

from cli import main
from saemnesia.class_params import save_class_params
from saemnesia.pipelines import TinyPipelineConfig, save_tiny_pipeline
from saemnesia.sae import SparseAutoencoder

REPO = Path(__file__).resolve().parents[1]
HOOKPOINT = "unet.up_blocks.1.attentions.1"
# 2 objects × (Pop_Art + plain) × 2 seeds, 3 steps, 64 px.
SMALL = ["--data.init_args.objects=[Circle, Square]", "--data.init_args.styles=[Pop_Art]",
         "--data.init_args.seeds=[0, 1]", "--model.init_args.num_steps=3", "--data.init_args.batch_size=4",
         *TINY_PIPELINE, *QUIET]


def config(name: str) -> str:
    return str(REPO / "configs/toy" / f"{name}.yaml")


@pytest.fixture
def sdxl_cwd(tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores are shared; one thread per process is fastest here
    monkeypatch.chdir(tmp_path)
    save_tiny_pipeline(tmp_path / "runs/toy/pipeline", TinyPipelineConfig(sdxl=True))
    yield tmp_path
    torch.set_num_threads(threads)


def test_cache_fit_statistics_and_unlearning_run_on_an_sdxl_pipeline(sdxl_cwd):
    main(["predict", "-c", config("cache"), *SMALL, "--trainer.callbacks.max_samples=12"])
    main(["fit", "-c", config("sae"), "--trainer.fast_dev_run=2", *QUIET])
    main(["fit", "-c", config("sae_supervised"), "--trainer.fast_dev_run=2", *QUIET])
    sae = SparseAutoencoder.load("runs/toy/sae_supervised", HOOKPOINT)
    assert (sae.d_in, sae.num_latents) == (64, 1024)
    main(["predict", "-c", config("stats"), *SMALL, "--data.init_args.styles=[]"])
    save_class_params("runs/toy/class_params.json",
                      {name: {"percentile": 99.0, "multiplier": -10.0} for name in ("Circle", "Square")})
    main(["predict", "-c", config("unlearn"), *SMALL, "--data.init_args.targets=[Circle, none]",
          "--model.init_args.erasure.start_step=0"])
    images = Path("runs/toy/unlearn/images")
    records = [json.loads(line) for line in (images / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 2 * 2 * 2  # targets × objects × (style + plain) × seeds
    for record in (record for record in records if record["target"] == "Circle"):
        erased = np.asarray(Image.open(images / record["file"]), dtype=np.int16)
        kept = np.asarray(Image.open(images / record["file"].replace("Circle/", "none/", 1)), dtype=np.int16)
        assert np.abs(erased - kept).mean() > 1.0, record["file"]  # a random SAE's erasure changes every image
