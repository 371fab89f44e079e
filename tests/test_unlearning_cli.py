"""Unlearning generation through the CLI (`predict -c configs/toy/unlearn.yaml`): the image layout and manifest, erasure
per target with `none` generated unhooked, the same images from 1 and 2 DDP processes, an interrupted run resumed,
the UnlearnCanvas prompt sets, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import QUIET, TINY_PIPELINE
from PIL import Image

import saemnesia
from callbacks.image_writer import image_file, jpeg_bytes
from cli import main
from datamodules.prompts import PromptDataModule
from saemnesia.class_params import Candidate, save_class_params
from saemnesia.concepts import UNLEARNCANVAS_OBJECTS, UNLEARNCANVAS_STYLES, ConceptVocabulary
from saemnesia.erasure import ErasureBuilder, ErasureConfig
from saemnesia.generation import CaptureConfig, HookedDiffusion, image_seed
from saemnesia.hooks import resolve_hookpoint
from saemnesia.sae import SaeConfig, SparseAutoencoder
from saemnesia.stats import ConceptStats

REPO = Path(__file__).resolve().parents[1]
HOOKPOINT = "unet.up_blocks.1.attentions.1"
# 2 objects × (Pop_Art + plain) × 1 seed = 4 prompts per target, 3 steps, 64 px.
SMALL_DATA = ["--data.init_args.objects=[Circle, Square]", "--data.init_args.styles=[Pop_Art]",
              "--data.init_args.seeds=[0]", "--model.init_args.num_steps=3", "--data.init_args.batch_size=8",
              *TINY_PIPELINE]
STATS = "runs/toy/stats/concept_stats.safetensors"  # where the toy configs read the statistics
# Erasing from the first of the 3 steps: the config's start step (4) lies beyond these short runs.
UNLEARN = ["predict", "-c", str(REPO / "configs/toy/unlearn.yaml"), *SMALL_DATA, *QUIET,
           "--data.init_args.targets=[Circle, Square, none]", "--model.init_args.erasure.start_step=0"]
IMAGES = Path("runs/toy/unlearn/images")
SEARCH = ["predict", "-c", str(REPO / "configs/toy/sweep.yaml"), *SMALL_DATA, *QUIET,
          "--data.init_args.targets=[Circle, Square]", "--model.init_args.erasure.start_step=0"]
TOY_VOCABULARY = ConceptVocabulary(objects=("Circle", "Square", "Triangle", "Star"), styles=("Pop_Art", "Blueprint"))
PROMPTS = {(obj, style): f"An image of {obj} in Pop Art style." if style else f"An image of {obj}."
           for obj in ("Circle", "Square") for style in ("Pop_Art", None)}
EXPECTED_FILES = {f"{target}/{style + '_' if style else ''}{obj}_seed0.jpg"
                  for target in ("Circle", "Square", "none") for obj, style in PROMPTS}


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_pipeline_dir) -> Path:
    """A folder with runs/toy/{pipeline, sae_supervised, stats, class_params.json} as configs/toy/unlearn.yaml reads
    them: a random SAE, its statistics over the 2 objects' plain prompts (3 steps, by the stats config), and
    class_params selecting the top 1 % latents with multiplier -10."""
    root = tmp_path_factory.mktemp("unlearn-assets")
    (root / "runs/toy").mkdir(parents=True)
    (root / "runs/toy/pipeline").symlink_to(tiny_pipeline_dir)
    torch.manual_seed(0)
    SparseAutoencoder(64, SaeConfig(num_latents=256, k=8)).save(root / "runs/toy/sae_supervised" / HOOKPOINT)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        main(["predict", "-c", str(REPO / "configs/toy/stats.yaml"), *SMALL_DATA, "--data.init_args.styles=[]",
              *QUIET])
    torch.set_num_threads(threads)
    save_class_params(root / "runs/toy/class_params.json",
                      {name: {"percentile": 99.0, "multiplier": -10.0} for name in ("Circle", "Square")})
    return root


@pytest.fixture
def toy_cwd(tmp_path, monkeypatch, assets):
    """A fresh working directory whose runs/toy holds the shared assets (linked, read-only)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores are shared; one thread per process is fastest here
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs/toy").mkdir(parents=True)
    for name in ("pipeline", "sae_supervised", "stats", "class_params.json"):
        (tmp_path / "runs/toy" / name).symlink_to(assets / "runs/toy" / name)
    yield tmp_path
    torch.set_num_threads(threads)


def manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def test_images_manifest_erasure_per_target_and_none_unhooked(toy_cwd):
    main([*UNLEARN, "--data.init_args.batch_size=3"])  # batches mix targets: [C C C] [C S S] [S S n] [n n n]
    records = manifest(IMAGES)
    assert [record["file"] for record in records] == sorted(EXPECTED_FILES)
    assert {path.relative_to(IMAGES).as_posix() for path in IMAGES.rglob("*.jpg")} == EXPECTED_FILES
    assert records[0] == {"file": "Circle/Circle_seed0.jpg", "target": "Circle", "erased": ["Circle"],
                          "candidate": None, "prompt_id": "Circle-plain-000-s0", "prompt": "An image of Circle.",
                          "object": "Circle", "style": None, "seed": 0}
    assert {(r["target"], tuple(r["erased"])) for r in records} == {("Circle", ("Circle",)), ("Square", ("Square",)),
                                                                    ("none", ())}
    assert all(r["prompt"] == PROMPTS[r["object"], r["style"]] for r in records)

    # `none` items pass the hook untouched: the same batches of an unhooked module, nothing erased, give the same
    # JPEG bytes (each row of a batch is computed on its own).
    items = PromptDataModule(TOY_VOCABULARY, objects=["Circle", "Square"], styles=["Pop_Art"], seeds=(0,),
                             targets=["Circle", "Square", "none"], template="An image of {object}").items
    unhooked = HookedDiffusion("runs/toy/pipeline", hookpoint=HOOKPOINT, num_steps=3, height=64, width=64,
                               guidance_scale=7.5, output_type="image")
    unhooked.setup("predict")
    for start in range(0, len(items), 3):
        batch = items[start:start + 3]
        images = unhooked.generate([item._replace(erase=()) for item in batch]).images
        for item, image in zip(batch, images):
            if item.target == "none":
                assert (IMAGES / image_file(item)).read_bytes() == jpeg_bytes(image), item
    # Erasure changes every erased image (a random SAE has no concept-specific latents, so all prompts change).
    for obj, style in PROMPTS:
        name = f"{style + '_' if style else ''}{obj}_seed0.jpg"
        for target in ("Circle", "Square"):
            difference = np.abs(pixels(IMAGES / target / name) - pixels(IMAGES / "none" / name)).mean()
            assert difference > 1.0, (target, name, difference)


