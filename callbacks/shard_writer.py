"""`ActivationShardWriter`: writes what `HookedDiffusion` captures as activation shards (docs/method.md §8).

Each process writes its own shards (`shard-r{rank}-{index:06d}.tar`, complete prompts only, renamed into place when
whole) and keeps `manifest-r{rank}.json` up to date with them; when predicting ends, rank 0 merges the rank
manifests into `manifest.json`, listing every complete shard in the folder. Resuming is re-running the same command
(`callbacks.writer.ResumableWriter`): the prompts stored in complete shards are left out, and those of the shard
that an interrupted run left unfinished (a `.tar.tmp` file, deleted) are generated again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from callbacks.writer import ResumableWriter
from saemnesia.generation import GenerationOutput, HookedDiffusion
from saemnesia.shards import ShardManifest, ShardRecord, ShardSink, sample_key, scan_shards, stored_prompt_ids

SHARD_PREFIX = "shard-r"
"""Shard names start with this, then the writing rank: `shard-r{rank}-{index:06d}.tar`."""


def write_samples(sink: ShardSink, output: GenerationOutput, hookpoint: str, half: str) -> None:
    """Write one batch's captured maps to `sink`: one sample per (image, captured step), a prompt's samples together."""
    # float16 CPU numpy as stored: the sink then skips its own conversion (a float32 round trip per map).
    for item, maps in zip(output.items, output.activations.numpy()):  # maps: [S, H*W, C]
        for act, step, timestep in zip(maps, output.steps, output.timesteps):
            meta = {"object": item.object, "style": item.style, "step": step, "timestep": timestep,
                    "prompt_id": item.prompt_id, "prompt": item.prompt, "seed": item.seed,
                    "hookpoint": hookpoint, "half": half}
            sink.write(sample_key(item.prompt_id, step), act, meta)


class ActivationShardWriter(ResumableWriter):
    """Per-rank, size-capped float16 WebDataset shards of the captured activations, plus `manifest.json`."""

    needs_capture = True
    manifest_suffix = ".json"

    def __init__(self, output_dir: str, max_samples: int = 1000, max_bytes: int = 1 << 30):
        """
        Args:
            output_dir: Shard folder, e.g. `runs/<experiment>/activations`; an interrupted run resumes in it.
            max_samples: A shard is closed after this many samples (at the next prompt boundary).
            max_bytes: ... or after this many bytes. SD1.5 maps are 640 KiB, so 1 GiB holds ~1600 samples.
        """
        super().__init__(output_dir)
        if min(max_samples, max_bytes) < 1:  # refused before any image is generated
            raise ValueError(f"ActivationShardWriter max_samples and max_bytes (trainer.callbacks) must be >= 1, got "
                             f"{max_samples} and {max_bytes}.")
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.sink: ShardSink | None = None
        self.rank_manifest: ShardManifest | None = None

    def resume(self, trainer: pl.Trainer, pl_module: HookedDiffusion) -> set[str]:
        """Refuse earlier rank manifests that describe other activations; the prompt ids in complete shards."""
        wanted = {"hookpoint": pl_module.hparams.hookpoint, "num_steps": pl_module.hparams.num_steps,
                  "concepts": trainer.datamodule.vocabulary}
        for path in self.rank_manifests():
            earlier = ShardManifest.load(path)
            differing = [name for name, value in wanted.items() if getattr(earlier, name) != value]
            if differing:
                raise ValueError(f"{path} describes activations with other {differing} than this run's; "
                                 "resume with the same model and data options, or write to another folder.")
        return stored_prompt_ids(self.folder, SHARD_PREFIX)

    def claim(self, pl_module: HookedDiffusion) -> None:
        """Delete the temporary file of a shard that an interrupted run left unfinished: its prompts are redone."""
        for unfinished in self.folder.glob(f"{SHARD_PREFIX}*.tar.tmp"):
            unfinished.unlink()

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
        self.rank_manifest.save(self.folder, self.rank_manifest_path(trainer.global_rank).name)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.sink is not None:
            self._save_rank_manifest(trainer, self.sink.close())
            self.sink = None
        super().on_predict_end(trainer, pl_module)

    def merge(self, rank_manifests: list[Path]) -> None:
        """`manifest.json`: the rank manifests' common description, listing every complete shard in the folder."""
        if not rank_manifests:
            raise RuntimeError(f"{self.folder} has no rank manifests to merge; no activations were written.")
        merged = ShardManifest.merge([ShardManifest.load(path) for path in rank_manifests])
        # The folder is the truth: also list a shard completed just before a crash kept its rank from listing it.
        merged.shards = scan_shards(self.folder, SHARD_PREFIX)
        merged.save(self.folder)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.sink is not None:  # keep the unfinished shard a temporary file; the next run deletes it
            self.sink.__exit__(type(exception), exception, exception.__traceback__)
            self.sink = None
