"""Training throughput of `SAEModule` under a Lightning `Trainer` against a plain PyTorch loop doing the same math.

For each objective it prints tokens/s of both paths in the same process, their ratio (target ≥ 0.9: Lightning
should cost under 10 %), and the fraction of this machine's measured dense matmul FLOP/s each path reaches. Then it
times the two kernel choices of the unsupervised step in the same process: the encoder backward, sparse (through the
selected latents only) against dense, without and with AuxK at its widest, the embedding-bag decoder against a
dense `[N, L] @ [L, d]` decode, and the BatchTopK from each token's candidates (`SparseAutoencoder.training_topk`)
against one top-k over all `N·L` entries. The last line is one JSON object with every figure.

    python -m benchmarks.sae_step                                   # CPU, published size, both objectives
    python -m benchmarks.sae_step --device cuda --precision bf16-mixed --steps 50 --warmup 5
    python -m benchmarks.sae_step --objective unsupervised --encoder_backward dense --kernel_repeats 0

Defaults are the published size (d 1280, 20480 latents, k 32, batches of 4096 tokens) with few steps, because
a CPU step at that size is slow; on a GPU raise `--steps`.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Literal, NamedTuple

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from benchmarks.common import (
    benchmark_main,
    machine_description,
    matmul_flops_per_second,
    synchronizer,
    time_call,
    time_interleaved,
)
from saemnesia.concepts import NO_STYLE, UNLEARNCANVAS_OBJECTS, UNLEARNCANVAS_STYLES, ConceptVocabulary
from saemnesia.objectives import SupervisedObjective, UnsupervisedObjective
from saemnesia.sae import EncoderBackward, SaeConfig, SparseAutoencoder
from saemnesia.training import SAEModule

Objective = Literal["unsupervised", "supervised"]
Precision = Literal["32-true", "bf16-mixed"]
VOCABULARY = ConceptVocabulary(objects=tuple(UNLEARNCANVAS_OBJECTS), styles=tuple(UNLEARNCANVAS_STYLES))
# Explicit assignment, so the supervised fit runs no assignment pass (which would need a datamodule).
CONCEPT_LATENTS = {name: latent for latent, name in enumerate(VOCABULARY.concepts)}
NUM_STEPS_LABEL = 50  # sampling steps of the published fine-tuning data; only labels the random samples
DISTINCT_BATCHES = 2  # random batches cycled through; enough that no step reuses the previous step's inputs
LEARNING_RATES = {"unsupervised": 4e-4, "supervised": 5e-6}  # published (docs/method.md §2)


@dataclass
class BenchmarkConfig:
    """Sizes and settings of one benchmark run (command-line options of the same names)."""

    d: int = 1280
    """Activation width d_in. Published: 1280 (SD1.5 up_blocks.1.attentions.1)."""
    latents: int = 20480
    """Number of SAE latents L. Published: 20480 (expansion 16)."""
    k: int = 32
    """TopK. Published: 32."""
    tokens: int = 4096
    """Tokens per batch. Published unsupervised batch: 4096."""
    tokens_per_sample: int = 256
    """Tokens per map in supervised batches (16×16 at 512 px); a batch holds tokens / tokens_per_sample maps."""
    steps: int = 5
    """Timed optimizer steps per path."""
    warmup: int = 2
    """Untimed steps before them (Adam state, b_dec median init, allocator and kernel warm-up); at least 1."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where both paths run."""
    precision: Precision = "32-true"
    """Lightning precision; the plain loop uses the matching autocast. The matmul yardstick uses its dtype."""
    objective: Literal["unsupervised", "supervised", "both"] = "both"
    """Which objective(s) to benchmark."""
    batch_topk: bool = True
    """BatchTopK for the unsupervised SAE, as the published pre-training (supervised always uses per-token TopK)."""
    grad_clip: float = 1.0
    """Gradient-norm clipping in both paths; 0 disables it."""
    dead_feature_threshold: int = 10_000_000
    """Tokens without firing before a latent is dead (AuxK runs only once some are). Published: 10M."""
    encoder_backward: EncoderBackward = "sparse"
    """Encoder gradient of the unsupervised objective in both paths (`UnsupervisedObjective.encoder_backward`)."""
    kernel_repeats: int = 3
    """Timed rounds of the kernel comparisons, each calling every candidate once (after one untimed round); the
    median is reported; 0 skips them."""
    seed: int = 0
    """Seed of the data and of both SAEs' initialisation (the two paths start from identical weights)."""

    def __post_init__(self) -> None:
        # --d, --latents and --k are checked by SparseAutoencoder, --steps by time_call; these are the script's own.
        if self.kernel_repeats < 0:
            raise ValueError(f"--kernel_repeats must be 0 (skip) or a number of calls; got {self.kernel_repeats}.")
        if self.warmup < 1:
            raise ValueError(f"--warmup must be at least 1 (the first step initialises b_dec); got {self.warmup}.")
        if min(self.tokens, self.tokens_per_sample) < 1 or self.tokens % self.tokens_per_sample:
            raise ValueError(f"--tokens ({self.tokens}) must be a positive multiple of --tokens_per_sample "
                             f"({self.tokens_per_sample}) so supervised batches hold whole maps.")
        if self.objective != "unsupervised" and self.latents < len(CONCEPT_LATENTS):
            raise ValueError(f"--latents must be at least {len(CONCEPT_LATENTS)} for the supervised objective (one "
                             "latent per UnlearnCanvas concept).")

    @property
    def objectives(self) -> list[Objective]:
        return ["unsupervised", "supervised"] if self.objective == "both" else [self.objective]

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    def sae_config(self, objective: Objective) -> SaeConfig:
        return SaeConfig(num_latents=self.latents, k=self.k, batch_topk=self.batch_topk and objective == "unsupervised")

    def objective_module(self, objective: Objective) -> UnsupervisedObjective | SupervisedObjective:
        """The objective both paths train with; the supervised one with an explicit assignment (no assignment pass)."""
        if objective == "unsupervised":
            return UnsupervisedObjective(encoder_backward=self.encoder_backward,
                                         dead_feature_threshold=self.dead_feature_threshold)
        return SupervisedObjective(concept_latents=CONCEPT_LATENTS)

    def autocast(self) -> torch.autocast:
        """What Lightning wraps the forward in at this precision: bf16 autocast on the device, or (disabled) nothing."""
        return torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.precision == "bf16-mixed")


