"""The demo's resume rule on its real fit step: a fit interrupted after its first checkpoint is not taken as done;
the rerun resumes from the last checkpoint and exports the same SAE as an uninterrupted run."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import write_synthetic_shards

from callbacks.sae_export import FIT_COMPLETE
from saemnesia.demo import RUNS, TOY_HOOKPOINT, DemoSetting, Step, run, workflow
from saemnesia.sae import SparseAutoencoder

# A validation, hence a checkpoint, every 3 steps: a crash at step 4 leaves `last.ckpt` of step 3 behind, as a demo
# killed mid-fit does.
SMALL_FIT = ("--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
             "--data.init_args.steps_per_epoch=3", "--data.init_args.batch_size=64", "--trainer.val_check_interval=3",
             "--data.init_args.val_batches=1")


def unsupervised_fit(workdir: Path) -> Step:
    """The demo's own unsupervised fit step (6 steps), with the small-data overrides, in `workdir`."""
    write_synthetic_shards(workdir / RUNS / "activations", num_prompts=24, num_steps=2, d_in=8, samples_per_shard=8,
                           hookpoint=TOY_HOOKPOINT)
    step = next(step for step in workflow(DemoSetting(sae_steps=6)) if step.title == "unsupervised SAE")
    return replace(step, args=(*step.args, *SMALL_FIT))


def test_an_interrupted_fit_resumes_from_its_last_checkpoint(tmp_path, monkeypatch, capsys):
    for name in ("straight", "resumed"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "straight")
    run([unsupervised_fit(Path("."))])
    straight = SparseAutoencoder.load(RUNS / "sae", TOY_HOOKPOINT)

    monkeypatch.chdir(tmp_path / "resumed")
    step = unsupervised_fit(Path("."))
    crashing = replace(step, args=(*step.args, "--trainer.callbacks+=cli_probes.FailAtStep",
                                   "--trainer.callbacks.step=4"))
    with pytest.raises(RuntimeError, match="Simulated crash at step 4"):
        run([crashing])
    assert (RUNS / "sae/checkpoints/last.ckpt").is_file()  # what the old rule took for a finished fit
    assert not step.output.exists()

    capsys.readouterr()
    run([step])
    assert "--ckpt_path=last" in capsys.readouterr().out
    assert json.loads(step.output.read_text())["global_step"] == 6
    resumed = SparseAutoencoder.load(RUNS / "sae", TOY_HOOKPOINT)
    for name, tensor in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=0, atol=1e-6, msg=name)

    capsys.readouterr()
    run([step])  # a completed fit is skipped
    assert "done:" in capsys.readouterr().out
