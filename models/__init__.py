"""Model builders. Each module exposes one function `build_<name>(*, input_shape, num_outputs, ...)`
returning an unbuilt-or-built `keras.Model` that maps features to outputs (logits for
classification, values for regression); `num_outputs` is the width of the output layer the task
asks for. `conf/model/<name>.yaml` points at it with `_target_`. See README, "Adding a model".
"""