class RunResult(NamedTuple):
    """One path's timed steps and the SAE it trained."""

    seconds: float
    """Wall time of the `steps` timed steps."""
    sae: SparseAutoencoder
    """The trained SAE, to check that both paths computed the same thing."""


def random_batches(config: BenchmarkConfig, objective: Objective) -> list[dict[str, Tensor]]:
    """Batches as SAEModule's steps see them (float32, after `on_after_batch_transfer`), already on the device (no
    transfer is timed)."""
    generator = torch.Generator().manual_seed(config.seed)
    batches = []
    for _ in range(DISTINCT_BATCHES):
        if objective == "unsupervised":
            batch = {"act": torch.randn(config.tokens, config.d, generator=generator)}  # token level: [N, d]
        else:
            samples = config.tokens // config.tokens_per_sample
            batch = {"act": torch.randn(samples, config.tokens_per_sample, config.d, generator=generator),  # [B, N, d]
                     "object": torch.randint(len(VOCABULARY.objects), (samples,), generator=generator),
                     "style": torch.randint(NO_STYLE, len(VOCABULARY.styles), (samples,), generator=generator),
                     "step": torch.randint(NUM_STEPS_LABEL, (samples,), generator=generator)}
        batches.append({key: value.to(config.device) for key, value in batch.items()})
    return batches


def cycled(batches: list[dict[str, Tensor]], length: int) -> list[dict[str, Tensor]]:
    """`length` items cycling through pre-made batches; with `batch_size=None` a DataLoader yields them as they are."""
    return [batches[index % len(batches)] for index in range(length)]


class StepTimer(pl.Callback):
    """Wall time from the end of batch `warmup - 1` to the end of batch `last` of the (single) epoch: the timed
    steps with everything Lightning does between them, as the plain loop's timing includes its batch fetches."""

    def __init__(self, warmup: int, last: int, synchronize: Callable[[], None]):
        self.ends, self.synchronize = {warmup - 1: float("nan"), last: float("nan")}, synchronize

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if batch_idx in self.ends:  # synchronised only here, so the device queue stays full between
            self.synchronize()
            self.ends[batch_idx] = time.perf_counter()


