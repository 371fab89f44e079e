"""Lightning callbacks: what a run writes (shards, statistics, images, SAE exports) is decided here."""

from callbacks.sae_export import SaeExport
from callbacks.shard_writer import ActivationShardWriter

__all__ = ["ActivationShardWriter", "SaeExport"]
