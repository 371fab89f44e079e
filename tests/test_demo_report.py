"""The demo's table and sample grid, on hand-made results and solid-colour image folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from saemnesia.demo import REPO, TOY_NUM_LATENTS
from saemnesia.demo_report import (
    no_erasure_scores,
    report_table,
    sequential_table,
    style_table,
    write_sample_grid,
    write_sequential_plot,
)
from saemnesia.toy import TOY_PIPELINE_DIR

OBJECTS, STYLES = ("Cats", "Dogs"), ("Cubism", None)


def test_report_table_rows_in_percent():
    reference = {"per_object": {"Cats": 0.9, "Dogs": 0.7}, "per_style": {"Cubism": 1.0, "Monet": 0.5},
                 "per_object_style": {"Cats": 1.0, "Dogs": 0.5}}
    assert no_erasure_scores(reference) == pytest.approx({"UA": 0.2, "IRA": 0.8, "CRA": 0.75, "TR": 0.75})
    results = {"baseline": {"objects": {"UA": 0.5, "IRA": 0.625, "CRA": 0.7, "TR": 0.5}, "reference": None},
               "ours": {"objects": {"UA": 0.95, "IRA": 0.9, "CRA": 0.85, "TR": None}, "reference": reference}}
    rows = report_table(results, {"baseline": 6, "ours": 7}).splitlines()
    assert rows[2:] == ["| no erasure | 20.0 | 80.0 | 75.0 | 75.0 | – |",
                        "| baseline | 50.0 | 62.5 | 70.0 | 50.0 | 6 |", "| ours | 95.0 | 90.0 | 85.0 | – | 7 |"]


def test_style_and_sequential_tables_in_percent_and_the_plot(tmp_path):
    styles = {"baseline": {"styles": {"UA": 0.5, "IRA": 0.875, "CRA": None, "TR": 0.25}}, "ours": {"styles": {
        "UA": 1.0, "IRA": 0.9375, "CRA": 0.95, "TR": 0.5}}}
    assert style_table(styles).splitlines()[2:] == ["| baseline | 50.0 | 87.5 | – | 25.0 |",
                                                    "| ours | 100.0 | 93.8 | 95.0 | 50.0 |"]
    rows = [{"erased": ["A"], "UA": 1.0, "IRA": 0.5, "CRA": 0.25, "TR": 0.0},
            {"erased": ["A", "B"], "UA": 0.75, "IRA": None, "CRA": 0.125, "TR": 0.5}]
    sequential = {"ours": {"sequential": rows}}
    assert sequential_table(sequential).splitlines()[2:] == ["| ours | 1 | 100.0 | 50.0 | 25.0 | 0.0 |",
                                                             "| ours | 2 | 75.0 | – | 12.5 | 50.0 |"]
    with Image.open(write_sequential_plot(tmp_path / "plot.png", sequential)) as plot:
        assert plot.format == "PNG" and plot.size == (1000, 320)


def colour(target: str, obj: str, folder: int) -> tuple[int, int, int]:
    """A distinct solid colour per (target, object, folder)."""
    return (40 + 100 * ["none", *OBJECTS].index(target), 60 + 120 * OBJECTS.index(obj), 7 + 200 * folder)


def write_folder(root: Path, targets: tuple[str, ...], folder: int) -> Path:
    """An unlearning folder laid out as `ImageWriter` does: 8×8 solid-colour PNGs and manifest.jsonl."""
    lines = []
    for target in targets:
        for obj in OBJECTS:
            for style in STYLES:
                file = f"{target}/{style + '_' if style else ''}{obj}_seed0.png"
                (root / target).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), colour(target, obj, folder)).save(root / file)
                lines.append(json.dumps({"file": file, "target": target, "erased": [] if target == "none" else [target],
                                         "prompt_id": f"{obj}-{style}-s0", "prompt": "p", "object": obj,
                                         "style": style, "seed": 0}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_sample_grid_rows_are_objects_and_columns_the_erasers(tmp_path):
    reference = write_folder(tmp_path / "ours", ("none", *OBJECTS), folder=0)
    baseline = write_folder(tmp_path / "baseline", OBJECTS, folder=1)
    path = write_sample_grid(tmp_path / "grid.png", reference, {"baseline": baseline, "ours": reference}, scale=2)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (len(OBJECTS) * 16, 3 * 16, 3)
    for row, obj in enumerate(OBJECTS):
        for column, expected in enumerate((colour("none", obj, 0), colour(obj, obj, 1), colour(obj, obj, 0))):
            block = grid[16 * row:16 * (row + 1), 16 * column:16 * (column + 1)]
            assert (block == expected).all(), (obj, column)


def test_demo_latent_count_matches_the_toy_sae_config():
    """The baseline's percentiles are computed for `TOY_NUM_LATENTS`; it must be what configs/toy/sae.yaml trains:
    the shipped UNet's channels at the hookpoint (`block_out_channels[-2]`) times the expansion factor."""
    sae_config = yaml.safe_load((REPO / "configs/toy/sae.yaml").read_text())["model"]["init_args"]["sae"]
    unet = json.loads((TOY_PIPELINE_DIR / "unet/config.json").read_text())
    assert TOY_NUM_LATENTS == unet["block_out_channels"][-2] * sae_config["expansion_factor"]
