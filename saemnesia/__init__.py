"""SAEmnesia: concept erasure in text-to-image diffusion models with supervised sparse autoencoders."""

__version__ = "0.1.0"
