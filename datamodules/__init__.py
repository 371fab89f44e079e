"""LightningDataModules: activation shards for `fit`, prompt items for `predict`, image folders for `test`."""
