"""Importing TensorFlow without paying for Keras's optional notebook and scikit-learn helpers.

Owns: the first `import tensorflow` of `train.py`. TensorFlow 2.21 imports Keras 3 eagerly (for
`tf.keras`), and Keras imports every optional dependency it finds: scikit-learn for its wrappers
(`keras.wrappers.SKLearn*`; requirements.txt installs scikit-learn for `data=digits`) and IPython
for notebook display in `keras.saving` (when installed). Together about a second of every start
on 2 cores (scripts/benchmark.py --sections startup), for features a training process never uses.
Hiding them while TensorFlow imports makes Keras take the path it takes when they are missing:
the sklearn wrappers become stubs that raise "scikit-learn is not installed" in this process.
Nothing else changes: both import normally afterwards (`data=digits` uses scikit-learn).

The import also runs without Python's cyclic garbage collector: TensorFlow creates ~450 000 objects
as it loads, and each full collection on the way re-scans all of them (5 full collections, 0.4-0.6 s
of the import on 2 cores). Afterwards they are frozen (`gc.freeze`): modules, op wrappers and
their tables live until the process exits, so later collections during training skip them too
(a full collection over them costs ~0.15 s). A few KB of cyclic garbage left by the import stays.
Checked on TensorFlow 2.21 and Keras 3.15; on other versions it is harmless (at worst, no gain).
"""

from __future__ import annotations

import gc
import importlib.abc
import sys
from collections.abc import Sequence
from types import ModuleType

HIDDEN = ("sklearn", "IPython")  # optional dependencies of Keras that training does not use


class _HideOptionalDependencies(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Sequence[str] | None, target: ModuleType | None = None) -> None:
        if name.split(".", 1)[0] in HIDDEN:
            raise ImportError(f"{name} is not imported while TensorFlow imports (harness/lean_import.py)")


def import_tensorflow() -> None:
    """Import TensorFlow (and Keras) once, without `HIDDEN`; a no-op if TensorFlow is imported already."""
    if "tensorflow" in sys.modules or any(name in sys.modules for name in HIDDEN):
        return  # too late to save anything, or one of them is wanted already
    hider = _HideOptionalDependencies()
    sys.meta_path.insert(0, hider)
    collecting = gc.isenabled()
    gc.disable()
    try:
        import tensorflow  # noqa: F401
    finally:
        sys.meta_path.remove(hider)
        gc.freeze()  # what the import created lives as long as the process: no collection scans it again
        if collecting:
            gc.enable()
