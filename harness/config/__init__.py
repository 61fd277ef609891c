"""Configuration: the typed schema of every key, its Hydra registration and the typed view of a run.

Bottom of the package graph: imports only `harness.errors`. Nothing else in the harness reads a
raw `DictConfig`.
"""
