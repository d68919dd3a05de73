"""evaluator: scores a model on the held-out split and decides PROMOTE or RETRAIN."""

# Part of every cache key: bump it whenever the stage's outputs change for the same inputs.
VERSION = "1.1.0"  # 1.1: adds the HTML report
