"""SAEModule and its objectives' state: dead-latent counters (also across 2 gloo processes) moved without a host
sync, the concept assignment against a naive computation, bf16-mixed training."""

import math
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from saemnesia.concepts import NO_STYLE, ConceptVocabulary, assign_latents
from saemnesia.assignment import estimate_concept_latents
from saemnesia.objectives import SupervisedObjective, UnsupervisedObjective
from saemnesia.sae import SaeConfig, SparseAutoencoder
from saemnesia.stats import ConceptStats


def counters(num_latents: int, threshold: int, device: str = "cpu") -> UnsupervisedObjective:
    objective = UnsupervisedObjective(dead_feature_threshold=threshold)
    objective.bind(SparseAutoencoder(4, SaeConfig(num_latents=num_latents, k=1), device=device), None)
    return objective


def test_dead_latent_counters_count_tokens_since_last_firing():
    tracker = counters(num_latents=5, threshold=6)
    tracker.record_firing(torch.tensor([[0, 1], [0, 2], [0, 1]]), torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 2.0]]), 3)
    # 3 tokens; latents 0 and 1 fired, latent 2 was selected with value 0, 3 and 4 never seen.
    assert tracker.tokens_since_fired.tolist() == [0, 0, 3, 3, 3]
    tracker.record_firing(torch.tensor([3, 4, 3]), torch.ones(3), 3)  # a flat code (batch TopK) of 3 tokens
    assert tracker.tokens_since_fired.tolist() == [3, 3, 6, 0, 0]
    assert tracker.dead_mask.tolist() == [False, False, True, False, False]


@pytest.mark.parametrize("variant", [dict(batch_topk=True), dict(sample_topk=True), dict(multi_topk=True)])
def test_an_unsupervised_training_step_needs_no_host_sync(variant):
    """On the meta device a tensor has no values, so any read of one on the host (`int`, `.item()`, a boolean mask's
    size) fails: forward, AuxK, backward and the counters must run without one."""
    objective = counters(num_latents=32, threshold=0, device="meta")  # every latent dead: AuxK runs
    sae = SparseAutoencoder(8, SaeConfig(num_latents=32, k=3, **variant), device="meta")
    objective(sae, {"act": torch.randn(2, 5, 8, device="meta")}).loss.backward()
    assert sae.encoder.weight.grad.shape == (32, 8) and objective.tokens_since_fired.is_meta


def _two_rank_tracker(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    tracker = counters(num_latents=4, threshold=5)
    # Latent 3 fires on rank 1 only; latent 2 on no rank.
    indices = torch.tensor([[0, 1]] * 2) if rank == 0 else torch.tensor([[0, 3]] * 3)
    tracker.record_firing(indices, torch.ones_like(indices, dtype=torch.float), len(indices))
    results[rank] = tracker.tokens_since_fired.tolist()
    dist.destroy_process_group()


def test_a_latent_firing_on_one_rank_only_is_alive_on_every_rank():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_two_rank_tracker, args=(29511, results), nprocs=2)
        # 5 tokens in all: latent 1 fired on rank 0 only, latent 3 on rank 1 only; latent 2 never.
        assert results[0] == results[1] == [0, 0, 5, 0]


def test_assignment_finds_the_latent_each_concept_drives():
    """Concept c's samples point along latent `planted[c]`'s encoder row, so that latent must be assigned to c."""
    torch.manual_seed(0)
    vocabulary = ConceptVocabulary(objects=("Bears", "Cats"), styles=("Cubism", "Monet"))
    sae = SparseAutoencoder(16, SaeConfig(num_latents=32, k=4))
    planted = {"Bears": 7, "Cats": 20, "Cubism": 3, "Monet": 11}
    directions = torch.nn.functional.normalize(sae.encoder.weight.detach(), dim=1)

    def batch(size: int) -> dict[str, torch.Tensor]:
        objects = torch.randint(0, 2, (size,))
        styles = torch.randint(-1, 2, (size,))
        x = 0.1 * torch.randn(size, 6, 16)
        x += 3.0 * directions[[planted[vocabulary.objects[o]] for o in objects]][:, None]
        for row, style in enumerate(styles.tolist()):
            if style != NO_STYLE:
                x[row] += 3.0 * directions[planted[vocabulary.styles[style]]]
        return {"act": x.half(), "object": objects, "style": styles, "step": torch.randint(0, 2, (size,))}  # as stored

    assigned = estimate_concept_latents(sae, (batch(64) for _ in range(4)), vocabulary, num_steps=2, num_batches=4)
    assert assigned == planted


