"""harness/lean_import.py: train.py imports TensorFlow without scikit-learn (and IPython), which stay
importable. `-X importtime` lists failed imports too (a line with only a few microseconds): a
module that was really imported shows with its submodules, so those are what is checked."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import PROJECT_ROOT, TINY, TRAIN_PY, assert_ok, subprocess_env


def imported_modules(stderr: str) -> set[str]:
    """Modules `-X importtime` reports, attempted imports included."""
    return {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def test_a_run_imports_tensorflow_and_keras_but_not_scikit_learn(tmp_path: Path) -> None:
    command = [sys.executable, "-X", "importtime", str(TRAIN_PY), f"run_dir={tmp_path / 'run'}", *TINY,
               "trainer.max_steps=10"]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, env=subprocess_env(),
                            timeout=240)
    assert_ok(result)
    imported = imported_modules(result.stderr)
    assert {"tensorflow", "keras.src", "harness.control.controller"} <= imported
    assert not {name for name in imported if name.startswith(("sklearn.", "IPython."))}, "imported for nothing"


def test_scikit_learn_still_imports_afterwards() -> None:
    code = ("from harness.lean_import import import_tensorflow; import_tensorflow(); import sys; "
            "assert 'tensorflow' in sys.modules and 'sklearn' not in sys.modules; "
            "from sklearn.datasets import load_digits; print(load_digits().data.shape)")
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            env=subprocess_env(), timeout=240)
    assert_ok(result)
    assert result.stdout.strip().splitlines()[-1] == "(1797, 64)"


def test_the_import_leaves_the_garbage_collector_on_with_tensorflow_frozen() -> None:
    """The import runs without the cyclic collector (its full passes re-scan TensorFlow as it loads);
    afterwards collection is back on, TensorFlow's objects are frozen, and new cycles are still freed."""
    code = textwrap.dedent("""
        import gc, weakref
        from harness.lean_import import import_tensorflow
        import_tensorflow()
        class Cycle: pass
        cycle = Cycle(); cycle.me = cycle; alive = weakref.ref(cycle); del cycle
        gc.collect()
        print(gc.isenabled(), gc.get_freeze_count() > 100_000, alive() is None)
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            env=subprocess_env(), timeout=240)
    assert_ok(result)
    assert result.stdout.strip().splitlines()[-1] == "True True True"
