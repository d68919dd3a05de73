"""serving: answers predictions for the models the pipeline registered, over the Open Inference Protocol."""

# Reported by ServerMetadata; bump it whenever a row's answer changes for the same model.
VERSION = "1.0.0"
