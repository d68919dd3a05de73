"""evaluator: scores a model on the held-out split and decides PROMOTE or RETRAIN."""

# Part of every cache key: bump it whenever the stage's outputs change for the same inputs.
# 2.0: column roles, schema and profile; typed splits; encoders fitted on train; default thresholds by task kind
# 2.1: the report shows what ran, precision-recall and calibration curves, per-class metrics, residuals, importance bars
VERSION = "2.1.0"
