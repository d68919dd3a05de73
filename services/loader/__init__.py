"""loader: reads a dataset, decides each column's role, profiles it and stores it as an Arrow IPC table."""

# Part of every cache key: bump it whenever the stage's outputs change for the same inputs.
VERSION = "2.1.0"  # 2.1: tables are Arrow IPC files; 2.0: column roles, schema and profile; typed splits; encoders fitted on train; default thresholds by task kind
