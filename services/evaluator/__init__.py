"""evaluator: scores a model on the held-out split and decides PROMOTE or RETRAIN."""
