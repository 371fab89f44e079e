"""Loading from the Hugging Face Hub (`hf://owner/repo[@revision][/path]`) through huggingface_hub's own offline
cache: a cache folder laid out by hand as huggingface_hub writes it, read by a fresh process with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saemnesia.class_params import save_class_params
from saemnesia.hub import HubLocation, parse_hub_location
from saemnesia.sae import SaeConfig, SparseAutoencoder
from saemnesia.stats import ConceptStats

REPO = Path(__file__).resolve().parents[1]
HOOKPOINT = "unet.up_blocks.1.attentions.1"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cached_repo(cache: Path, repo_id: str, revision: str = "main") -> Path:
    """The snapshot folder of `repo_id` in a Hub cache (`models--owner--name/{refs,snapshots}`), created."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / revision).write_text(COMMIT)
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def offline(script: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=env)


def test_hub_locations_parse_with_revision_and_path():
    assert parse_hub_location("hf://owner/repo") == HubLocation("owner/repo", None, "")
    assert parse_hub_location("hf://owner/repo@v1/sub/stats.safetensors") == HubLocation("owner/repo", "v1",
                                                                                          "sub/stats.safetensors")
    assert parse_hub_location("runs/toy/sae") is None
    with pytest.raises(ValueError, match=r"'hf://owner' names no Hub repository; expected hf://owner/repo"):
        parse_hub_location("hf://owner")


def test_the_eraser_loads_its_sae_statistics_and_params_from_the_hub_cache_offline(tmp_path):
    snapshot = cached_repo(tmp_path / "hub", "owner/saes")
    torch.manual_seed(0)
    sae = SparseAutoencoder(16, SaeConfig(num_latents=64, k=4))
    sae.save(snapshot / HOOKPOINT)
    ConceptStats(["A", "B"], torch.rand(2, 3, 64), torch.tensor([2, 2])).save(snapshot / "stats.safetensors")
    save_class_params(snapshot / "class_params.json", {"A": {"percentile": 99.0, "multiplier": -5.0}})
    script = ("import json, saemnesia; e = saemnesia.ConceptEraser.from_files('hf://owner/saes', "
              "'hf://owner/saes/stats.safetensors', 'hf://owner/saes/class_params.json', hookpoint='" + HOOKPOINT +
              "'); print(json.dumps([e.sae.checkpoint_digest, e.num_steps]))")
    result = offline(script, tmp_path / "hub")
    assert result.returncode == 0, result.stderr
    local = SparseAutoencoder.load(snapshot, HOOKPOINT)
    assert json.loads(result.stdout.splitlines()[-1]) == [local.checkpoint_digest, 3]
    cached_repo(tmp_path / "hub", "owner/empty")
    no_sae = offline("import saemnesia; saemnesia.SparseAutoencoder.load('hf://owner/empty', 'unet.x')",
                     tmp_path / "hub")
    assert "FileNotFoundError: hf://owner/empty (fetched to " in no_sae.stderr
    assert "has no hookpoint folder 'unet.x'; found []." in no_sae.stderr
    missing = offline("import saemnesia; saemnesia.SparseAutoencoder.load('hf://owner/absent')", tmp_path / "hub")
    assert missing.returncode != 0
    assert ("FileNotFoundError: hf://owner/absent is not in the Hugging Face cache and the Hub cannot be reached "
            "(HF_HUB_OFFLINE is set, or there is no network); fetch it once online.") in missing.stderr
