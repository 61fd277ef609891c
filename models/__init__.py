"""Model builders. Each module exposes one function `build_<name>(*, input_shape, num_classes, ...)`
returning an unbuilt-or-built `keras.Model` that maps features to logits; `conf/model/<name>.yaml`
points at it with `_target_`. See README, "Adding a model".
"""
