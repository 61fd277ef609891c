"""A fault-tolerant training harness for TensorFlow 2 / Keras 3.

The pipeline (see train.py): config -> strategy -> model, optimizer, state -> restore ->
controller loop -> exit code. One module per concern; importing this package is cheap (no
TensorFlow import until a module that needs it is imported).
"""
