"""Lightning callbacks: what a run writes (shards, statistics, images, SAE exports) is decided here."""

from callbacks.sae_export import SaeExport

__all__ = ["SaeExport"]