def run_lightning(config: BenchmarkConfig, objective: Objective, batches: list[dict[str, Tensor]]) -> RunResult:
    """The real `fit` path: `SAEModule` under a `Trainer`, fed by an in-memory DataLoader."""
    torch.manual_seed(config.seed)
    schedule = "linear_decay" if objective == "unsupervised" else "constant"
    module = SAEModule(d_in=config.d, activations_hookpoint="benchmark", vocabulary=VOCABULARY, lr_schedule=schedule,
                       objective=config.objective_module(objective), sae=config.sae_config(objective),
                       lr=LEARNING_RATES[objective])
    timer = StepTimer(config.warmup, config.total_steps - 1, synchronizer(config.device))
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(accelerator="gpu" if config.device == "cuda" else "cpu", devices=1, callbacks=[timer],
                             precision=config.precision, max_steps=config.total_steps,
                             gradient_clip_val=config.grad_clip or None, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             default_root_dir=root)
        loader = DataLoader(cycled(batches, config.total_steps), batch_size=None)
        trainer.fit(module, train_dataloaders=loader)
    return RunResult(timer.ends[config.total_steps - 1] - timer.ends[config.warmup - 1], module.sae)


def run_plain(config: BenchmarkConfig, objective: Objective, batches: list[dict[str, Tensor]]) -> RunResult:
    """The same math without Lightning, in the order Lightning runs it: the objective's forward (under autocast for
    mixed precision, moving its dead-latent counters), backward, gradient projection, clipping, Adam, decoder
    renormalisation, LR schedule."""
    torch.manual_seed(config.seed)
    sae = SparseAutoencoder(config.d, config.sae_config(objective)).to(config.device)
    loss = config.objective_module(objective)
    loss.bind(sae, VOCABULARY)
    optimizer = torch.optim.Adam(sae.parameters(), lr=LEARNING_RATES[objective])
    unsupervised = objective == "unsupervised"
    # The module's linear decay to 0 over max_steps is torch's LinearLR; the supervised schedule is constant.
    schedule = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.0, config.total_steps) if unsupervised else None
    renormalise = loss.renormalises_decoder
    if unsupervised:
        sae.init_b_dec_to_geometric_median(batches[0]["act"])  # as SAEModule does on its first batch
    batch_stream = iter(cycled(batches, config.total_steps))

    def step() -> None:
        batch = next(batch_stream)
        optimizer.zero_grad()
        with config.autocast():
            terms = loss(sae, batch)
        terms.loss.backward()
        if renormalise:
            sae.remove_gradient_parallel_to_decoder_directions()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), config.grad_clip)
        optimizer.step()
        if renormalise:
            sae.set_decoder_norm_to_unit_norm()
        if schedule is not None:
            schedule.step()

    timing = time_call(step, warmup=config.warmup, repeats=config.steps, device=config.device)
    return RunResult(timing.seconds, sae)


def step_flops(config: BenchmarkConfig, objective: Objective) -> int:
    """Dense matmul FLOPs of one step: the encoder matmul `2·N·d·L` forward and, unless the sparse encoder backward
    skips them (unsupervised objective), twice that backward (gradients of the weight and of the input, which b_dec
    needs); the sparse decode, the sparse backward and the elementwise work are left out."""
    dense_backward = objective == "supervised" or config.encoder_backward == "dense"
    return (3 if dense_backward else 1) * 2 * config.tokens * config.d * config.latents


def dense_decode(sae: SparseAutoencoder, top_acts: Tensor, top_indices: Tensor) -> Tensor:
    """The decode without the embedding bag: scatter the code into a dense `[N, L]` tensor and multiply."""
    code = top_acts.new_zeros(*top_acts.shape[:-1], sae.num_latents).scatter(-1, top_indices, top_acts)  # [N, L]
    return code @ sae.W_dec + sae.b_dec  # [N, d]


