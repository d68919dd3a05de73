"""loader: reads a dataset from a source, validates it and stores it as Parquet."""
