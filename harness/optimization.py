"""Optimizers and learning-rate schedules built from config.

Owns: `optimizer=adam|adamw|sgd`, `optimizer.schedule` and loss scaling. Schedules are functions
of the optimizer's iteration count, which is checkpointed, so their position survives restarts
without any state of their own. Under the `mixed_float16` dtype policy the optimizer is wrapped in
`keras.optimizers.LossScaleOptimizer` (as `Model.compile` would do); its dynamic loss scale and
step counter are optimizer variables, so checkpoints carry them too.
"""

from __future__ import annotations

import keras

from harness.config import AdamConfig, AdamWConfig, OptimizerConfig, ScheduleConfig, SGDConfig

LearningRate = float | keras.optimizers.schedules.LearningRateSchedule


def build_learning_rate(config: OptimizerConfig, *, max_steps: int) -> LearningRate:
    """A constant or a cosine schedule, either with an optional linear warmup from 0."""
    schedule: ScheduleConfig = config.schedule
    if schedule.name == "constant" and schedule.warmup_steps == 0:
        return config.learning_rate
    # Constant-with-warmup is cosine decay whose floor is the peak (alpha=1).
    alpha = 1.0 if schedule.name == "constant" else schedule.final_fraction
    decay_steps = schedule.decay_steps or max(1, max_steps - schedule.warmup_steps)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if schedule.warmup_steps else config.learning_rate,
        decay_steps=decay_steps,
        alpha=alpha,
        warmup_target=config.learning_rate if schedule.warmup_steps else None,
        warmup_steps=schedule.warmup_steps,
    )


def build_optimizer(config: OptimizerConfig, *, max_steps: int) -> keras.optimizers.Optimizer:
    """The configured Keras optimizer. Call inside `strategy.scope()`, after `runtime.configure_runtime`.

    Under the global `mixed_float16` policy it comes wrapped in a `LossScaleOptimizer` (float16
    gradients underflow without loss scaling); `bfloat16` has float32's range and needs none.
    """
    optimizer = _build_base_optimizer(config, max_steps=max_steps)
    if keras.mixed_precision.global_policy().name == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def _build_base_optimizer(config: OptimizerConfig, *, max_steps: int) -> keras.optimizers.Optimizer:
    common = {"learning_rate": build_learning_rate(config, max_steps=max_steps),
              "global_clipnorm": config.global_clipnorm}
    if isinstance(config, AdamWConfig):
        return keras.optimizers.AdamW(weight_decay=config.weight_decay, beta_1=config.beta_1,
                                      beta_2=config.beta_2, epsilon=config.epsilon, **common)
    if isinstance(config, AdamConfig):
        return keras.optimizers.Adam(beta_1=config.beta_1, beta_2=config.beta_2, epsilon=config.epsilon, **common)
    if isinstance(config, SGDConfig):
        return keras.optimizers.SGD(momentum=config.momentum, nesterov=config.nesterov, **common)
    raise TypeError(f"no optimizer builder for {type(config).__name__}")


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    """The learning rate the next step will use."""
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))
