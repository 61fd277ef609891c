"""What a run leaves behind and the offline tools over it: the export (`model.keras`, SavedModel),
loading a run for inference (`harness.load`), and checkpoint inspection and diffs.

Imports the training pipeline's packages; nothing in the pipeline imports this, except `train.py`
calling the export at the end.
"""
