"""The ToyCanvas text-to-image model: a Stable Diffusion 1.5 look-alike trained from scratch on renders.

Two Lightning runs build it. `ToyVAEModule` trains the autoencoder (32 px images ↔ 4×8×8 latents) and exports
it with its latent scaling factor; `ToyDiffusionModule` trains the UNet and the CLIP text encoder (the offline
character tokenizer) on the frozen VAE's latents and exports a `StableDiffusionPipeline` folder with a DDIM
scheduler, which `saemnesia.pipelines.load_pipeline` reads like any Stable Diffusion checkpoint. The networks
come from `build_tiny_pipeline`, so the UNet has SD1.5's block layout (`unet.up_blocks.1.attentions.1`). Its
batches are renders already encoded by the VAE (`saemnesia.toy.latents`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
from torch import Tensor

from saemnesia.io import replace_folder
from saemnesia.pipelines import TinyPipelineConfig, build_tiny_pipeline
from saemnesia.toy.fitting import adamw_warmup_cosine

# Lightning checkpoints store the hyper-parameters, this dataclass included; `load_from_checkpoint` reads
# them with `torch.load(weights_only=True)`.
torch.serialization.add_safe_globals([TinyPipelineConfig])


def toy_pipeline_config(seed: int = 0) -> TinyPipelineConfig:
    """The shipped architecture: UNet `(32, 64, 64)` with a 64-wide, 2-layer text encoder, and a 3-level VAE
    (factor 4) so that 32 px images become 8×8 latents and `up_blocks.1` works on 4×4 tokens."""
    return TinyPipelineConfig(seed=seed, vae_block_out_channels=(32, 64, 64), sample_size=8)


def to_vae_range(images: Tensor) -> Tensor:
    """Renders in [0, 1] → the VAE's [-1, 1]."""
    return images * 2 - 1


class ToyVAEModule(pl.LightningModule):
    """Trains the pipeline's `AutoencoderKL` to reconstruct renders (MSE plus a small KL term)."""

    def __init__(self, pipeline: TinyPipelineConfig | None = None, lr: float = 1e-3, weight_decay: float = 0.0,
                 warmup_steps: int = 50, final_lr_fraction: float = 0.1, kl_weight: float = 1e-6,
                 scaling_batches: int = 8):
        """
        Args:
            pipeline: Architecture (only the VAE part is used here); default `toy_pipeline_config()`.
            lr: Peak AdamW learning rate.
            weight_decay: AdamW weight decay.
            warmup_steps: Linear warm-up steps before the cosine decay.
            final_lr_fraction: Learning rate at `trainer.max_steps`, as a fraction of `lr`.
            kl_weight: Weight of the KL divergence summed over a latent, relative to the squared error summed
                over the image's pixels (Stable Diffusion's VAE used 1e-6): just enough to keep latents smooth.
            scaling_batches: Validation batches whose latent standard deviation sets `scaling_factor` on export.
        """
        super().__init__()
        self.save_hyperparameters()
        self.vae = build_tiny_pipeline(pipeline or toy_pipeline_config()).vae

    def _losses(self, images: Tensor, sample: bool) -> tuple[Tensor, Tensor]:
        posterior = self.vae.encode(images).latent_dist
        latents = posterior.sample() if sample else posterior.mode()  # [B, 4, h, w]
        reconstruction_error = F.mse_loss(self.vae.decode(latents).sample, images)
        kl = posterior.kl().mean() / images[0].numel()  # per pixel, like the squared error
        return reconstruction_error, kl

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        mse, kl = self._losses(to_vae_range(batch["image"]), sample=True)
        self.log_dict({"train/mse": mse, "train/kl": kl}, prog_bar=True)
        return mse + self.hparams.kl_weight * kl

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        mse, _ = self._losses(to_vae_range(batch["image"]), sample=False)
        self.log("val/mse", mse, batch_size=len(batch["image"]))

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_warmup_cosine(self.vae.parameters(), self.hparams.lr, self.hparams.weight_decay,
                                   self.trainer.max_steps, self.hparams.warmup_steps, self.hparams.final_lr_fraction)

    @torch.no_grad()
    def latent_std(self, batches: list[dict[str, Any]]) -> float:
        """Standard deviation of sampled latents over `batches` of renders."""
        latents = [self.vae.encode(to_vae_range(batch["image"].to(self.device))).latent_dist.sample()
                   for batch in batches]
        return float(torch.cat(latents).std())

    def export(self, folder: Path) -> None:
        """Save the VAE (diffusers folder, safetensors) with `scaling_factor = 1 / latent std`, as Stable
        Diffusion does, so the UNet sees latents of unit variance."""
        loader = self.trainer.datamodule.val_dataloader()
        batches = [batch for _, batch in zip(range(self.hparams.scaling_batches), loader)]
        self.vae.register_to_config(scaling_factor=1.0 / self.latent_std(batches))
        replace_folder(folder, lambda staging: self.vae.save_pretrained(staging, safe_serialization=True))


def load_vae(folder: str | os.PathLike) -> AutoencoderKL:
    """A VAE folder written by `ToyVAEModule`, frozen. It is put in train mode, as Lightning expects of every
    module when fitting starts: it has no dropout or batch norm, so the mode changes nothing."""
    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"model.vae folder {folder} holds no trained VAE (config.json); run "
                                "`python cli.py fit -c configs/toy/toy_vae.yaml` first.")
    return AutoencoderKL.from_pretrained(folder, local_files_only=True).requires_grad_(False).train()


