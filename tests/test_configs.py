"""Every config parses through the CLI entry point; the predict runs of an experiment take their trainer and model
from its generation.yaml without restating it, and the runs agree on vocabulary, seeds, targets and erasure."""

from __future__ import annotations

import contextlib
import functools
import io
from pathlib import Path

import pytest
import yaml

from cli import main
from datamodules.prompts import PromptDataModule
from saemnesia.concepts import NO_ERASURE, UNLEARNCANVAS_OBJECTS, UNLEARNCANVAS_STYLES, ConceptVocabulary
from saemnesia.toy import TOY_OBJECTS, TOY_STYLES

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(path.relative_to(REPO / "configs").as_posix() for path in (REPO / "configs").rglob("*.yaml"))
EXPERIMENTS = ("toy", "sd15_unlearncanvas", "sdxl")
SHARED = "generation.yaml"
"""The file of an experiment that its predict runs include (`config: generation.yaml`)."""
GENERATION_RUNS = ("cache", "stats", "sweep", "unlearn")
STYLE_RUNS = ("stats_styles", "sweep_styles", "unlearn_styles")
SAMPLING = ("pipeline", "hookpoint", "num_steps", "guidance_scale", "height", "width")
"""What the statistics and the erasing runs must sample alike: the erasure needs the statistics' T and trajectories."""


def subcommand(config: str) -> str:
    name = Path(config).stem
    return "fit" if name.startswith(("sae", "toy_")) else "test" if name.endswith("evaluate") else "predict"


@functools.cache
def resolved(config: str, *overrides: str) -> dict:
    """The config (relative to configs/) with command-line `overrides`, as the CLI resolves it (`--print_config`)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit):
        main([subcommand(config), "-c", str(REPO / "configs" / config), *overrides, "--print_config"])
    return yaml.safe_load(printed.getvalue())


def flat(tree: dict, prefix: str = "") -> dict[str, object]:
    """Dotted key → leaf value of nested mappings; keys already dotted (`model.init_args.capture`) stay dotted."""
    leaves: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            leaves |= flat(value, f"{prefix}{key}.")
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def prompt_vocabulary(config: str) -> ConceptVocabulary:
    """The vocabulary a config's prompts come from: a name, or an explicit mapping as the CLI prints it."""
    vocabulary = resolved(config)["data"]["init_args"]["vocabulary"]
    return PromptDataModule(ConceptVocabulary.from_dict(vocabulary) if isinstance(vocabulary, dict) else vocabulary
                            ).vocabulary


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_parses(config):
    printed = resolved(config)
    assert printed["model"]["class_path"]
    assert printed["data"] is None if Path(config).name == SHARED else printed["data"]["class_path"]


@pytest.mark.parametrize(("experiment", "step"), [
    *((experiment, step) for experiment in EXPERIMENTS for step in GENERATION_RUNS),
    *((experiment, step) for experiment in ("toy", "sd15_unlearncanvas") for step in STYLE_RUNS),
    ("toy", "unlearn_sequential")])
def test_predict_runs_take_the_shared_values_and_restate_none(experiment, step):
    raw = yaml.safe_load((REPO / "configs" / experiment / f"{step}.yaml").read_text())
    assert raw.get("config") == SHARED, f"configs/{experiment}/{step}.yaml must include {SHARED}"
    shared = flat(yaml.safe_load((REPO / "configs" / experiment / SHARED).read_text()))
    own = {key: value for key, value in flat(raw).items() if key in shared}
    restated = [key for key, value in own.items() if value == shared[key]]
    assert not restated, f"configs/{experiment}/{step}.yaml restates {restated} of {SHARED}"
    printed = flat(resolved(f"{experiment}/{step}.yaml"))
    assert {key: printed[key] for key in shared} == shared | own


def test_command_line_overrides_reach_included_and_own_values():
    """The overrides `make demo` passes: single values of the included model, of the step's erasure and callback."""
    printed = resolved("toy/sweep.yaml", "--model.init_args.erasure.start_step=2", "--model.init_args.num_steps=3",
                       "--data.init_args.targets=[Circle]", "--trainer.callbacks.output_dir=runs/x",
                       "--data.init_args.candidates=[{percentile: 99.9, multiplier: -5}]")
    model = printed["model"]["init_args"]
    assert (model["erasure"]["start_step"], model["erasure"]["error_mode"], model["num_steps"]) == (2, "exact", 3)
    assert printed["data"]["init_args"]["candidates"] == [{"percentile": 99.9, "multiplier": -5}]
    assert model["guidance_scale"] == resolved("toy/generation.yaml")["model"]["init_args"]["guidance_scale"]
    assert printed["data"]["init_args"]["targets"] == ["Circle"]
    assert printed["trainer"]["callbacks"][0]["init_args"]["output_dir"] == "runs/x"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_statistics_and_erasing_runs_sample_alike(experiment):
    sampling = {step: tuple(resolved(f"{experiment}/{step}.yaml")["model"]["init_args"][key] for key in SAMPLING)
                for step in ("stats", "sweep", "unlearn")}
    assert len(set(sampling.values())) == 1, sampling