def naive_assignment(sae: SparseAutoencoder, batches: list[dict[str, torch.Tensor]], vocabulary: ConceptVocabulary,
                     num_steps: int) -> dict[str, int]:
    """docs/method.md §2.2 steps 1-3 written out: each sample's dense code averaged over its tokens, means per (concept,
    step), `ConceptStats` importance per step where every concept has samples, averaged over those steps."""
    codes = {(c, t): [] for c in range(len(vocabulary.concepts)) for t in range(num_steps)}
    for batch in batches:
        for sample in range(len(batch["act"])):
            x = batch["act"][sample].float()
            acts, indices = sae.encode(x)  # [N, k]
            dense = torch.zeros(len(x), sae.num_latents).scatter(1, indices, acts).double().mean(0)  # [L]
            step = int(batch["step"][sample])
            codes[int(batch["object"][sample]), step].append(dense)
            if batch["style"][sample] != NO_STYLE:
                codes[len(vocabulary.objects) + int(batch["style"][sample]), step].append(dense)
    scores = []
    for t in range(num_steps):
        per_concept = [codes[c, t] for c in range(len(vocabulary.concepts))]
        if all(per_concept):
            means = torch.stack([torch.stack(images).mean(0) for images in per_concept])[:, None]  # [C, 1, L]
            counts = torch.tensor([len(images) for images in per_concept])
            scores.append(ConceptStats(vocabulary.concepts, means, counts).importance_all()[:, 0])
    return assign_latents(torch.stack(scores).mean(0), vocabulary)


def test_assignment_equals_the_naive_computation():
    """Random codes, uneven counts per (concept, step) and a step without every concept."""
    torch.manual_seed(0)
    vocabulary = ConceptVocabulary(objects=("Bears", "Cats", "Dogs"), styles=("Cubism", "Monet"))
    sae = SparseAutoencoder(16, SaeConfig(num_latents=64, k=4))
    batches = [{"act": torch.randn(12, 5, 16).half(), "object": torch.randint(0, 3, (12,)),
                "style": torch.randint(-1, 2, (12,)), "step": torch.randint(0, 3, (12,))} for _ in range(5)]
    batches[0]["step"][:] = 3  # step 3: too few samples to show every concept
    expected = naive_assignment(sae, batches, vocabulary, num_steps=4)
    assert estimate_concept_latents(sae, batches, vocabulary, num_steps=4) == expected
    assert estimate_concept_latents(sae, iter(batches), vocabulary, 4, num_batches=5) == expected


def test_assignment_needs_every_concept_at_some_step():
    vocabulary = ConceptVocabulary(objects=("Bears", "Cats"))
    sae = SparseAutoencoder(4, SaeConfig(num_latents=8, k=2))
    only_bears = {"act": torch.randn(3, 2, 4), "object": torch.zeros(3, dtype=torch.long),
                  "style": torch.full((3,), NO_STYLE), "step": torch.zeros(3, dtype=torch.long)}
    with pytest.raises(ValueError, match=r"model.objective.assignment_batches=1\) do not show every concept"):
        estimate_concept_latents(sae, [only_bears], vocabulary, num_steps=1, num_batches=1)


def test_init_from_an_sae_of_another_width_fails_naming_both(tmp_path):
    from saemnesia.training import SAEModule

    SparseAutoencoder(16, SaeConfig(expansion_factor=2)).save(tmp_path / "unet.mid_block")
    with pytest.raises(ValueError, match=r"init_from .* d_in=16 but the activation data has d_in=8"):
        SAEModule(d_in=8, activations_hookpoint="unet.mid_block", init_from=str(tmp_path))
    with pytest.raises(ValueError, match="needs the concept vocabulary"):
        SAEModule(d_in=16, activations_hookpoint="unet.mid_block", init_from=str(tmp_path),
                  objective=SupervisedObjective())


class FirstLoss(pl.Callback):
    """Keeps the loss of the first training step (before any update, so runs from the same seed compare)."""

    def __init__(self) -> None:
        self.loss: float | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: dict[str, torch.Tensor],
                           batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if self.loss is None:
            self.loss = float(outputs["loss"])