class ToyDiffusionModule(pl.LightningModule):
    """Trains the UNet (and the text encoder) to predict the noise of VAE latents, with classifier-free prompt
    dropout and min-SNR loss weighting; `WarmupEMA` (in the config) averages the exported weights."""

    def __init__(self, vae: str, pipeline: TinyPipelineConfig | None = None, train_text_encoder: bool = True,
                 lr: float = 1.5e-3, weight_decay: float = 0.01, warmup_steps: int = 100,
                 final_lr_fraction: float = 0.1, prompt_dropout: float = 0.1, snr_gamma: float | None = 5.0):
        """
        Args:
            vae: Folder of the trained VAE (`ToyVAEModule`'s export); frozen here and shipped in the pipeline.
            pipeline: Architecture of the UNet and text encoder; default `toy_pipeline_config()`.
            train_text_encoder: Train the (randomly initialised) CLIP text encoder with the UNet. With `False`
                the UNet learns from fixed random text features.
            lr: Peak AdamW learning rate.
            weight_decay: AdamW weight decay.
            warmup_steps: Linear warm-up steps before the cosine decay.
            final_lr_fraction: Learning rate at `trainer.max_steps`, as a fraction of `lr`.
            prompt_dropout: Fraction of prompts replaced by "" so the model also learns the unconditional
                prediction that classifier-free guidance needs.
            snr_gamma: Min-SNR-γ weighting of the noise-prediction loss (`min(SNR, γ) / SNR`); `None` = unweighted.
        """
        super().__init__()
        self.save_hyperparameters()
        parts = build_tiny_pipeline(pipeline or toy_pipeline_config())
        self.unet, self.text_encoder, self.tokenizer = parts.unet, parts.text_encoder, parts.tokenizer
        self.text_encoder.requires_grad_(train_text_encoder)
        self.vae = load_vae(vae)
        if self.vae.config.latent_channels != self.unet.config.in_channels:
            raise ValueError(f"model.vae {vae} has {self.vae.config.latent_channels} latent channels but the UNet "
                             f"expects {self.unet.config.in_channels}.")
        self.sampler_config = dict(parts.scheduler.config)  # the DDIM sampler shipped with the pipeline
        self.noise_scheduler = DDPMScheduler.from_config(self.sampler_config)  # same noise schedule

    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """`[B, 77, d]` text features, tokenised exactly as `StableDiffusionPipeline.encode_prompt` does."""
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids.to(self.device)
        with torch.set_grad_enabled(self.hparams.train_text_encoder and torch.is_grad_enabled()):
            return self.text_encoder(tokens)[0]

    @torch.no_grad()
    def clean_latents(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> Tensor:
        """`[B, 4, h, w]` scaled latents: a draw from the VAE posteriors that a `ToyLatentDataModule` batch carries
        (`latent_mean`, `latent_std`), as `latent_dist.sample` would draw them."""
        if "latent_mean" not in batch:
            raise ValueError(f"ToyDiffusionModule trains on encoded renders (data: saemnesia.toy.latents."
                             f"ToyLatentDataModule); got a batch of {sorted(batch)}.")
        mean = batch["latent_mean"]
        latents = mean + batch["latent_std"] * torch.randn(mean.shape, generator=generator, device=mean.device)
        return latents * self.vae.config.scaling_factor

    def _loss(self, batch: dict[str, Any], prompts: list[str], generator: torch.Generator | None = None) -> Tensor:
        latents = self.clean_latents(batch, generator)  # [B, 4, h, w]
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(latents),),
                                  generator=generator, device=latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=self.encode_prompts(prompts)).sample
        errors = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))  # [B]
        if self.hparams.snr_gamma is None:
            return errors.mean()
        alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(latents.device)[timesteps]
        snr = alphas_cumprod / (1 - alphas_cumprod)
        return (errors * snr.clamp(max=self.hparams.snr_gamma) / snr).mean()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        dropped = (torch.rand(len(batch["prompt"])) < self.hparams.prompt_dropout).tolist()
        loss = self._loss(batch, ["" if drop else prompt for prompt, drop in zip(batch["prompt"], dropped)])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # Fixed noise and timesteps per batch, so the validation loss compares checkpoints, not noise draws.
        generator = torch.Generator(self.device).manual_seed(batch_idx)
        self.log("val/loss", self._loss(batch, batch["prompt"], generator), batch_size=len(batch["prompt"]))

    def configure_optimizers(self) -> dict[str, Any]:
        trained = [*self.unet.parameters()]
        if self.hparams.train_text_encoder:
            trained += self.text_encoder.parameters()
        return adamw_warmup_cosine(trained, self.hparams.lr, self.hparams.weight_decay, self.trainer.max_steps,
                                   self.hparams.warmup_steps, self.hparams.final_lr_fraction)

    def build_pipeline(self) -> StableDiffusionPipeline:
        """A pipeline sharing this module's networks, with the DDIM sampler."""
        pipe = StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=self.unet, scheduler=DDIMScheduler.from_config(self.sampler_config),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def export(self, folder: Path) -> None:
        """Save the pipeline folder (safetensors) that `load_pipeline` reads."""
        pipe = self.build_pipeline()
        replace_folder(folder, lambda staging: pipe.save_pretrained(staging, safe_serialization=True))
