"""trainer: fits a scikit-learn model with validated hyperparameters."""
