"""trainer: fits a scikit-learn model with validated hyperparameters."""

# Part of every cache key: bump it whenever the stage's outputs change for the same inputs.
VERSION = "3.0.0"  # 3.0: gradient boosting fitted in one call (as scikit-learn does); canonical skops bytes
