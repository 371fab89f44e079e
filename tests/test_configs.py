"""Every config parses through the CLI entry point, and the toy generation runs agree on what they share."""

from pathlib import Path

import pytest
import yaml

from cli import main
from datamodules.prompts import PromptDataModule
from saemnesia.toy import TOY_VOCABULARY

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(path.relative_to(REPO / "configs").as_posix() for path in (REPO / "configs").rglob("*.yaml"))
TOY_GENERATION = ("cache", "stats", "sweep", "unlearn")
"""The toy predict runs: the statistics and the erasing runs must generate as the cached activations were."""
SHARED = ("pipeline", "hookpoint", "num_steps", "guidance_scale", "height", "width")


def subcommand(config: str) -> str:
    name = Path(config).stem
    return "fit" if name.startswith(("sae", "toy_")) else "test" if name == "evaluate" else "predict"


def resolved(config: str, capsys: pytest.CaptureFixture) -> dict:
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([subcommand(config), "-c", str(REPO / "configs" / config), "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_parses(config, capsys):
    printed = resolved(config, capsys)
    assert printed["model"]["class_path"] and printed["data"]["class_path"]


def test_toy_generation_runs_share_vocabulary_and_sampling(capsys):
    runs = {name: resolved(f"toy/{name}.yaml", capsys) for name in TOY_GENERATION}
    for name, config in runs.items():
        data = config["data"]["init_args"]
        vocabulary = PromptDataModule(data["vocabulary"]).vocabulary
        assert vocabulary == TOY_VOCABULARY, name
    generation = {name: tuple(config["model"]["init_args"][key] for key in SHARED) for name, config in runs.items()}
    assert len(set(generation.values())) == 1, generation
