"""Input data: sources (in memory, or read from files by index) and the seekable pipeline that makes
batch `k` a pure function of `(seed, k)`, so resuming at any step reads exactly the batches an
uninterrupted run would.

Imports only `harness.config` and `harness.errors`.
"""
