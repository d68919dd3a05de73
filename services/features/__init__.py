"""features: fits scaling, polynomial expansion and selection on the train split."""

# Part of every cache key: bump it whenever the stage's outputs change for the same inputs.
VERSION = "1.0.0"
