"""`make demo` on a reduced setting (the shipped ToyCanvas model, 4 objects, 2 styles, short SAE training, one search
run per eraser): the supervised eraser removes each target and spares the other objects, and the report shows it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from statistics import mean

import numpy as np
import pytest
import torch
from PIL import Image

from callbacks.class_params_selector import select_class_params
from cli import main as cli_main
from saemnesia.demo import (
    REPO,
    REPORT_DIR,
    SEQUENTIAL,
    STYLES,
    TOP_LATENTS_PERCENTILES,
    DemoSetting,
    compared_erasers,
    erasure_overrides,
    main,
)
from saemnesia.toy import ASSETS_DIR, TOY_PIPELINE_DIR

MIN_MEAN_DROP = 0.5  # mean over targets of the erased object's accuracy drop against the unerased images
MAX_COLLATERAL = 0.3  # largest loss of the other objects' mean accuracy, for any target
OBJECTS = ("Circle", "Triangle", "Star", "Ring")
SETTING = DemoSetting(objects=OBJECTS, styles=("Pop_Art", "Neon"), sae_steps=150, supervised_steps=600,
                      saemnesia_multipliers=(-10.0,),
                      baseline_grid=({"percentile": TOP_LATENTS_PERCENTILES[1], "multiplier": -15.0},))

pytestmark = pytest.mark.skipif(not (TOY_PIPELINE_DIR / "model_index.json").is_file(),
                                reason="the trained ToyCanvas pipeline is not in saemnesia/toy/assets")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, str]:
    """The reduced demo, run in a scratch folder that sees the shipped assets where the configs look for them."""
    workdir = tmp_path_factory.mktemp("demo")
    (workdir / "saemnesia/toy").mkdir(parents=True)
    (workdir / "saemnesia/toy/assets").symlink_to(ASSETS_DIR)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI machine's cores are shared; one thread per process is fastest here
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        table = main(SETTING)
    torch.set_num_threads(threads)
    return workdir, table


def test_supervised_eraser_removes_the_target_and_spares_the_rest(demo_run):
    workdir, _ = demo_run
    _, supervised = compared_erasers(SETTING)
    results = json.loads((workdir / supervised.results()).read_text())
    reference = results["reference"]["per_object"]  # accuracy per object without erasure
    assert set(results["objects"]["per_target"]) == set(OBJECTS)
    drops = []
    for target, scores in results["objects"]["per_target"].items():
        erased_accuracy = 1 - scores["UA"]
        assert erased_accuracy < reference[target], (target, erased_accuracy, reference[target])
        drops.append(reference[target] - erased_accuracy)
        others = mean(reference[obj] for obj in OBJECTS if obj != target)
        assert scores["IRA"] >= others - MAX_COLLATERAL, (target, scores["IRA"], others)
    assert mean(drops) >= MIN_MEAN_DROP, drops


def test_supervised_eraser_removes_each_style_and_each_sequence(demo_run):
    workdir, _ = demo_run
    _, supervised = compared_erasers(SETTING)
    reference = json.loads((workdir / supervised.results()).read_text())["reference"]["per_style"]
    styles = json.loads((workdir / supervised.results(STYLES)).read_text())["styles"]
    assert set(styles["per_target"]) == set(SETTING.styles)
    drops = []
    for target, scores in styles["per_target"].items():
        drops.append(reference[target] - (1 - scores["UA"]))
        others = mean(reference[style] for style in SETTING.styles if style != target)
        assert scores["IRA"] >= others - MAX_COLLATERAL, (target, scores["IRA"], others)
    assert mean(drops) >= MIN_MEAN_DROP, drops
    sequential = json.loads((workdir / supervised.results(SEQUENTIAL)).read_text())["sequential"]
    assert [row["erased"] for row in sequential] == [list(OBJECTS[:n]) for n in (1, 2, 4)]
    assert all(row["UA"] >= MIN_MEAN_DROP for row in sequential), sequential
    with Image.open(workdir / REPORT_DIR / "sequential.png") as plot:
        assert plot.size == (1000, 320)


def test_report_table_and_sample_grid(demo_run):
    workdir, tables = demo_run
    table = tables.split("## Styles")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| eraser")]
    assert [row.split(" | ")[0] for row in rows] == ["| no erasure", "| unsupervised SAE (SAeUron-style)",
                                                     "| supervised SAE (SAEmnesia)"]
    assert [row.split(" | ")[-1] for row in rows] == ["– |", "1 |", "1 |"]  # candidates of each search
    assert tables in (workdir / REPORT_DIR / "report.md").read_text()
    with Image.open(workdir / REPORT_DIR / "samples.png") as grid:
        assert grid.size == (3 * 32 * 4, len(OBJECTS) * 32 * 4)  # 3 columns, one row per object, enlarged 4×


def search(eraser, folder: Path, multipliers: list[float]) -> dict:
    """One search run over `multipliers` with the demo's SAE and statistics, and its evaluation's results."""
    candidates = ", ".join(f"{{percentile: 99.999, multiplier: {m}}}" for m in multipliers)
    cli_main(["predict", "-c", str(REPO / "configs/toy/sweep.yaml"), *erasure_overrides(eraser),
              *SETTING.data(styles=False),
              f"--data.init_args.targets=[{', '.join(OBJECTS)}]", f"--data.init_args.candidates=[{candidates}]",
              f"--trainer.callbacks.output_dir={folder / 'images'}", f"--trainer.default_root_dir={folder}"])
    cli_main(["test", "-c", str(REPO / "configs/toy/sweep_evaluate.yaml"), f"--data.init_args.root={folder / 'images'}",
              f"--model.init_args.output_dir={folder}", f"--trainer.default_root_dir={folder}",
              f"--trainer.callbacks.outputs=[{folder / 'class_params.json'}]", "--trainer.callbacks.ties=stronger"])
    return json.loads((folder / "results.json").read_text())


def test_one_search_run_chooses_what_one_run_per_candidate_chooses(demo_run, monkeypatch):
    workdir, _ = demo_run
    monkeypatch.chdir(workdir)
    _, supervised = compared_erasers(SETTING)
    multipliers = [-1.0, -10.0, -30.0]
    together = search(supervised, Path("runs/search_together"), multipliers)
    apart = [search(supervised, Path(f"runs/search_m{m:g}"), [m])["candidates"][0] for m in multipliers]
    assert together["candidates"] == apart  # each candidate's scores, whichever run generated its images
    merged = workdir / "runs/search_apart/results.json"
    merged.parent.mkdir(parents=True)
    merged.write_text(json.dumps({**together, "candidates": apart}))
    chosen = select_class_params(merged, ties="stronger")
    assert json.loads((workdir / "runs/search_together/class_params.json").read_text()) == chosen
    assert set(chosen) == set(OBJECTS)


def test_the_readme_python_blocks_run_on_the_demo_files(demo_run, monkeypatch):
    """The README's "Use from Python" block, run where `make demo` leaves its files, erases as it says."""
    workdir, _ = demo_run
    monkeypatch.chdir(workdir)
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL)
    assert blocks, "README.md has no python block"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["tokens"].shape == (1, 20, 16, 64)
    erased, original = (np.asarray(namespace[name], dtype=np.int16) for name in ("erased", "original"))
    assert np.abs(erased - original).mean() > 1.0  # erasing Circle changed the image; unhooked it is drawn again
