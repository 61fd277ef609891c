"""Checkpoints: writing the training state durably (retries, async, fsync before "latest"),
restoring the newest intact one (fallback, mismatch reports), what each records about the run that
wrote it (provenance), and when periodic saves are due (pacing).

Imports `harness.training.state` (what is saved), `harness.config`, `harness.errors`.
"""
