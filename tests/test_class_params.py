"""class_params files (docs/method.md §5, §7): the published `.pth`, `.json`, validation and the search grids."""

from __future__ import annotations

import io
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from saemnesia.class_params import (
    SAEURON_PERCENTILES,
    load_class_params,
    save_class_params,
    top_latents_percentile,
    validate_class_params,
)
from saemnesia.stats import above_quantile

PARAMS = {
    "Bears": {"percentile": 99.999, "multiplier": -5.0},
    "Cats": {"percentile": 99.99, "multiplier": -30.0},
    "Van_Gogh": {"percentile": 99.995, "multiplier": -1.5},
}


@pytest.mark.parametrize("suffix", [".pth", ".json"])
def test_round_trip(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"class_params{suffix}"
    save_class_params(path, PARAMS)
    assert load_class_params(path) == PARAMS
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_pth_is_the_published_format(tmp_path: Path) -> None:
    """Our `.pth` reads back with a plain `torch.load`, as the reference scripts read it."""
    path = tmp_path / "class_params.pth"
    save_class_params(path, PARAMS)
    assert torch.load(path, weights_only=True) == PARAMS
    json_path = tmp_path / "class_params.json"
    save_class_params(json_path, PARAMS)
    assert json.loads(json_path.read_text()) == PARAMS


def test_published_pth_with_metrics_and_numpy_scalars(tmp_path: Path) -> None:
    """The reference's sweep saved metrics next to the parameters; only percentile and multiplier are kept."""
    path = tmp_path / "class_params.pth"
    torch.save({"Bears": {"percentile": 99.999, "multiplier": np.float64(-15.0), "UA": np.float32(93.5),
                          "IRA": torch.tensor(88.0), "selection_strategy": "weighted_average"}}, path)
    assert load_class_params(path) == {"Bears": {"percentile": 99.999, "multiplier": -15.0}}


def test_pth_written_with_numpy_1_names(tmp_path: Path) -> None:
    """numpy 1 pickles its scalars as `numpy.core.multiarray.scalar`; numpy 2 as `numpy._core...`."""
    buffer = io.BytesIO()
    # The legacy (non-zip) format keeps the pickle's GLOBAL lines as plain text, so the module name can be edited.
    torch.save({"Bears": {"percentile": np.float64(99.99), "multiplier": -5.0}}, buffer,
               _use_new_zipfile_serialization=False)
    data = buffer.getvalue()
    names = (b"numpy._core.multiarray", b"numpy.core.multiarray")
    data = data.replace(*names) if names[0] in data else data
    path = tmp_path / "legacy.pth"
    path.write_bytes(data)
    assert names[1] in path.read_bytes()
    assert load_class_params(path) == {"Bears": {"percentile": 99.99, "multiplier": -5.0}}


def test_pth_with_arbitrary_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "class_params.pth"
    torch.save({"Bears": {"percentile": 99.0, "multiplier": -1.0, "note": Fraction(1, 2)}}, path)
    with pytest.raises(ValueError, match="is not a torch.save of plain parameters"):
        load_class_params(path)


@pytest.mark.parametrize(("params", "message"), [
    ({"Bears": {"percentile": 99.9}}, r"'Bears' must have 'percentile' and 'multiplier'; got \['percentile'\]"),
    ({"Bears": -5.0}, "entry of 'Bears' must have 'percentile' and 'multiplier'; got float"),
    ({"Bears": {"percentile": 99.9, "multiplier": "strong"}}, "'Bears' multiplier must be a finite number"),
    ({"Bears": {"percentile": True, "multiplier": -1.0}}, "'Bears' percentile must be a finite number"),
    ({"Bears": {"percentile": 99.9, "multiplier": float("nan")}}, "'Bears' multiplier must be a finite number"),
    ({"Bears": {"percentile": 100.5, "multiplier": -1.0}}, r"'Bears' percentile must lie in \[0, 100\]"),
    ([("Bears", 99.9, -1.0)], "must be a dict"),
])
def test_invalid_params_are_refused(params: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_class_params(params)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pth does not exist"):
        load_class_params(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"must end in \.pth or \.json"):
        save_class_params(tmp_path / "params.yaml", PARAMS)
    (tmp_path / "params.txt").write_text("{}")
    with pytest.raises(ValueError, match=r"must end in \.pth or \.json"):
        load_class_params(tmp_path / "params.txt")
    (tmp_path / "broken.json").write_text("{'Bears': ")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        load_class_params(tmp_path / "broken.json")
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pth is not a torch.save"):
        load_class_params(tmp_path / "broken.pth")
    (tmp_path / "incomplete.json").write_text(json.dumps({"Bears": {"multiplier": -1}}))
    with pytest.raises(ValueError, match="incomplete.json: the entry of 'Bears' must have"):
        load_class_params(tmp_path / "incomplete.json")


@pytest.mark.parametrize("num_latents", [1024, 20480])
def test_top_latents_percentile_keeps_that_many_latents(num_latents: int) -> None:
    scores = torch.randperm(num_latents).double()  # distinct scores
    for count in (1, 2, 3, 10):
        kept = above_quantile(scores, top_latents_percentile(num_latents, count))
        assert torch.equal(kept.nonzero().flatten().sort().values, scores.topk(count).indices.sort().values)
    if num_latents == 20480:  # SAeUron's published percentiles select the same counts
        for percentile, count in zip(SAEURON_PERCENTILES, (3, 2, 1)):
            assert above_quantile(scores, percentile).sum() == count
    with pytest.raises(ValueError, match="count must lie in 1"):
        top_latents_percentile(num_latents, 0)
