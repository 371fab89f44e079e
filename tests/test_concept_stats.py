"""Concept statistics through the CLI (`predict -c configs/toy/stats.yaml`): the streamed per-concept means equal the
means over all images computed naively from the captured activations, for both `object_prompts` options."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import QUIET, TINY_PIPELINE

from cli import main
from datamodules.prompts import PromptDataModule
from saemnesia.concepts import ConceptVocabulary
from saemnesia.generation import CaptureConfig, HookedDiffusion
from saemnesia.sae import SaeConfig, SparseAutoencoder
from saemnesia.stats import ConceptStats

REPO = Path(__file__).resolve().parents[1]
HOOKPOINT = "unet.up_blocks.1.attentions.1"
VOCABULARY = ConceptVocabulary(objects=("Circle", "Square", "Triangle", "Star"), styles=("Pop_Art", "Blueprint"))
# 2 objects × (Pop_Art + plain) × 2 seeds = 8 images in one batch, 3 steps.
SMALL = ["--model.init_args.num_steps=3", "--data.init_args.objects=[Circle, Square]",
         "--data.init_args.styles=[Pop_Art]", "--data.init_args.seeds=[0, 1]",
         "--data.init_args.batch_size=8", *TINY_PIPELINE, *QUIET]
OUTPUT = "runs/toy/stats/concept_stats.safetensors"


@pytest.fixture
def toy_cwd(tmp_path, monkeypatch, tiny_pipeline_dir):
    """A working directory with the tiny test pipeline at runs/toy/pipeline and a random SAE at
    runs/toy/sae_supervised/<hookpoint> (what configs/toy/stats.yaml reads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores are shared; one thread per process is fastest here
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs/toy").mkdir(parents=True)
    (tmp_path / "runs/toy/pipeline").symlink_to(tiny_pipeline_dir)
    save_sae(tmp_path / "runs/toy/sae_supervised" / HOOKPOINT, d_in=64)
    yield tmp_path
    torch.set_num_threads(threads)


def save_sae(folder: Path, d_in: int) -> SparseAutoencoder:
    torch.manual_seed(0)
    sae = SparseAutoencoder(d_in, SaeConfig(num_latents=256, k=8))
    sae.save(folder)
    return sae


def naive_means(object_prompts: str) -> dict[str, torch.Tensor]:
    """Per-concept means `[T, L]` (float64): capture every image's maps, encode each token with a dense TopK code,
    average over tokens, then over the concept's images."""
    items = PromptDataModule(VOCABULARY, objects=["Circle", "Square"], styles=["Pop_Art"], seeds=(0, 1)).items
    module = HookedDiffusion("runs/toy/pipeline", hookpoint=HOOKPOINT, num_steps=3, height=64, width=64,
                             guidance_scale=7.5, capture=CaptureConfig(halves="cond"))
    module.setup("predict")
    activations = module.generate(items).activations.double()  # [8, 3, 16, 64], one batch as in the run
    sae = SparseAutoencoder.load("runs/toy/sae_supervised", HOOKPOINT, dtype=torch.float64)
    codes = torch.zeros(len(items), 3, sae.num_latents, dtype=torch.float64)  # [images, T, L]
    for image, maps in enumerate(activations):
        for step, tokens in enumerate(maps):  # tokens: [N, C]
            values, indices = sae.pre_acts(tokens).topk(sae.cfg.k, dim=-1)
            dense = torch.zeros(tokens.shape[0], sae.num_latents, dtype=torch.float64).scatter(1, indices, values)
            codes[image, step] = dense.mean(dim=0)
    members = {"Circle": [], "Square": [], "Pop_Art": []}
    for image, item in enumerate(items):
        if item.style is None or object_prompts == "all":
            members[item.object].append(image)
        if item.style is not None:
            members[item.style].append(image)
    return {concept: codes[rows].mean(dim=0) for concept, rows in members.items()}


@pytest.mark.filterwarnings("ignore:Image counts differ between concepts")  # the pickle export's caveat
@pytest.mark.parametrize("object_prompts, images_per_object", [("plain", 2), ("all", 4)])
def test_streamed_statistics_equal_the_mean_over_all_images(toy_cwd, object_prompts, images_per_object):
    main(["predict", "-c", str(REPO / "configs/toy/stats.yaml"), *SMALL,
          f"--trainer.callbacks.object_prompts={object_prompts}", "--trainer.callbacks.reference_pickle=ref.pkl"])
    stats = ConceptStats.load(OUTPUT)
    assert stats.concepts == ["Circle", "Square", "Pop_Art"]  # objects first, only concepts with images
    assert stats.counts.tolist() == [images_per_object, images_per_object, 4]
    assert stats.metadata["hookpoint"] == HOOKPOINT and stats.metadata["object_prompts"] == object_prompts
    expected = naive_means(object_prompts)
    for row, concept in enumerate(stats.concepts):
        torch.testing.assert_close(stats.means[row].double(), expected[concept], rtol=1e-5, atol=1e-7)
    reference = ConceptStats.from_reference("ref.pkl")  # the published format: float16 means, one "image" each
    torch.testing.assert_close(reference.means, stats.means, rtol=1e-3, atol=1e-4)


def test_bad_input_fails_with_one_sentence(toy_cwd):
    save_sae(toy_cwd / "sae32" / HOOKPOINT, d_in=32)
    with pytest.raises(ValueError, match=f"Hookpoint {HOOKPOINT} outputs 64 channels but the SAE sae32 has d_in=32; "
                                         "use the SAE trained at this hookpoint."):
        main(["predict", "-c", str(REPO / "configs/toy/stats.yaml"), *SMALL, "--trainer.callbacks.sae=sae32"])
    with pytest.raises(ValueError, match='ConceptStatsCallback needs a HookedDiffusion model with model.capture: '
                                         '{"halves": "cond", "every": 1, "steps": null}.'):
        main(["predict", "-c", str(REPO / "configs/toy/stats.yaml"), *SMALL, "--model.init_args.capture.every=2"])
    with pytest.raises(ValueError, match="ConceptStatsCallback describes generation without erasure"):
        main(["predict", "-c", str(REPO / "configs/toy/stats.yaml"), *SMALL, "--data.init_args.targets=[Circle]"])
    assert not Path(OUTPUT).exists()
