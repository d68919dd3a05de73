"""loader: reads a dataset from a source, validates it and stores it as Parquet."""

# Part of every cache key: bump it whenever the stage's outputs change for the same inputs.
VERSION = "1.0.0"
