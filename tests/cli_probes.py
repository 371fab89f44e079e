"""Callbacks that tests attach to CLI runs (`--trainer.callbacks+=cli_probes.…`; `tests/` is put on PYTHONPATH)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from safetensors.torch import save_file


class DumpRankState(pl.Callback):
    """At the end of fitting, every rank writes its SAE weights and dead-latent counters to `rank{r}.safetensors`."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in pl_module.state_dict().items()}
        save_file(state, str(self.dirpath / f"rank{trainer.global_rank}.safetensors"))


class StopAtStep(pl.Callback):
    """Ends fitting after `step` optimizer steps, as an interrupted job would (the last checkpoint stays)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class FailAfterPredictBatches(pl.Callback):
    """Raises after `batches` predict batches, as a crashed caching job would (callbacks listed before it have run)."""

    def __init__(self, batches: int):
        self.batches = batches
        self.seen = 0

    def on_predict_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        self.seen += 1
        if self.seen >= self.batches:
            raise RuntimeError(f"Simulated crash after {self.seen} predict batches.")


class FailAtStep(pl.Callback):
    """Raises after `step` optimizer steps, as a killed fit would: no `on_fit_end`, the last checkpoint stays."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"Simulated crash at step {trainer.global_step}.")
