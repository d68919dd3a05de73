"""features: fits column encoders, imputation, scaling, expansion and selection on the train split."""

# Part of every cache key: bump it whenever the stage's outputs change for the same inputs.
VERSION = "2.2.0"  # 2.1: canonical skops bytes (no object sharing, zeroed padding); 2.2: fast median imputer
