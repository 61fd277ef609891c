"""What is trained and the inner loop: model and optimizer built from the config, the training state
(everything a checkpoint holds), the `tf.function` loops under `strategy.run`, divergence
detection, and warm start from another run's weights.

Imports `harness.config`, `harness.data`, `harness.tasks`, `harness.distributed`.
"""
