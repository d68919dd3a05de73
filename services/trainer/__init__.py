"""trainer: fits a scikit-learn model with validated hyperparameters."""

# Part of every cache key: bump it whenever the stage's outputs change for the same inputs.
VERSION = "1.0.0"
