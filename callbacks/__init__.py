"""Lightning callbacks: what a run writes (shards, statistics, images, checkpoints) is decided here."""
