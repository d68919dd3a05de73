"""preprocess: de-duplicates, splits, imputes and label-encodes a dataset."""

# Part of every cache key: bump it whenever the stage's outputs change for the same inputs.
VERSION = "1.0.0"
