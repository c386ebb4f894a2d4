"""Data: the synthetic world, video preparation into shards, and the training DataModule."""