def test_toy_runs_agree_on_vocabulary_seeds_targets_and_erasure():
    runs = {step: resolved(f"toy/{step}.yaml") for step in GENERATION_RUNS}
    for step in GENERATION_RUNS:
        assert prompt_vocabulary(f"toy/{step}.yaml") == ConceptVocabulary(TOY_OBJECTS, TOY_STYLES), step
    assert runs["cache"]["model"]["init_args"]["num_steps"] == runs["stats"]["model"]["init_args"]["num_steps"]
    data = {step: run["data"]["init_args"] for step, run in runs.items()}
    evaluation_seeds = set(data["unlearn"]["seeds"])
    assert all(not evaluation_seeds & set(data[step]["seeds"]) for step in ("cache", "stats", "sweep"))
    assert data["sweep"]["targets"] == list(TOY_OBJECTS)
    assert data["unlearn"]["targets"] == [*TOY_OBJECTS, NO_ERASURE]
    statistics = runs["stats"]["trainer"]["callbacks"][0]["init_args"]
    erasures = {step: runs[step]["model"]["init_args"]["erasure"] for step in ("sweep", "unlearn")}
    for erasure in erasures.values():
        assert (erasure["sae"], erasure["stats"]) == (statistics["sae"], statistics["output"])
    search, unlearning = ({key: erasure[key] for key in ("error_mode", "start_step", "use_beta")}
                          for erasure in erasures.values())
    assert search == unlearning  # the search chooses multipliers for the erasure the unlearning run applies
    # Each step reads what the previous one writes.
    cache_writer = runs["cache"]["trainer"]["callbacks"][0]["init_args"]
    assert resolved("toy/sae.yaml")["data"]["init_args"]["shards"] == cache_writer["output_dir"]
    unlearn_writer = runs["unlearn"]["trainer"]["callbacks"][0]["init_args"]
    assert resolved("toy/evaluate.yaml")["data"]["init_args"]["root"] == unlearn_writer["output_dir"]
    # The sequence erases with the objects' statistics and choice.
    sequential = resolved("toy/unlearn_sequential.yaml")["model"]["init_args"]["erasure"]
    assert {key: sequential[key] for key in ("stats", "class_params")} == {
        key: erasures["unlearn"][key] for key in ("stats", "class_params")}
    selection = resolved("toy/sweep_evaluate.yaml")
    assert selection["data"]["init_args"]["root"] == runs["sweep"]["trainer"]["callbacks"][0]["init_args"]["output_dir"]
    assert selection["trainer"]["callbacks"][0]["init_args"]["outputs"] == [erasures["unlearn"]["class_params"]]


@pytest.mark.parametrize(("experiment", "styles"), [("toy", TOY_STYLES), ("sd15_unlearncanvas", UNLEARNCANVAS_STYLES)])
def test_style_runs_read_the_style_statistics_and_choice_and_target_every_style(experiment, styles):
    runs = {step: resolved(f"{experiment}/{step}.yaml") for step in STYLE_RUNS}
    statistics = runs["stats_styles"]["trainer"]["callbacks"][0]["init_args"]
    object_statistics = resolved(f"{experiment}/stats.yaml")["trainer"]["callbacks"][0]["init_args"]
    assert statistics["output"] != object_statistics["output"]  # the objects' thresholds stay their own
    assert runs["stats_styles"]["data"]["init_args"]["include_plain"] is False  # only the styles receive images
    for step in ("sweep_styles", "unlearn_styles"):
        erasure = runs[step]["model"]["init_args"]["erasure"]
        assert (erasure["sae"], erasure["stats"]) == (statistics["sae"], statistics["output"]), step
        assert runs[step]["data"]["init_args"]["targets"] == list(styles), step
    assert runs["unlearn_styles"]["model"]["init_args"]["erasure"]["class_params"] != (
        resolved(f"{experiment}/unlearn.yaml")["model"]["init_args"]["erasure"]["class_params"])


def test_unlearncanvas_runs_prompt_the_published_vocabulary_and_targets():
    rust = UNLEARNCANVAS_STYLES.index("Rust")
    with_seed_images = (*UNLEARNCANVAS_STYLES[:rust + 1], "Seed_Images", *UNLEARNCANVAS_STYLES[rust + 1:])
    assert prompt_vocabulary("sd15_unlearncanvas/cache.yaml") == ConceptVocabulary(UNLEARNCANVAS_OBJECTS,
                                                                                   with_seed_images)
    for step in ("stats", "sweep", "unlearn"):
        vocabulary = prompt_vocabulary(f"sd15_unlearncanvas/{step}.yaml")
        assert vocabulary == ConceptVocabulary(UNLEARNCANVAS_OBJECTS, UNLEARNCANVAS_STYLES), step
    for step in ("sweep", "unlearn"):
        assert resolved(f"sd15_unlearncanvas/{step}.yaml")["data"]["init_args"]["targets"] == UNLEARNCANVAS_OBJECTS
