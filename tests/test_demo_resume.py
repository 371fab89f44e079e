"""The demo's step runner on its own unsupervised fit step, at a reduced setting: a fit that crashed after its first
checkpoint is neither skipped nor restarted, and the resumed run exports what an uninterrupted one does."""

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import QUIET, write_synthetic_shards

from saemnesia.demo import RUNS, DemoSetting, Step, run, workflow
from saemnesia.sae import SparseAutoencoder

HOOKPOINT = "unet.mid_block"  # the synthetic shards' hookpoint
SMALL_FIT = (*QUIET, "--data.init_args.steps_per_epoch=3", "--data.init_args.batch_size=64",
             "--trainer.val_check_interval=3", "--data.init_args.val_batches=1")
"""Three steps per epoch, each ending with a validation and a checkpoint."""


def demo_fit_step(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Step:
    """The demo's unsupervised fit (6 steps) on synthetic activations, run in `workdir`."""
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    write_synthetic_shards(RUNS / "activations", num_prompts=24, num_steps=2, d_in=8, samples_per_shard=8,
                           hookpoint=HOOKPOINT)
    step = next(step for step in workflow(DemoSetting(sae_steps=6)) if step.title == "unsupervised SAE")
    return replace(step, args=(*step.args, *SMALL_FIT))


def test_a_crashed_fit_resumes_from_its_last_checkpoint(tmp_path, monkeypatch, capsys, caplog):
    """Crashing at step 4 leaves step 3's `last.ckpt` and its export; the rerun must not take that for done, must
    restore step 3 (Lightning's own resume) and must export exactly the uninterrupted run's SAE."""
    run([demo_fit_step(tmp_path / "straight", monkeypatch)])
    straight = SparseAutoencoder.load(RUNS / "sae", HOOKPOINT).state_dict()

    step = demo_fit_step(tmp_path / "resumed", monkeypatch)
    with pytest.raises(RuntimeError, match="Simulated crash at step 4"):
        run([replace(step, args=(*step.args, "--trainer.callbacks+=cli_probes.FailAtStep",
                                 "--trainer.callbacks.step=4"))])
    assert torch.load(RUNS / "sae/checkpoints/last.ckpt", weights_only=True)["global_step"] == 3
    assert (RUNS / "sae" / HOOKPOINT / "sae.safetensors").is_file()  # step 3's SAE, exported with its checkpoint
    assert not step.output.exists()

    capsys.readouterr()
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)  # into caplog
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        run([step])
    printed = capsys.readouterr().out
    assert "done:" not in printed and printed.split("\n")[0].endswith(" --ckpt_path=last")
    last = Path.cwd() / RUNS / "sae/checkpoints/last.ckpt"
    assert f"Restored all states from the checkpoint at {last}" in caplog.text  # Lightning resumed at step 3
    resumed = SparseAutoencoder.load(RUNS / "sae", HOOKPOINT).state_dict()
    assert resumed.keys() == straight.keys()
    for name, tensor in straight.items():
        assert torch.equal(resumed[name], tensor), name

    run([step])
    assert "    done: runs/toy/sae/fit_complete.json exists" in capsys.readouterr().out
