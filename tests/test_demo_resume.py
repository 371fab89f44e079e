"""The demo's step runner on its own fit steps, at a reduced setting: a fit that crashed after its first checkpoint
is neither skipped nor restarted, and the resumed run exports what an uninterrupted one does."""

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import QUIET, write_synthetic_shards

from saemnesia.demo import RUNS, DemoSetting, Step, run, workflow

HOOKPOINT = "unet.mid_block"  # the synthetic shards' hookpoint
EVERY_3_STEPS = (*QUIET, "--data.init_args.steps_per_epoch=3", "--trainer.val_check_interval=3",
                 "--data.init_args.val_batches=1")  # each epoch ends with a validation and a checkpoint
SMALL_FITS = {"unsupervised SAE": (*EVERY_3_STEPS, "--data.init_args.batch_size=64"),
              "supervised SAE": (*EVERY_3_STEPS, "--data.init_args.batch_size=4",
                                 "--model.init_args.objective.init_args.assignment_batches=2")}
"""Overrides of the demo's fit steps, by title."""


def demo_fits(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> list[Step]:
    """The demo's two fits (6 steps each, `SMALL_FITS`), in order, on synthetic activations, run in `workdir`."""
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    write_synthetic_shards(RUNS / "activations", num_prompts=24, num_steps=2, d_in=8, samples_per_shard=8,
                           hookpoint=HOOKPOINT)
    return [replace(step, args=(*step.args, *SMALL_FITS[step.title]))
            for step in workflow(DemoSetting(sae_steps=6, supervised_steps=6)) if step.title in SMALL_FITS]


def exported_files(step: Step) -> dict[str, bytes]:
    """The files of the SAE folder that `step`'s `SaeExport` writes, by name."""
    return {file.name: file.read_bytes() for file in (step.output.parent / HOOKPOINT).iterdir()}


@pytest.mark.parametrize("fit", range(len(SMALL_FITS)), ids=list(SMALL_FITS))
def test_a_crashed_fit_resumes_from_its_last_checkpoint(fit, tmp_path, monkeypatch, capsys, caplog):
    """Crashing at step 4 leaves step 3's `last.ckpt` and its export; the rerun must not take that for done, must
    restore step 3 (Lightning's own resume) and must export exactly the uninterrupted run's SAE folder."""
    steps = demo_fits(tmp_path / "straight", monkeypatch)
    run(steps[:fit + 1])
    straight = exported_files(steps[fit])

    steps = demo_fits(tmp_path / "resumed", monkeypatch)
    run(steps[:fit])
    step, last = steps[fit], steps[fit].last_checkpoint
    with pytest.raises(RuntimeError, match="Simulated crash at step 4"):
        run([replace(step, args=(*step.args, "--trainer.callbacks+=cli_probes.FailAtStep",
                                 "--trainer.callbacks.step=4"))])
    assert torch.load(last, weights_only=True)["global_step"] == 3
    assert exported_files(step) != straight  # step 3's SAE, exported with its checkpoint
    assert not step.output.exists()

    capsys.readouterr()
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)  # into caplog
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        run([step])
    printed = capsys.readouterr().out
    assert "done:" not in printed and printed.split("\n")[0].endswith(" --ckpt_path=last")
    assert f"Restored all states from the checkpoint at {Path.cwd() / last}" in caplog.text  # resumed at step 3
    assert exported_files(step) == straight  # bit for bit

    run([step])
    assert f"    done: {step.output} exists" in capsys.readouterr().out
