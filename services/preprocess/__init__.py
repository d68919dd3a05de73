"""preprocess: de-duplicates, splits, imputes and label-encodes a dataset."""
