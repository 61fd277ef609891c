"""Optimizers and learning-rate schedules built from config.

Owns: `optimizer=adam|adamw|sgd`, `optimizer.schedule` and loss scaling. Every learning rate,
constant ones included, is a schedule: a function of the optimizer's iteration count, which is
checkpointed, so its position survives restarts without any state of its own, and the value
comes from the config of the running process (a plain float would be saved as an optimizer
variable, and restoring it would silently undo `resume.allow_config_change=[optimizer.learning_rate]`).
Under the `mixed_float16` dtype policy the optimizer is wrapped in
`keras.optimizers.LossScaleOptimizer` (as `Model.compile` would do); its dynamic loss scale and
step counter are optimizer variables, so checkpoints carry them too.
"""

from __future__ import annotations

import keras

from harness.config.schema import AdamConfig, AdamWConfig, OptimizerConfig, ScheduleConfig, SGDConfig


class ConstantLearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """The same learning rate at every step (a schedule, so that no checkpoint holds it)."""

    def __init__(self, learning_rate: float) -> None:
        self.learning_rate = learning_rate

    def __call__(self, step: object) -> object:
        return keras.ops.convert_to_tensor(self.learning_rate, dtype="float32")

    def get_config(self) -> dict[str, float]:
        return {"learning_rate": self.learning_rate}


def build_learning_rate(config: OptimizerConfig, *, max_steps: int) -> keras.optimizers.schedules.LearningRateSchedule:
    """A constant or a cosine schedule, either with an optional linear warmup from 0."""
    schedule: ScheduleConfig = config.schedule
    if schedule.name == "constant" and schedule.warmup_steps == 0:
        return ConstantLearningRate(config.learning_rate)
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
