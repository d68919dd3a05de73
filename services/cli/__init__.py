"""The `mlmesh` command line: starts and supervises a local mesh, runs pipelines, reads lineage."""