def first_step_loss(objective: str, precision: str, root: Path, act_dtype: torch.dtype = torch.float16
                    ) -> tuple[float, SparseAutoencoder]:
    """Loss of the first step on a batch of float16 values, delivered as `act_dtype` (the datamodule: float16)."""
    from saemnesia.training import SAEModule

    vocabulary = ConceptVocabulary(objects=("Bears", "Cats"), styles=("Cubism",))
    generator = torch.Generator().manual_seed(0)
    act = torch.randn(4, 6, 16, generator=generator).half().to(act_dtype)  # [B, N, d]
    batch = {"act": act, "object": torch.tensor([0, 1, 0, 1]),
             "style": torch.tensor([0, NO_STYLE, NO_STYLE, 0]), "step": torch.zeros(4, dtype=torch.long)}
    if objective == "unsupervised":
        batch = {"act": batch["act"].reshape(24, 16)}  # token-level batch: [N, d]
    torch.manual_seed(0)
    objectives = {"unsupervised": UnsupervisedObjective(dead_feature_threshold=0),  # every latent dead: AuxK runs
                  "supervised": SupervisedObjective(concept_latents={"Bears": 0, "Cats": 1, "Cubism": 2})}
    module = SAEModule(d_in=16, activations_hookpoint="unet.mid_block", vocabulary=vocabulary,
                       objective=objectives[objective], sae=SaeConfig(num_latents=64, k=4), lr_schedule="constant")
    recorder = FirstLoss()
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=2, callbacks=[recorder],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root)
    trainer.fit(module, train_dataloaders=DataLoader([batch, batch], batch_size=None))
    return recorder.loss, module.sae


@pytest.mark.parametrize("objective", ["unsupervised", "supervised"])
def test_bf16_mixed_precision_trains_with_a_loss_close_to_float32(objective, tmp_path):
    """Lightning's bf16-mixed on the CPU runs the step under bf16 autocast: the loss must stay finite and within bf16
    accuracy of the float32 run from the same weights and batch, and the weights must stay float32 and finite."""
    full_loss, _ = first_step_loss(objective, "32-true", tmp_path)
    mixed_loss, sae = first_step_loss(objective, "bf16-mixed", tmp_path)
    assert math.isfinite(mixed_loss) and mixed_loss == pytest.approx(full_loss, rel=3e-2)
    for name, parameter in sae.named_parameters():
        assert parameter.dtype == torch.float32 and torch.isfinite(parameter).all(), name


@pytest.mark.parametrize("objective", ["unsupervised", "supervised"])
def test_float16_batches_train_like_float32_batches_of_the_same_values(objective, tmp_path):
    """The module converts the stored float16 activations to its parameters' dtype on its device."""
    from_float16, _ = first_step_loss(objective, "32-true", tmp_path, act_dtype=torch.float16)
    from_float32, _ = first_step_loss(objective, "32-true", tmp_path, act_dtype=torch.float32)
    assert from_float16 == from_float32


def test_the_assignment_and_counters_are_module_state_restored_with_the_checkpoint():
    """What `--ckpt_path` restores: the supervised objective's assignment (so resuming does not estimate it again) and
    the unsupervised dead-latent counters travel in the state dict; the checkpoint also names the assignment."""
    from saemnesia.training import SAEModule

    vocabulary = ConceptVocabulary(objects=("Bears", "Cats"), styles=("Cubism",))
    mapping = {"Bears": 5, "Cats": 1, "Cubism": 9}
    common = dict(d_in=8, activations_hookpoint="unet.mid_block", vocabulary=vocabulary, sae=SaeConfig(num_latents=16, k=2))
    trained = SAEModule(**common, objective=SupervisedObjective(concept_latents=mapping))
    resumed = SAEModule(**common, objective=SupervisedObjective())
    assert resumed.concept_latents is None
    resumed.load_state_dict(trained.state_dict())
    assert resumed.concept_latents == mapping
    checkpoint = {}
    resumed.on_save_checkpoint(checkpoint)
    assert checkpoint == {"concept_latents": mapping}

    unsupervised, restored = SAEModule(**common), SAEModule(**common)
    unsupervised.objective.tokens_since_fired[3] = 7
    restored.load_state_dict(unsupervised.state_dict())
    assert restored.objective.tokens_since_fired.tolist() == [0, 0, 0, 7] + [0] * 12
