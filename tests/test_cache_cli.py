"""Activation caching through the CLI (`predict -c configs/toy/cache.yaml`): shards read by `fit`, the same samples
from 1 and 2 DDP processes, and an interrupted run resumed without duplicates or gaps."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from helpers import QUIET, TINY_PIPELINE

from cli import main
from datamodules.prompts import PromptDataModule
from saemnesia.concepts import UNLEARNCANVAS_OBJECTS, UNLEARNCANVAS_STYLES, ConceptVocabulary
from saemnesia.generation import CaptureConfig, HookedDiffusion, PromptItem
from saemnesia.sae import SparseAutoencoder
from saemnesia.shards import ShardManifest, sample_key

REPO = Path(__file__).resolve().parents[1]
CACHE_CONFIG = str(REPO / "configs/toy/cache.yaml")
HOOKPOINT = "unet.up_blocks.1.attentions.1"
# 32 prompts × 3 steps = 96 samples in shards closed after 16 samples (at the next prompt: 18 samples each).
OBJECTS, STYLES = ("Circle", "Square", "Triangle", "Star"), ("Pop_Art", "Blueprint", "Sunset")
SMALL = ["--model.init_args.num_steps=3", "--data.init_args.seeds=[0, 1]", "--trainer.callbacks.max_samples=16",
         f"--data.init_args.objects=[{', '.join(OBJECTS)}]", f"--data.init_args.styles=[{', '.join(STYLES)}]",
         "--data.init_args.batch_size=8", *TINY_PIPELINE, *QUIET]
EXPECTED_KEYS = {sample_key(f"{obj}-{style or 'plain'}-000-s{seed}", step)
                 for obj in OBJECTS for style in (*STYLES, None) for seed in (0, 1) for step in range(3)}


@pytest.fixture
def toy_cwd(tmp_path, monkeypatch, tiny_pipeline_dir):
    """A working directory whose runs/toy/pipeline is the tiny test pipeline (what the toy config would build)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores are shared; one thread per process is fastest here
    monkeypatch.chdir(tmp_path)
    link_pipeline(tmp_path, tiny_pipeline_dir)
    yield tmp_path
    torch.set_num_threads(threads)


def link_pipeline(workdir: Path, pipeline: Path) -> None:
    (workdir / "runs/toy").mkdir(parents=True, exist_ok=True)
    (workdir / "runs/toy/pipeline").symlink_to(pipeline)


def predict(*args: str) -> None:
    main(["predict", "-c", CACHE_CONFIG, *args])


def read_samples(folder: Path) -> tuple[list[str], dict[str, tuple[np.ndarray, dict]]]:
    """All sample keys of the complete shards in `folder` (repeats kept) and the samples by key."""
    urls = [str(path) for path in sorted(folder.glob("*.tar"))]
    keys, samples = [], {}
    for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(), wds.decode()):
        keys.append(sample["__key__"])
        samples[sample["__key__"]] = (sample["act.npy"], sample["json"])
    return keys, samples