def test_a_batch_mixing_erasures_gives_each_item_the_image_of_its_own_erasure(toy_cwd):
    erasure = ErasureConfig(sae="runs/toy/sae_supervised", stats="runs/toy/stats/concept_stats.safetensors",
                            class_params="runs/toy/class_params.json")
    module = HookedDiffusion("runs/toy/pipeline", hookpoint=HOOKPOINT, num_steps=3, height=64, width=64,
                             guidance_scale=7.5, capture=CaptureConfig(halves="uncond"), erasure=erasure)
    module.setup("predict")
    items = PromptDataModule(TOY_VOCABULARY, objects=["Circle", "Square"], styles=[], seeds=(0,),
                             targets=["Circle", "none", "Square"]).items
    mixed = [items[i] for i in (0, 2, 4, 1, 5, 3)]  # Circle, none, Square, Circle, Square, none
    together = module.generate(mixed)
    for erasure_items in ([i for i in mixed if i.target == target] for target in ("Circle", "Square", "none")):
        alone = module.generate(erasure_items)
        rows = [mixed.index(item) for item in erasure_items]
        # Batched kernels may round differently (~1e-5); another erasure changes the image by far more.
        torch.testing.assert_close(together.images[rows], alone.images, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(together.activations[rows], alone.activations, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(together.images[0], together.images[1], atol=1e-2)  # Circle erased vs unerased


def test_the_python_api_erases_and_captures_as_the_cli_does(toy_cwd):
    main([*UNLEARN, "--data.init_args.targets=[Circle]", "--data.init_args.batch_size=1"])  # one image per call
    pipe = saemnesia.load_pipeline("runs/toy/pipeline")
    eraser = saemnesia.ConceptEraser.from_files("runs/toy/sae_supervised", STATS, "runs/toy/class_params.json",
                                                concepts=["Circle"], hookpoint=HOOKPOINT)  # start_step 0, as UNLEARN
    block = resolve_hookpoint(pipe, HOOKPOINT)
    for record in manifest(IMAGES):
        noise = torch.Generator().manual_seed(image_seed(record["seed"], record["prompt_id"]))
        capturing = saemnesia.capture(pipe, HOOKPOINT, dtype=torch.float16)
        with saemnesia.erase(pipe, eraser, HOOKPOINT), capturing as activations:
            image = pipe(record["prompt"], num_inference_steps=3, guidance_scale=7.5, height=64, width=64,
                         generator=[noise], output_type="pt").images[0]
        assert (IMAGES / record["file"]).read_bytes() == jpeg_bytes(image), record["file"]
        assert not block._forward_hooks and not pipe.unet._forward_pre_hooks  # removed on exit
    # The capture sees the erased output, as HookedDiffusion's does (its capture runs after the eraser).
    module = HookedDiffusion("runs/toy/pipeline", hookpoint=HOOKPOINT, num_steps=3, height=64, width=64,
                             guidance_scale=7.5, capture=CaptureConfig(), erasure=ErasureConfig(
                                 sae="runs/toy/sae_supervised", stats=STATS, class_params="runs/toy/class_params.json"))
    module.setup("predict")
    items = [item for item in PromptDataModule(TOY_VOCABULARY, objects=["Circle", "Square"], styles=["Pop_Art"],
                                               seeds=(0,), targets=["Circle"]).items
             if item.prompt_id == record["prompt_id"]]
    torch.testing.assert_close(activations.stack(), module.generate(items).activations, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"The pipeline samples 4 steps but the eraser's statistics have 3; call it "
                                         r"with num_inference_steps=3."):
        with saemnesia.erase(pipe, eraser, HOOKPOINT):
            pipe("An image of Circle.", num_inference_steps=4, height=64, width=64)
    assert not block._forward_hooks and not pipe.unet._forward_pre_hooks  # removed on error too
    with pytest.raises(ValueError, match=r"The class_params file runs/toy/class_params.json has no entry for "
                                         r"\['Star'\] \(it covers \['Circle', 'Square'\]\)"):
        saemnesia.ConceptEraser.from_files("runs/toy/sae_supervised", STATS, "runs/toy/class_params.json",
                                           concepts=["Star"])
    with pytest.raises(ValueError, match=r"ConceptEraser.apply expects a block output \[B, 64, H, W\]; got shape "
                                         r"\(\d+, 32, \d+, \d+\): erase with the SAE trained at this hookpoint"):
        with saemnesia.erase(pipe, eraser, "unet.up_blocks.2.attentions.1"):  # a 32-channel block
            pipe("An image of Circle.", num_inference_steps=3, height=64, width=64)


def test_a_search_candidate_sets_every_erased_concept_without_class_params(toy_cwd):
    erasure = ErasureConfig(sae="runs/toy/sae_supervised", stats="runs/toy/stats/concept_stats.safetensors")
    builder = ErasureBuilder(erasure, HOOKPOINT, num_steps=3)
    assert builder.params_for(("Circle", "Square"), Candidate(99.5, -3.0)) == {
        name: {"percentile": 99.5, "multiplier": -3.0} for name in ("Circle", "Square")}
    with pytest.raises(ValueError, match=r"Prompt items erase \['Circle'\] without a search candidate and "
                                         "model.erasure.class_params is not set"):
        builder.params_for(("Circle",))
    with pytest.raises(FileNotFoundError, match="class_params file missing.json does not exist."):
        ErasureBuilder(replace(erasure, class_params="missing.json"), HOOKPOINT, num_steps=3)


def test_erasure_rewrites_both_halves_at_every_step_and_capture_sees_its_output(toy_cwd):
    erasure = ErasureConfig(sae="runs/toy/sae_supervised", stats="runs/toy/stats/concept_stats.safetensors",
                            class_params="runs/toy/class_params.json")
    module = HookedDiffusion("runs/toy/pipeline", hookpoint=HOOKPOINT, num_steps=3, height=64, width=64,
                             guidance_scale=7.5, capture=CaptureConfig(halves="cond"), erasure=erasure)
    module.setup("predict")
    items = PromptDataModule(TOY_VOCABULARY, objects=["Circle", "Square"], styles=[], seeds=(0,),
                             targets=["Circle"]).items
    eraser = module.eraser_for(("Circle",))
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    erase = eraser.apply
    eraser.apply = lambda hidden, step: seen.setdefault(step, (hidden, erase(hidden, step)))[1]
    erased = module.generate(items)
    plain = module.generate([item._replace(erase=(), target="none") for item in items])
    assert sorted(seen) == [0, 1, 2] and all(hidden.shape[0] == 4 for hidden, _ in seen.values())  # both halves
    for step, (_, output) in seen.items():
        cond = output[2:].flatten(2).transpose(1, 2)  # [B, H·W, C] of the conditional half
        torch.testing.assert_close(erased.activations[:, step], cond.half(), rtol=0, atol=0)
    # At step 0 nothing upstream has changed: the eraser's input is the unhooked block output.
    torch.testing.assert_close(seen[0][0][2:].flatten(2).transpose(1, 2).half(), plain.activations[:, 0])
    assert not torch.allclose(erased.activations[:, 1], plain.activations[:, 1])


def test_one_and_two_ddp_processes_write_the_same_images(toy_cwd):
    # One prompt per batch: an image then never shares a batch, whose composition may round kernels differently.
    args = [*UNLEARN, "--data.init_args.batch_size=1"]
    main(args)
    workdir = toy_cwd / "ddp"
    (workdir / "runs").mkdir(parents=True)
    (workdir / "runs/toy").symlink_to(toy_cwd / "runs/toy", target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "OMP_NUM_THREADS": "1"}
    folder = "runs/ddp/images"
    result = subprocess.run([sys.executable, str(REPO / "cli.py"), *args, "--trainer.devices=2",
                             "--trainer.strategy=ddp", f"--trainer.callbacks.output_dir={folder}",
                             "--trainer.default_root_dir=runs/ddp"],
                            cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    double = workdir / folder
    assert sorted(path.name for path in double.glob("manifest-r*.jsonl")) == ["manifest-r0.jsonl", "manifest-r1.jsonl"]
    assert manifest(double) == manifest(IMAGES)
    for name in EXPECTED_FILES:
        assert (double / name).read_bytes() == (IMAGES / name).read_bytes(), name


def test_an_interrupted_run_resumes_without_regenerating_finished_images(toy_cwd):
    crash = ["--trainer.callbacks+=cli_probes.FailAfterPredictBatches", "--trainer.callbacks.batches=2"]
    with pytest.raises(RuntimeError, match="Simulated crash after 2 predict batches"):
        main([*UNLEARN, "--data.init_args.batch_size=2", *crash])
    finished = {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in IMAGES.rglob("*.jpg")}
    assert len(finished) == 4 and not (IMAGES / "manifest.jsonl").exists()
    with (IMAGES / "manifest-r0.jsonl").open("a") as rank_manifest:
        rank_manifest.write('{"file": "Square/Pop_')  # a line torn by a crash during the append

    main([*UNLEARN, "--data.init_args.batch_size=2"])  # the same command again
    assert {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in finished} == finished
    assert [record["file"] for record in manifest(IMAGES)] == sorted(EXPECTED_FILES)  # complete, no duplicates
    assert not list(IMAGES.rglob("*.tmp"))

    with pytest.raises(ValueError, match=r"records images generated with other \['erasure'\] than this run's"):
        main([*UNLEARN, "--model.init_args.erasure.start_step=1"])


def test_unlearncanvas_prompt_sets(tmp_path):
    unlearn = yaml.safe_load((REPO / "configs/sd15_unlearncanvas/unlearn.yaml").read_text())["data"]["init_args"]
    items = PromptDataModule(**unlearn).items
    assert len(items) == 20 * 1020  # docs/method.md §6: per target, 20 objects × 50 styles + 20 plain
    bears = [item for item in items if item.target == "Bears"]
    assert len(bears) == 1020 and {item.erase for item in bears} == {("Bears",)}
    assert sum(item.style is None for item in bears) == 20  # plain prompts once per target, not once per style
    assert len({image_file(item) for item in items}) == len(items)

    anchors = tmp_path / "anchors"
    anchors.mkdir()
    for obj in UNLEARNCANVAS_OBJECTS:
        (anchors / f"sd_prompt_{obj}.txt").write_text("".join(f"{obj} anchor {i}.\n" for i in range(80)))
    sweep = yaml.safe_load((REPO / "configs/sd15_unlearncanvas/sweep.yaml").read_text())["data"]["init_args"]
    validation = PromptDataModule(**{**sweep, "anchor_prompts": str(anchors)}).items
    assert len(validation) == 7 * 20 * 49 * 20  # docs/method.md §5: 49 prompts × 20 classes per target and candidate
    assert [candidate.multiplier for candidate in dict.fromkeys(item.candidate for item in validation)] == [
        -1, -5, -10, -15, -20, -25, -30]
    assert {(item.prompt_id.split("-")[2], item.style) for item in validation} == {
        (f"{i:03d}", UNLEARNCANVAS_STYLES[i]) for i in range(49)}  # anchor prompt i with style i
    assert validation[0].prompt == f"{UNLEARNCANVAS_OBJECTS[0]} anchor 0 in {UNLEARNCANVAS_STYLES[0]} style."

    sequential = PromptDataModule(objects=["Bears", "Cats"], styles=[], sequential=["Cats", "Bears", "Dogs"],
                                  sequential_steps=[1, 3], targets=["none"]).items
    assert [(item.target, item.erase, item.object) for item in sequential] == [
        ("none", (), "Bears"), ("none", (), "Cats"), ("first_01", ("Cats",), "Bears"), ("first_01", ("Cats",), "Cats"),
        ("first_03", ("Cats", "Bears", "Dogs"), "Bears"), ("first_03", ("Cats", "Bears", "Dogs"), "Cats")]


@pytest.mark.parametrize("config", ["toy/stats", "toy/unlearn", "toy/sweep", "sd15_unlearncanvas/stats",
                                    "sd15_unlearncanvas/unlearn", "sd15_unlearncanvas/sweep"])
def test_configs_parse(config, capsys):
    with pytest.raises(SystemExit):  # the whole config parses (types, class paths)
        main(["predict", "-c", str(REPO / f"configs/{config}.yaml"), "--print_config"])
    assert "num_steps" in capsys.readouterr().out


def test_bad_input_fails_with_one_sentence(toy_cwd):
    with pytest.raises(ValueError, match=rf"Unknown concept 'Pop_Art'; the statistics {STATS} cover "
                                         r"\['Circle', 'Square'\]"):
        main([*UNLEARN, "--data.init_args.targets=[Pop_Art]"])
    with pytest.raises(ValueError, match=r"data.targets \['Dog'\] are not concepts of the vocabulary"):
        main([*UNLEARN, "--data.init_args.targets=[Dog]"])
    with pytest.raises(ValueError, match=rf"statistics {STATS} were computed with 3 sampling steps but sampling uses 4 "
                                         r"\(model.num_steps\); recompute them"):
        main([*UNLEARN, "--model.init_args.num_steps=4"])
    with pytest.raises(ValueError, match=rf"start_step must lie in \[0, 3\) for the concept statistics {STATS} of 3 "
                                         r"steps; got 3."):
        main([*UNLEARN, "--model.init_args.erasure.start_step=3"])
    with pytest.raises(ValueError, match=r"data.candidates\[0\]: 'candidate' percentile must lie in \[0, 100\]; "
                                         "got 150.0."):
        main([*SEARCH, "--data.init_args.candidates=[{percentile: 150, multiplier: -1}]"])
    with pytest.raises(ValueError, match="data.candidates is empty; list at least one"):
        main([*SEARCH, "--data.init_args.candidates=[]"])
    with pytest.raises(ValueError, match="data.candidates rate erasing parameters, but target 'none'"):
        main([*SEARCH, "--data.init_args.targets=[Circle, none]"])
    save_class_params("circle_only.json", {"Circle": {"percentile": 99.0, "multiplier": -10.0}})
    with pytest.raises(ValueError, match=r"The class_params file circle_only.json has no entry for \['Square'\] "
                                         r"\(it covers \['Circle'\]\); add them or search their parameters first."):
        main([*UNLEARN, "--model.init_args.erasure.class_params=circle_only.json"])
    with pytest.raises(ValueError, match=r"Prompt items erase \['Circle'\] but model.erasure is not set"):
        main([*UNLEARN, "--model.init_args.erasure=null"])
    with pytest.raises(ValueError, match="ImageWriter needs a HookedDiffusion model with model.output_type: image."):
        main([*UNLEARN, "--model.init_args.output_type=latent"])
    torch.manual_seed(0)
    SparseAutoencoder(64, SaeConfig(num_latents=128, k=8)).save("sae128")
    with pytest.raises(ValueError, match=f"The concept statistics {STATS} have 256 latents but the SAE has 128"):
        main([*UNLEARN, "--model.init_args.erasure.sae=sae128"])
    torch.manual_seed(1)  # the runs above reseeded with the config's seed_everything, which made the assets' SAE
    SparseAutoencoder(64, SaeConfig(num_latents=256, k=8)).save("sae_other")  # same size, other weights
    with pytest.raises(ValueError, match=f"The concept statistics {STATS} were computed with another SAE"):
        main([*UNLEARN, "--model.init_args.erasure.sae=sae_other"])
    SparseAutoencoder(32, SaeConfig(num_latents=256, k=8)).save("sae32")
    stats = ConceptStats.load(STATS)
    del stats.metadata["sae_digest"]  # as in statistics written before SAE digests were recorded
    stats.save("stats_without_digest.safetensors")
    with pytest.raises(ValueError, match=r"expects a block output \[B, 32, H, W\]; got shape \(\d+, 64, \d+, \d+\): "
                                         "erase with the SAE trained at this hookpoint"):
        main([*UNLEARN, "--model.init_args.erasure.sae=sae32",
              "--model.init_args.erasure.stats=stats_without_digest.safetensors"])
    with pytest.raises(ValueError, match="without a search candidate and model.erasure.class_params is not set"):
        main([*SEARCH, "--data.init_args.candidates=null"])  # the search config reads no class_params
    assert not list(Path(".").rglob("*.jpg"))
