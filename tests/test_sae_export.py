"""`SaeExport` at the end of a real supervised fit: the exported SAE is the best checkpoint's, read with
`torch.load(weights_only=True)`, and `fit_complete.json` names that checkpoint."""

import json
from pathlib import Path

import torch
from helpers import QUIET, write_synthetic_shards
from safetensors.torch import load_file

from callbacks.sae_export import FIT_COMPLETE
from cli import main
from saemnesia.concepts import load_concept_latents
from saemnesia.sae import SparseAutoencoder

REPO = Path(__file__).resolve().parents[1]
HOOKPOINT = "unet.mid_block"  # the synthetic shards' hookpoint
# Validation every 2 steps; lr 0.3 makes the validation loss rise after the first check, so the best is not the last.
SHORT_DIVERGING_FIT = ("--trainer.max_steps=8", "--trainer.val_check_interval=2", "--data.init_args.steps_per_epoch=2",
                       "--data.init_args.batch_size=4", "--data.init_args.val_batches=2", "--model.init_args.lr=0.3",
                       "--model.init_args.objective.init_args.assignment_batches=2")


def test_the_export_is_the_best_checkpoint_loaded_weights_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_synthetic_shards("runs/toy/activations", num_prompts=24, num_steps=2, d_in=8, samples_per_shard=8,
                           hookpoint=HOOKPOINT)
    main(["fit", "-c", str(REPO / "configs/toy/sae.yaml"), *QUIET, "--trainer.fast_dev_run=2"])
    real_load, weights_only = torch.load, []

    def recording_load(*args, **kwargs):
        weights_only.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    main(["fit", "-c", str(REPO / "configs/toy/sae_supervised.yaml"), *QUIET, *SHORT_DIVERGING_FIT,
          "--trainer.callbacks+=cli_probes.DumpRankState", "--trainer.callbacks.dirpath=final"])
    assert weights_only == [True]  # SaeExport's read of the best checkpoint, the fit's only checkpoint load

    record = json.loads((tmp_path / "runs/toy/sae_supervised" / FIT_COMPLETE).read_text())
    best = real_load(record["checkpoint"], map_location="cpu", weights_only=True)
    assert best["global_step"] < record["global_step"] == 8
    exported = SparseAutoencoder.load("runs/toy/sae_supervised", HOOKPOINT)
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, best["state_dict"][f"sae.{name}"]), name
    assert not torch.equal(exported.W_dec, load_file("final/rank0.safetensors")["sae.W_dec"])  # not the last weights
    latents = load_concept_latents(tmp_path / "runs/toy/sae_supervised" / HOOKPOINT / "concept_latents.json")
    assert latents == best["concept_latents"]