def kernel_comparison(config: BenchmarkConfig) -> dict[str, float]:
    """Median seconds per forward + backward of the unsupervised loss with each encoder backward, without AuxK and
    with every latent dead (AuxK at its widest, k_aux = d/2), of the decode alone as an embedding bag versus
    `dense_decode`, and (for a BatchTopK SAE) of the batch top-k selection alone, timed in interleaved rounds; plus the
    largest relative difference between the two encoders' gradients."""
    torch.manual_seed(config.seed)
    sae = SparseAutoencoder(config.d, config.sae_config("unsupervised")).to(config.device)
    x = random_batches(config, "unsupervised")[0]["act"]  # [N, d]
    all_dead = torch.ones(sae.num_latents, dtype=torch.bool, device=config.device)
    with torch.no_grad():
        top_acts, top_indices = sae.encode(x)  # [N, K]
    top_acts.requires_grad_()
    grad_out = torch.randn_like(x)  # [N, d]

    def loss_gradients(encoder_backward: EncoderBackward, dead_mask: Tensor | None) -> Sequence[Tensor]:
        with config.autocast():
            out = sae(x, dead_mask=dead_mask, encoder_backward=encoder_backward)
        return torch.autograd.grad(out.fvu + out.auxk_loss / 32, list(sae.parameters()))

    def decoder_gradients(decode: Callable[..., Tensor]) -> Sequence[Tensor]:
        with config.autocast():
            out = decode(sae, top_acts, top_indices)  # [N, d]
        return torch.autograd.grad(out, [top_acts, sae.W_dec], grad_out)

    cases = {f"{name}_{backward}": partial(loss_gradients, backward, dead_mask)
             for name, dead_mask in (("encoder", None), ("auxk", all_dead)) for backward in ("sparse", "dense")}
    cases |= {"decoder_sparse": partial(decoder_gradients, SparseAutoencoder.decode),
              "decoder_dense": partial(decoder_gradients, dense_decode)}
    if sae.cfg.batch_topk:  # the pooled top-k from each token's candidates against one over all N·L entries
        with torch.no_grad():
            pre_acts = sae.pre_acts(x)  # [N, L]
        keep = sae.cfg.k * pre_acts.shape[0]
        cases |= {"batch_topk_sparse": partial(sae.training_topk, pre_acts),
                  "batch_topk_dense": partial(pre_acts.flatten().topk, keep, sorted=False)}
    medians = time_interleaved(cases, warmup=1, repeats=config.kernel_repeats, device=config.device)
    seconds = {f"{name}_s": value for name, value in medians.items()}
    difference = max(float((sparse - dense).abs().max() / dense.abs().max().clamp_min(1e-30))
                     for sparse, dense in zip(cases["auxk_sparse"](), cases["auxk_dense"]()))
    kernels = [name for name in ("encoder", "auxk", "decoder", "batch_topk") if f"{name}_sparse_s" in seconds]
    return {**seconds, **{f"{name}_dense_over_sparse": seconds[f"{name}_dense_s"] / seconds[f"{name}_sparse_s"]
                          for name in kernels}, "max_relative_gradient_difference": difference}


def run_benchmark(config: BenchmarkConfig) -> dict[str, Any]:
    """Both paths for each objective, and the matmul yardstick; returns the JSON-ready report."""
    dtype = torch.bfloat16 if config.precision == "bf16-mixed" else torch.float32
    peak = matmul_flops_per_second(config.tokens, config.d, config.latents, config.device, dtype)
    report: dict[str, Any] = {"benchmark": "sae_step", "config": asdict(config), "objectives": {},
                              "machine": machine_description(config.device), "matmul_flops_per_s": peak}
    print(f"dense matmul [{config.tokens}, {config.d}] x [{config.d}, {config.latents}] {dtype}: "
          f"{peak / 1e9:.1f} GFLOP/s")
    for objective in config.objectives:
        flops = step_flops(config, objective)
        batches = random_batches(config, objective)
        module, plain = run_lightning(config, objective, batches), run_plain(config, objective, batches)
        figures = {"step_flops": flops, "module_vs_plain": plain.seconds / module.seconds}
        for name, result in (("module", module), ("plain", plain)):
            figures[f"{name}_tokens_per_s"] = config.steps * config.tokens / result.seconds
            figures[f"{name}_matmul_fraction"] = flops * config.steps / result.seconds / peak
        report["objectives"][objective] = figures
        print(f"{objective}: SAEModule {figures['module_tokens_per_s']:.0f} tokens/s, plain loop "
              f"{figures['plain_tokens_per_s']:.0f} tokens/s, ratio {figures['module_vs_plain']:.3f} (target >= 0.9); "
              f"matmul fraction {figures['module_matmul_fraction']:.3f} (plain {figures['plain_matmul_fraction']:.3f})")
    if config.kernel_repeats:
        report["kernels"] = kernels = kernel_comparison(config)
        for name, what in (("encoder", "encoder backward"), ("auxk", "encoder backward, AuxK over d/2 latents"),
                           ("decoder", "decoder (embedding bag vs dense)"),
                           ("batch_topk", "BatchTopK (from each token's candidates vs over all entries)")):
            if f"{name}_sparse_s" not in kernels:
                continue
            print(f"{what}: sparse {kernels[f'{name}_sparse_s']:.3f} s, dense {kernels[f'{name}_dense_s']:.3f} s "
                  f"per call, dense / sparse {kernels[f'{name}_dense_over_sparse']:.2f}")
        print(f"largest relative gradient difference, sparse vs dense encoder: "
              f"{kernels['max_relative_gradient_difference']:.1e}")
    return report


main = benchmark_main(BenchmarkConfig, run_benchmark, __doc__)


if __name__ == "__main__":
    main()
