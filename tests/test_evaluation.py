"""The `test` run of configs/toy/evaluate.yaml on synthetic images: solid-colour JPEGs whose colour decides what two
tiny classifiers predict, so every score is known by hand. Also 2 DDP processes against 1, and the input checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from callbacks.class_params_selector import ClassParamsSelector, select_class_params
from cli import main
from datamodules.images import ImageFolderDataModule
from saemnesia.class_params import Candidate, load_class_params

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs/toy/evaluate.yaml")
SEARCH_CONFIG = str(REPO / "configs/toy/sweep_evaluate.yaml")
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--data.init_args.batch_size=4"]
OBJECTS = ["Circle", "Square", "Triangle"]
STYLES = ["Pop_Art", "Blueprint"]
STYLE_LABELS = [*STYLES, "Plain"]
LEVELS = [0.2, 0.5, 0.8]
"""Channel level of each label: red names the object, green the style (label order)."""
TARGETS = {"none": [], "Circle": ["Circle"], "Square": ["Square"], "first_02": ["Circle", "Square"]}


class ColourClassifier(nn.Module):
    """Predicts the label whose level is nearest to the image's mean value in one channel."""

    def __init__(self, num_classes: int, channel: int):
        super().__init__()
        self.channel = channel
        self.levels = nn.Parameter(torch.zeros(num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        value = images[:, self.channel].mean(dim=(1, 2))  # [B]
        return -(value[:, None] - self.levels) ** 2  # [B, K]


def predicted(target: str, obj: str, style: str | None, erases: bool = True) -> tuple[str, str]:
    """What the classifiers are made to answer: erased objects become the next object (unless the erasure fails,
    `erases=False`); a few planted mistakes."""
    pred_object = OBJECTS[(OBJECTS.index(obj) + 1) % 3] if erases and obj in TARGETS[target] else obj
    pred_style = "Plain" if style is None else style
    if (target, obj, style) == ("Square", "Triangle", "Blueprint"):
        pred_object = "Circle"
    if (target, obj, style) == ("Circle", "Square", "Pop_Art"):
        pred_style = "Blueprint"
    if (target, obj, style) == ("none", "Triangle", None):
        pred_object = "Square"
    return pred_object, pred_style


def write_images(root: Path, targets: dict[str, list[str]] = TARGETS,
                 candidates: dict[Candidate, bool] | None = None) -> None:
    """Every target × object × (styles + plain), seed 0, as the unlearning run lays them out, with manifest; a
    search's images once per candidate, each erasing or not as `candidates` says."""
    lines = []
    for candidate, erases in (candidates or {None: True}).items():
        folder = "" if candidate is None else f"{candidate.name}/"
        for target, erased in targets.items():
            (root / folder / target).mkdir(parents=True)
            for obj in OBJECTS:
                for style in (*STYLES, None):
                    pred_object, pred_style = predicted(target, obj, style, erases)
                    colour = (round(255 * LEVELS[OBJECTS.index(pred_object)]),
                              round(255 * LEVELS[STYLE_LABELS.index(pred_style)]), 0)
                    name = f"{folder}{target}/{obj}_seed0.jpg" if style is None else \
                        f"{folder}{target}/{style}_{obj}_seed0.jpg"
                    Image.new("RGB", (16, 16), colour).save(root / name, quality=95)
                    prompt = f"An image of {obj}." if style is None else f"An image of {obj} in {style} style."
                    lines.append(json.dumps({
                        "file": name, "target": target, "erased": erased,
                        "candidate": None if candidate is None else candidate._asdict(),
                        "prompt_id": f"{obj}-{style or 'plain'}-000-s0", "prompt": prompt, "object": obj,
                        "style": style, "seed": 0}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")


def write_classifier(folder: Path, labels: list[str], channel: int) -> None:
    folder.mkdir(parents=True)
    save_file({"levels": torch.tensor(LEVELS)}, str(folder / "model.safetensors"))
    (folder / "classifier.json").write_text(json.dumps({
        "class_path": "test_evaluation.ColourClassifier", "init_args": {"num_classes": 3, "channel": channel},
        "labels": labels}))


@pytest.fixture
def toy_workdir(tmp_path, monkeypatch):
    """A working directory laid out as configs/toy/evaluate.yaml expects: classifiers and unlearning images."""
    monkeypatch.chdir(tmp_path)
    write_classifier(tmp_path / "saemnesia/toy/assets/classifiers/object", OBJECTS, channel=0)
    write_classifier(tmp_path / "saemnesia/toy/assets/classifiers/style", STYLE_LABELS, channel=1)
    write_images(tmp_path / "runs/toy/unlearn/images")
    (tmp_path / "runs/toy/unlearn/images/generation.json").write_text(json.dumps(
        {"num_steps": 20, "erasure": {"sae": "runs/toy/sae_supervised", "class_params": "runs/toy/class_params.json",
                                      "error_mode": "exact"}}))
    return tmp_path


def check_results(results: dict) -> None:
    # Target Circle: class accuracy Circle 0/3, Square 3/3, Triangle 3/3 → UA 1, IRA 1;
    #   style accuracy Pop_Art 2/3 (Square Pop_Art → Blueprint), Blueprint 3/3 → CRA 5/6.
    # Target Square: Circle 3/3, Square 0/3, Triangle 2/3 → UA 1, IRA 5/6; styles all right → CRA 1.
    # Means: UA 1, IRA (1 + 5/6)/2 = 11/12, CRA (5/6 + 1)/2 = 11/12.
    expected = {"UA": 1.0, "IRA": 11 / 12, "CRA": 11 / 12,
                "per_target": {"Circle": {"UA": 1.0, "IRA": 1.0, "CRA": 5 / 6},
                               "Square": {"UA": 1.0, "IRA": 5 / 6, "CRA": 1.0}}}
    for key in ("UA", "IRA", "CRA"):
        assert results["objects"][key] == pytest.approx(expected[key])
        for target in ("Circle", "Square"):
            assert results["objects"]["per_target"][target][key] == pytest.approx(expected["per_target"][target][key])
    # TR counts the erased class's own styled images only: all keep their style (the planted Pop_Art → Blueprint is
    # a Square's, in Circle's run).
    assert [results["objects"]["per_target"][target]["TR"] for target in ("Circle", "Square")] == [1.0, 1.0]
    assert results["styles"] is None
    # first_02 erases Circle and Square: both 0/3 → UA 1; Triangle 3/3 → IRA 1; styles all right → CRA 1.
    assert [(row["target"], row["erased"], row["UA"], row["IRA"], row["CRA"]) for row in results["sequential"]] == [
        ("first_02", ["Circle", "Square"], 1.0, 1.0, 1.0)]
    # Reference: Triangle plain → Square, so class accuracies 1, 1, 2/3 (mean 8/9); styles all right.
    assert results["reference"]["object_accuracy"] == pytest.approx(8 / 9)
    assert results["reference"]["style_accuracy"] == 1.0
    assert results["images"] == 36 and results["targets"]["first_02"] == {"erased": ["Circle", "Square"], "images": 9}
    assert results["generation"]["erasure"]["class_params"] == "runs/toy/class_params.json"


def test_toy_evaluate_config_writes_the_hand_computed_report(toy_workdir):
    main(["test", "-c", CONFIG, *QUIET])
    results = json.loads((toy_workdir / "runs/toy/evaluate/results.json").read_text())
    check_results(results)
    report = (toy_workdir / "runs/toy/evaluate/results.md").read_text()
    assert "| Circle | 100.00 | 100.00 | 83.33 |" in report
    assert "| Square | 100.00 | 83.33 | 100.00 |" in report
    assert "| **mean** | **100.00** | **91.67** | **91.67** |" in report
    assert "| first_02 | 2 | 100.00 | 100.00 | 100.00 |" in report
    assert "Object accuracy 88.89, style accuracy 100.00" in report
    assert not list((toy_workdir / "runs/toy/evaluate").glob("*.tmp"))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # here: DDP children skip it

    events = EventAccumulator(str(next((toy_workdir / "runs/toy/logs/evaluate").glob("version_*"))),
                              size_guidance={"images": 0})
    events.Reload()
    assert {"samples/Circle", "samples/first_02", "confusion/object/none", "confusion/style/Square"} <= set(
        events.Tags()["images"])
    grid = events.Images("samples/Circle")[0]
    assert (grid.width, grid.height) == (2 * 128, 4 * 128)  # (unerased, erased) × the first 4 of 9 shared prompts
    assert events.Scalars("test/objects/IRA")[0].value == pytest.approx(11 / 12)
    assert events.Scalars("test/objects/CRA/Circle")[0].value == pytest.approx(5 / 6)


def test_two_ddp_processes_report_what_one_does(toy_workdir):
    main(["test", "-c", CONFIG, *QUIET, "--model.init_args.output_dir=single", "--trainer.logger=false"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "cli.py"), "test", "-c", CONFIG, *QUIET,
                             "--model.init_args.output_dir=double", "--trainer.logger=false",
                             "--trainer.devices=2", "--trainer.strategy=ddp"],
                            cwd=toy_workdir, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    single = json.loads((toy_workdir / "single/results.json").read_text())
    double = json.loads((toy_workdir / "double/results.json").read_text())
    assert double == single
    check_results(double)  # 36 images, none counted twice by the unpadded sampler


def test_published_evaluate_config_parses(capsys):
    with pytest.raises(SystemExit):  # types and class paths of the whole config
        main(["test", "-c", str(REPO / "configs/sd15_unlearncanvas/evaluate.yaml"), "--print_config"])
    printed = capsys.readouterr().out
    assert "labels: unlearncanvas_styles" in printed and "root: runs/sd15_unlearncanvas/unlearn/images" in printed


def test_bad_image_folders_fail_with_one_sentence(tmp_path, toy_workdir):
    with pytest.raises(FileNotFoundError, match=r"data.root .*nowhere has no manifest.jsonl"):
        ImageFolderDataModule(str(tmp_path / "nowhere"))
    root = toy_workdir / "runs/toy/unlearn/images"
    with pytest.raises(ValueError, match=r"data.targets \['Bears'\] have no images"):
        ImageFolderDataModule(str(root), targets=["Bears"])
    (root / "Circle/Pop_Art_Circle_seed0.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"lists 1 missing image files, e.g. \['Circle/Pop_Art_Circle"):
        ImageFolderDataModule(str(root))

    other = tmp_path / "other"
    write_images(other, {"Circle": ["Circle"]})
    lines = (other / "manifest.jsonl").read_text().splitlines()
    (other / "manifest.jsonl").write_text("\n".join([*lines, lines[0].replace('"erased": ["Circle"]', '"erased": []')]))
    with pytest.raises(ValueError, match=r"lists Circle/Pop_Art_Circle_seed0.jpg twice with different metadata"):
        ImageFolderDataModule(str(other))


def test_objects_unknown_to_the_classifier_are_refused(toy_workdir):
    write_classifier(toy_workdir / "two", OBJECTS[:2] + ["Star"], channel=0)
    with pytest.raises(ValueError, match=r"The images' objects \['Triangle'\] are not labels of "
                                         r"model.object_classifier\."):
        main(["test", "-c", CONFIG, *QUIET, "--model.init_args.object_classifier.checkpoint=two"])


def write_search(path: Path, candidates: list[tuple[dict, dict[str, tuple[float, ...]], dict | None]]) -> Path:
    """A hand-made search `results.json`: per candidate its params and, per erased concept, (UA, IRA[, TR])."""
    def section(scores: dict[str, tuple[float, ...]] | None) -> dict | None:
        return None if not scores else {"per_target": {
            concept: {"UA": ua, "IRA": ira, "CRA": 0.5, **({"TR": tr[0]} if tr else {})}
            for concept, (ua, ira, *tr) in scores.items()}}

    concepts = {concept for _, objects, styles in candidates for concept in [*objects, *(styles or {})]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "targets": {concept: {"erased": [concept], "images": 3} for concept in sorted(concepts)},
        "candidates": [{"params": params, "objects": section(objects), "styles": section(styles)}
                       for params, objects, styles in candidates]}))
    return path


def test_class_params_selector_keeps_the_best_mean_of_ua_and_ira(tmp_path):
    # Bears: -1 → (0.5 + 0.9)/2 = 0.7, -5 → (0.9 + 0.8)/2 = 0.85, -10 → (1.0 + 0.8)/2 = 0.9: the best is -10.
    # Cubism: -1 → 0.625, -5 → 0.75, -10 → 0.75 and (99.99, -5) → 0.75: the tie goes to the smaller |multiplier|,
    # then to the larger percentile, so (99.999, -5).
    candidates = [({"percentile": 99.999, "multiplier": -1.0}, {"Bears": (0.5, 0.9)}, {"Cubism": (0.25, 1.0)}),
                  ({"percentile": 99.999, "multiplier": -5.0}, {"Bears": (0.9, 0.8)}, {"Cubism": (0.75, 0.75)}),
                  ({"percentile": 99.999, "multiplier": -10.0}, {"Bears": (1.0, 0.8)}, {"Cubism": (1.0, 0.5)}),
                  ({"percentile": 99.99, "multiplier": -5.0}, {}, {"Cubism": (0.5, 1.0)})]
    results = write_search(tmp_path / "sweep/results.json", candidates)
    selector = ClassParamsSelector([str(tmp_path / "class_params.json"), str(tmp_path / "cp.pth")])
    expected = {"Bears": {"percentile": 99.999, "multiplier": -10.0},
                "Cubism": {"percentile": 99.999, "multiplier": -5.0}}
    assert selector.select(results) == expected
    assert load_class_params(tmp_path / "class_params.json") == expected == load_class_params(tmp_path / "cp.pth")
    # `stronger` breaks Cubism's three-way tie the other way: the larger |multiplier| (-10), while Bears' best score
    # still wins outright; between equal multipliers it takes the smaller percentile (more latents).
    assert select_class_params(results, ties="stronger") == {
        "Bears": {"percentile": 99.999, "multiplier": -10.0}, "Cubism": {"percentile": 99.999, "multiplier": -10.0}}
    write_search(results, [*candidates, ({"percentile": 99.99, "multiplier": -10.0}, {}, {"Cubism": (0.5, 1.0)})])
    assert select_class_params(results, ties="stronger")["Cubism"] == {"percentile": 99.99, "multiplier": -10.0}
    assert select_class_params(results)["Cubism"] == {"percentile": 99.999, "multiplier": -5.0}
    with pytest.raises(ValueError,
                       match=r"ClassParamsSelector.ties must be one of \['milder', 'stronger'\], got 'random'"):
        ClassParamsSelector(["cp.json"], ties="random")


def test_the_selector_can_weigh_what_the_eraser_keeps(tmp_path):
    # Bears: -5 → (UA, IRA, TR) (0.9, 0.8, 0.9): published 0.85, with retention 2.6/3; -10 → (1.0, 0.8, 0.2): 0.9 and
    # 2.0/3. The published rule takes -10, the one with retention -5.
    results = write_search(tmp_path / "sweep/results.json", [
        ({"percentile": 99.999, "multiplier": -5.0}, {"Bears": (0.9, 0.8, 0.9)}, None),
        ({"percentile": 99.999, "multiplier": -10.0}, {"Bears": (1.0, 0.8, 0.2)}, None)])
    assert select_class_params(results)["Bears"]["multiplier"] == -10.0
    chosen = ClassParamsSelector([str(tmp_path / "cp.json")], objective="with_retention").select(results)
    assert chosen["Bears"]["multiplier"] == -5.0
    write_search(results, [({"percentile": 99.999, "multiplier": -5.0}, {"Bears": (0.9, 0.8)}, None)])
    with pytest.raises(ValueError, match=r"objective 'with_retention' needs each candidate's TR, which the evaluation "
                                         r"of p99.999_m-5 lacks"):
        select_class_params(results, objective="with_retention")
    with pytest.raises(ValueError, match=r"ClassParamsSelector.objective must be one of \['published', "
                                         r"'with_retention'\], got 'best'"):
        ClassParamsSelector(["cp.json"], objective="best")
    with pytest.raises(ValueError, match=r"outputs \['cp.txt'\] must end in .json or .pth"):
        ClassParamsSelector(["cp.txt"])


def test_the_selector_refuses_what_is_not_a_search_evaluation(tmp_path, toy_workdir):
    with pytest.raises(FileNotFoundError, match=r"nowhere/results.json does not exist; evaluate the search's images"):
        select_class_params(tmp_path / "nowhere/results.json")
    main(["test", "-c", CONFIG, *QUIET, "--trainer.logger=false"])  # an unlearning run's evaluation
    with pytest.raises(ValueError, match=r"evaluate/results.json has no 'candidates'; evaluate the images of a search"):
        select_class_params(toy_workdir / "runs/toy/evaluate/results.json")
    broken = write_search(tmp_path / "broken/results.json", [({"percentile": 99.999}, {"Bears": (1.0, 1.0)}, None)])
    with pytest.raises(ValueError, match=r"candidates\[0\] params: the entry of 'candidate' must have 'percentile' and "
                                         r"'multiplier'"):
        select_class_params(broken)


def test_search_evaluation_scores_each_candidate_and_selects_the_best(toy_workdir):
    # Candidate m-1 erases nothing: Circle's images stay Circles (UA 0, IRA 1: score 1/2), Square's Squares (UA 0,
    # IRA 5/6 with the planted Triangle mistake). Candidate m-5 scores as check_results: Circle 1, Square 11/12.
    weak, strong = Candidate(99.999, -1.0), Candidate(99.999, -5.0)
    targets = {name: TARGETS[name] for name in ("Circle", "Square")}
    write_images(toy_workdir / "runs/toy/sweep/images", targets, {weak: False, strong: True})
    main(["test", "-c", SEARCH_CONFIG, *QUIET])
    results = json.loads((toy_workdir / "runs/toy/sweep/results.json").read_text())
    assert [section["params"] for section in results["candidates"]] == [weak._asdict(), strong._asdict()]
    scores = {section["params"]["multiplier"]: section["objects"]["per_target"] for section in results["candidates"]}
    assert scores[-1.0]["Circle"] == {"UA": 0.0, "IRA": 1.0, "CRA": pytest.approx(5 / 6), "TR": 1.0}
    assert scores[-1.0]["Square"] == {"UA": 0.0, "IRA": pytest.approx(5 / 6), "CRA": 1.0, "TR": 1.0}
    assert scores[-5.0]["Circle"] == {"UA": 1.0, "IRA": 1.0, "CRA": pytest.approx(5 / 6), "TR": 1.0}
    assert results["images"] == 36 and results["targets"]["Circle"] == {"erased": ["Circle"], "images": 18}
    report = (toy_workdir / "runs/toy/sweep/results.md").read_text()
    assert '## Candidate `{"percentile": 99.999, "multiplier": -1.0}`' in report
    assert "| Circle | 0.00 | 100.00 | 83.33 | 100.00 |" in report
    assert "| Circle | 100.00 | 100.00 | 83.33 | 100.00 |" in report
    assert load_class_params(toy_workdir / "runs/toy/class_params.json") == {
        "Circle": strong._asdict(), "Square": strong._asdict()}
