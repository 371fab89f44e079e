"""Lightning callbacks: what a run writes (shards, statistics, images, SAE exports) is decided here."""

from callbacks.class_params_selector import ClassParamsSelector
from callbacks.concept_stats import ConceptStatsCallback
from callbacks.image_writer import ImageWriter
from callbacks.sae_export import SaeExport
from callbacks.shard_writer import ActivationShardWriter

__all__ = ["ActivationShardWriter", "ClassParamsSelector", "ConceptStatsCallback", "ImageWriter", "SaeExport"]