def check_folder(folder: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """Every expected sample exactly once, no temporary file, and a manifest listing every shard."""
    keys, samples = read_samples(folder)
    assert len(keys) == len(set(keys)) and set(keys) == EXPECTED_KEYS
    assert not list(folder.glob("*.tmp"))
    manifest = ShardManifest.load(folder)
    assert [record.name for record in manifest.shards] == sorted(path.name for path in folder.glob("*.tar"))
    assert manifest.num_samples == len(EXPECTED_KEYS)
    assert (manifest.hookpoint, manifest.d_in, manifest.tokens_per_sample, manifest.num_steps) == (HOOKPOINT, 64, 16, 3)
    assert manifest.concepts == ConceptVocabulary(objects=OBJECTS, styles=STYLES)
    return samples


def test_cached_shards_feed_sae_training(toy_cwd):
    predict(*SMALL)
    samples = check_folder(toy_cwd / "runs/toy/activations")
    act, meta = samples[sample_key("Star-Blueprint-000-s1", 2)]
    assert meta == {"object": "Star", "style": "Blueprint", "step": 2, "timestep": meta["timestep"],
                    "prompt_id": "Star-Blueprint-000-s1", "prompt": "An image of Star in Blueprint style.", "seed": 1,
                    "hookpoint": HOOKPOINT, "half": "cond"}
    assert samples[sample_key("Star-plain-000-s1", 0)][1]["style"] is None
    # The stored map is what the module generates for that prompt alone.
    module = HookedDiffusion("runs/toy/pipeline", hookpoint=HOOKPOINT, num_steps=3, height=64, width=64,
                             guidance_scale=7.5, capture=CaptureConfig(halves="cond"))
    module.setup("predict")
    direct = module.generate([PromptItem("Star-Blueprint-000-s1", meta["prompt"], "Star", "Blueprint", 1)])
    assert meta["timestep"] == direct.timesteps[2]
    torch.testing.assert_close(torch.from_numpy(act), direct.activations[0, 2])

    main(["fit", "-c", str(REPO / "configs/toy/sae.yaml"), "--trainer.fast_dev_run=2", *QUIET])
    sae = SparseAutoencoder.load(toy_cwd / "runs/toy/sae", HOOKPOINT)
    assert sae.d_in == 64 and sae.num_latents == 64 * 16


def test_one_and_two_ddp_processes_write_the_same_samples(toy_cwd, tiny_pipeline_dir):
    predict(*SMALL)
    single = check_folder(toy_cwd / "runs/toy/activations")

    workdir = toy_cwd / "ddp"
    link_pipeline(workdir, tiny_pipeline_dir)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "cli.py"), "predict", "-c", CACHE_CONFIG, *SMALL,
                             "--trainer.devices=2", "--trainer.strategy=ddp"],
                            cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = workdir / "runs/toy/activations"
    double = check_folder(folder)
    assert {path.name.split("-")[1] for path in folder.glob("*.tar")} == {"r0", "r1"}  # both ranks wrote shards
    for key, (act, meta) in single.items():
        assert double[key][1] == meta, key
        # Ranks batch other prompts together, which may round float32 kernels differently before the float16 cast.
        torch.testing.assert_close(torch.from_numpy(double[key][0]), torch.from_numpy(act), msg=key)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_interrupted_run_resumes_without_duplicates_or_gaps(toy_cwd):
    folder = toy_cwd / "runs/toy/activations"
    with pytest.raises(RuntimeError, match="Simulated crash after 2 predict batches"):
        predict(*SMALL, "--trainer.callbacks+=cli_probes.FailAfterPredictBatches", "--trainer.callbacks.batches=2")
    # Two batches (48 samples): two complete shards of 18, and the third one unfinished under its temporary name.
    complete = {path.name: digest(path) for path in folder.glob("*.tar")}
    assert sorted(complete) == ["shard-r0-000000.tar", "shard-r0-000001.tar"]
    assert [path.name for path in folder.glob("*.tmp")] == ["shard-r0-000002.tar.tmp"]
    assert not (folder / "manifest.json").exists()

    predict(*SMALL)  # the same command again
    check_folder(folder)
    assert {name: digest(folder / name) for name in complete} == complete  # stored prompts were not redone

    with pytest.raises(ValueError, match=r"describes activations with other \['num_steps'\] than this run's"):
        predict(*SMALL, "--model.init_args.num_steps=4")
    with pytest.raises(ValueError, match=r"^ActivationShardWriter max_samples and max_bytes \(trainer.callbacks\) must "
                                         r"be >= 1, got 0 and"):
        predict(*SMALL, "--trainer.callbacks.max_samples=0")


def test_published_cache_config_prompts_80_anchors_per_class_times_51_styles_and_plain(tmp_path, capsys):
    config_path = REPO / "configs/sd15_unlearncanvas/cache.yaml"
    with pytest.raises(SystemExit):  # the whole config parses (types, class paths)
        main(["predict", "-c", str(config_path), "--print_config"])
    printed = capsys.readouterr().out
    assert all(line in printed for line in ("num_steps: 50", "guidance_scale: 9.0", "halves: cond", "height: 512"))

    init_args = yaml.safe_load(config_path.read_text())["data"]["init_args"]
    anchors = tmp_path / "anchors"
    anchors.mkdir()
    for obj in UNLEARNCANVAS_OBJECTS:
        (anchors / f"sd_prompt_{obj}.txt").write_text("".join(f"{obj} anchor {i}.\n" for i in range(80)))
    data = PromptDataModule(**{**init_args, "anchor_prompts": str(anchors)})
    rust = UNLEARNCANVAS_STYLES.index("Rust")
    assert data.vocabulary.styles == (*UNLEARNCANVAS_STYLES[:rust + 1], "Seed_Images", *UNLEARNCANVAS_STYLES[rust + 1:])
    assert data.vocabulary.objects == tuple(UNLEARNCANVAS_OBJECTS)
    assert len(data.items) == 80 * (51 + 1) * 20 == 83_200  # docs/method.md §8
