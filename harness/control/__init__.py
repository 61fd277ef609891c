"""The outer loop: the controller runs inner loops to the next boundary, then its actions
(roll back on divergence, log, evaluate, checkpoint, stop), and writes summaries and progress.

Top of the training pipeline: imports every package above it except `harness.results`.
"""
