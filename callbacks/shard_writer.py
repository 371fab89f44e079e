"""`ActivationShardWriter`: writes what `HookedDiffusion` captures as activation shards (SPEC §8).

Each process writes its own shards (`shard-r{rank}-{index:06d}.tar`, complete prompts only, renamed into place when
whole) and keeps `manifest-r{rank}.json` up to date with them; when predicting ends, rank 0 merges the rank
manifests into `manifest.json`, listing every complete shard in the folder.

Resuming is re-running the same command: before any dataloader exists, every process reads the prompt ids stored in
complete shards and the datamodule leaves those items out; rank 0 deletes the temporary file of a shard that an
interrupted run left unfinished, so its prompts are generated again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_warn

from datamodules.prompts import PromptDataModule
from saemnesia.generation import GenerationOutput, HookedDiffusion
from saemnesia.shards import ShardManifest, ShardRecord, ShardSink, sample_key, scan_shards, stored_prompt_ids

SHARD_PREFIX = "shard-r"
"""Shard names start with this, then the writing rank: `shard-r{rank}-{index:06d}.tar`."""


RANK_MANIFESTS = "manifest-r*.json"
"""Glob of the per-rank manifests, `manifest-r{rank}.json`."""


def write_samples(sink: ShardSink, output: GenerationOutput, hookpoint: str, half: str) -> None:
    """Write one batch's captured maps to `sink`: one sample per (image, captured step), a prompt's samples together."""
    # float16 CPU numpy as stored: the sink then skips its own conversion (a float32 round trip per map).
    for item, maps in zip(output.items, output.activations.numpy()):  # maps: [S, H*W, C]
        for act, step, timestep in zip(maps, output.steps, output.timesteps):
            meta = {"object": item.object, "style": item.style, "step": step, "timestep": timestep,
                    "prompt_id": item.prompt_id, "prompt": item.prompt, "seed": item.seed,
                    "hookpoint": hookpoint, "half": half}
            sink.write(sample_key(item.prompt_id, step), act, meta)


class ActivationShardWriter(BasePredictionWriter):
    """Per-rank, size-capped float16 WebDataset shards of the captured activations, plus `manifest.json`."""

    def __init__(self, output_dir: str, max_samples: int = 1000, max_bytes: int = 1 << 30):
        """
        Args:
            output_dir: Shard folder, e.g. `runs/<experiment>/activations`; an interrupted run resumes in it.
            max_samples: A shard is closed after this many samples (at the next prompt boundary).
            max_bytes: ... or after this many bytes. SD1.5 maps are 640 KiB, so 1 GiB holds ~1600 samples.
        """
        super().__init__(write_interval="batch")
        self.folder = Path(output_dir)
        if min(max_samples, max_bytes) < 1:  # refused before any image is generated
            raise ValueError(f"ActivationShardWriter max_samples and max_bytes (trainer.callbacks) must be >= 1, got "
                             f"{max_samples} and {max_bytes}.")
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.sink: ShardSink | None = None
        self.rank_manifest: ShardManifest | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, HookedDiffusion) or pl_module.capture is None:
            raise ValueError("ActivationShardWriter needs a HookedDiffusion model with model.capture set.")
        if not isinstance(trainer.datamodule, PromptDataModule):
            raise ValueError("ActivationShardWriter needs a PromptDataModule (data.class_path) to skip stored prompts.")
        if trainer.predict_loop.return_predictions:
            rank_zero_warn("ActivationShardWriter writes every batch, but Trainer.predict also keeps them all in "
                           "memory; set return_predictions: false in the predict config.")
        self.folder.mkdir(parents=True, exist_ok=True)
        self._check_earlier_runs(pl_module, trainer.datamodule)
        stored = stored_prompt_ids(self.folder, SHARD_PREFIX)
        if trainer.is_global_zero:
            for unfinished in self.folder.glob(f"{SHARD_PREFIX}*.tar.tmp"):
                unfinished.unlink()
        trainer.strategy.barrier("shard-writer-setup")  # every process has read the folder before any writes
        if trainer.datamodule.exclude(stored) == 0:
            self._merge_manifests(trainer)  # nothing to generate: Lightning skips the predict loop and its hooks

    def _check_earlier_runs(self, pl_module: HookedDiffusion, datamodule: PromptDataModule) -> None:
        """Refuse to mix runs: earlier rank manifests in the folder must describe the same activations."""
        wanted = {"hookpoint": pl_module.hparams.hookpoint, "num_steps": pl_module.hparams.num_steps,
                  "concepts": datamodule.vocabulary}
        for path in sorted(self.folder.glob(RANK_MANIFESTS)):
            earlier = ShardManifest.load(path)
            differing = [name for name, value in wanted.items() if getattr(earlier, name) != value]
            if differing:
                raise ValueError(f"{path} describes activations with other {differing} than this run's; "
                                 "resume with the same model and data options, or write to another folder.")

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: HookedDiffusion, prediction: GenerationOutput,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        if self.sink is None:
            _, _, tokens_per_sample, d_in = prediction.activations.shape  # [B, S, H*W, C]
            self.sink = ShardSink(self.folder, f"{SHARD_PREFIX}{trainer.global_rank}", tokens_per_sample, d_in,
                                  max_samples=self.max_samples, max_bytes=self.max_bytes,
                                  vocabulary=trainer.datamodule.vocabulary)
            self.rank_manifest = ShardManifest(pl_module.hparams.hookpoint, d_in, tokens_per_sample,
                                               pl_module.hparams.num_steps, trainer.datamodule.vocabulary)
        complete = len(self.sink.records)
        write_samples(self.sink, prediction, pl_module.hparams.hookpoint, pl_module.capture.halves)
        if len(self.sink.records) != complete:  # a shard was completed: list it before anything else can fail
            self._save_rank_manifest(trainer, self.sink.records)

    def _save_rank_manifest(self, trainer: pl.Trainer, records: list[ShardRecord]) -> None:
        self.rank_manifest.shards = list(records)
        self.rank_manifest.save(self.folder, f"manifest-r{trainer.global_rank}.json")

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.sink is not None:
            self._save_rank_manifest(trainer, self.sink.close())
            self.sink = None
        self._merge_manifests(trainer)

    def _merge_manifests(self, trainer: pl.Trainer) -> None:
        """Rank 0 writes `manifest.json` once every rank has finished its shards."""
        trainer.strategy.barrier("shard-writer-end")
        if trainer.is_global_zero:
            paths = sorted(self.folder.glob(RANK_MANIFESTS))
            if not paths:
                raise RuntimeError(f"{self.folder} has no rank manifests to merge; no activations were written.")
            merged = ShardManifest.merge([ShardManifest.load(path) for path in paths])
            # The folder is the truth: also list a shard completed just before a crash kept its rank from listing it.
            merged.shards = scan_shards(self.folder, SHARD_PREFIX)
            merged.save(self.folder)
        trainer.strategy.barrier("shard-writer-manifest")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.sink is not None:  # keep the unfinished shard a temporary file; the next run deletes it
            self.sink.__exit__(type(exception), exception, exception.__traceback__)
            self.sink = None

