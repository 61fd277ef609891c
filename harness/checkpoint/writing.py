"""Writing checkpoints durably: where each process writes, fsync before "latest", and what a write
costs a process.

Owns the pieces `Checkpointer.save` is built from: the write options (fsync of data, index and
directory runs before `tf.train.CheckpointManager` records a checkpoint as latest), deleting old
checkpoints off the save's critical path, the check that `checkpoint.dir` is writable before any
training, which variables make non-chief workers take part in a save, and the clean-up of the
private copies such workers write.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence

import keras
import tensorflow as tf

from harness.checkpoint.files import CHECKPOINT_NAME
from harness.errors import CheckpointError, error_summary
from harness.host import fsync, process_alive

# What a failed write raises: OSError from Python-level file operations, OpErrors from TensorFlow's.
WRITE_ERRORS = (OSError, tf.errors.OpError)
log = logging.getLogger(__name__)

WORKER_WRITES = "harness-worker-ckpt-"  # + "<pid>-<id>": a non-chief worker's private save directory


def describe_failure(error: BaseException) -> str:
    """One line for a failed write or read: the error type and its message."""
    return f"{type(error).__name__}: {error_summary(error, limit=400)}"


def check_writable(directory: str) -> None:
    """Refuse (`CheckpointError`) a checkpoint directory that cannot be written, before any training.

    With the lease on, writing the lease file is this check; without it, a probe file is written
    and removed.
    """
    probe = f"{directory.rstrip('/')}/.write-probe-{os.getpid()}"
    try:
        tf.io.gfile.makedirs(directory)
        with tf.io.gfile.GFile(probe, "w") as handle:
            handle.write("probe")
        tf.io.gfile.remove(probe)
    except WRITE_ERRORS as error:
        raise CheckpointError(
            f"checkpoint.dir '{directory}' is not writable ({describe_failure(error)}): no checkpoint could be saved "
            "there. Nothing was trained or changed. Check the path, its permissions and free space, or point "
            "checkpoint.dir elsewhere.") from None


def write_options(*, async_save: bool) -> tf.train.CheckpointOptions:
    """Fresh options for one save: `make_durable` runs after TensorFlow's write (on the background
    thread for async saves) and before the manager records the checkpoint as latest and deletes old
    ones. `CheckpointManager.save` appends its own callback to the options' list (TF 2.21), hence a
    new list per save."""
    return tf.train.CheckpointOptions(experimental_enable_async_checkpoint=async_save,
                                      experimental_write_callbacks=[make_durable])


def make_durable(save_path: str) -> None:
    """fsync a written checkpoint's files and directory, so that it survives a power loss or a host crash.

    Without it a checkpoint recorded as latest could still be only in the page cache; `list_checkpoints`
    trusts an index file, so the index (renamed into place last by TensorFlow) must be durable no
    earlier than its data. Remote filesystems (gs://, hdfs://) give their own guarantees on close.
    """
    if "://" in save_path:
        return
    for path in [*sorted(glob.glob(glob.escape(save_path) + ".data-*")), save_path + ".index"]:
        fsync(path)
    fsync(os.path.dirname(save_path) or ".")


_closer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-deletions")


@contextlib.contextmanager
def deferred_deletions(checkpoints: Sequence[str]) -> Iterator[None]:
    """Inside this block, deleting one of `checkpoints` (path prefixes: the manager's
    `checkpoints`, the ones it may rotate out) costs training next to nothing: the blocks of its
    data files are freed afterwards, on a background thread.

    Past `max_to_keep`, `CheckpointManager.save` deletes the oldest checkpoint while a sync save
    blocks training, and freeing a file's blocks takes time (measured: 0.16-0.23 s per GB on ext4,
    cached or not, about a quarter of writing and fsyncing the same GB). Each data file is held
    open across the block, so an unlink only removes the name; the last descriptor of a deleted
    file is closed on a background thread, which frees the blocks. Nothing changes on disk that a
    plain unlink would not: a kill meanwhile closes the descriptors (the kernel frees the blocks),
    and a file still in use is closed at once. Local paths only.
    """
    held = []
    for prefix in checkpoints:
        if "://" in prefix:
            continue
        for path in glob.glob(glob.escape(prefix) + ".data-*"):
            with contextlib.suppress(OSError):  # deleted meanwhile, or unreadable: left to the plain unlink
                held.append(os.open(path, os.O_RDONLY))
    try:
        yield
    finally:
        for descriptor in held:
            if os.fstat(descriptor).st_nlink == 0:  # unlinked inside the block: freeing its blocks takes time
                _closer.submit(os.close, descriptor)
            else:
                os.close(descriptor)


def backing_variables(tree: dict[str, object]) -> dict[str, object]:
    """The checkpoint tree with each Keras variable replaced by the `tf.Variable` that holds its value.

    Both write the same keys and values. The swap is needed for async saves: Keras 3's
    `Variable._copy_trackable_to_cpu` creates a new `tf.Variable` on every call, which the traced
    copy function of TensorFlow's async checkpointer refuses ("tf.function only supports singleton
    tf.Variables"); TensorFlow's own variables reuse their CPU copy. Checked on Keras 3.15, TF 2.21.
    """
    def unwrap(node: object) -> object:
        if isinstance(node, dict):
            return {key: unwrap(child) for key, child in node.items()}
        held = getattr(node, "value", None) if isinstance(node, keras.Variable) else None
        return held if isinstance(held, tf.Variable) else node

    return {key: unwrap(child) for key, child in tree.items()}


def collective_read_variables(tree: dict[str, object]) -> list[str]:
    """Names of the variables in a checkpoint tree whose saved value is read with a collective.

    Under tf.distribute a sync-on-read variable saves the aggregate over replicas, so every worker
    must join its save; mirrored and plain variables save the local copy, identical on every worker.
    """
    found: list[str] = []

    def visit(node: object, path: str) -> None:
        if isinstance(node, dict):
            for key, child in node.items():
                visit(child, f"{path}/{key}" if path else key)
        elif isinstance(node, tf.distribute.DistributedValues) and \
                getattr(node, "synchronization", None) == tf.VariableSynchronization.ON_READ:
            found.append(path)

    visit(tree, "")
    return found


def remove_dead_workers_writes(temporary_dir: str | None = None) -> list[str]:
    """Delete the private save directories of non-chief workers that no longer run on this machine.

    A worker deletes its own after every save, but one SIGKILLed mid-save leaves a copy of the whole
    state behind; the next worker started here cleans it up. Returns the directories removed.
    """
    removed = []
    for path in glob.glob(os.path.join(temporary_dir or tempfile.gettempdir(), f"{WORKER_WRITES}*")):
        pid = os.path.basename(path)[len(WORKER_WRITES):].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def bytes_written_by_this_process() -> int | None:
    """Bytes this process has passed to write calls so far (`wchar` of /proc/self/io), None elsewhere."""
    try:
        with open("/proc/self/io") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith("wchar:"))
    except (OSError, StopIteration, ValueError):
        return None


def private_write_directory(owner: object) -> str:
    """Where a non-chief worker writes its private copy of a save (deleted after each save)."""
    return os.path.join(tempfile.gettempdir(), f"{WORKER_WRITES}{os.getpid()}-{id(owner):x}")


def remove_abandoned_writes(directory: str) -> None:
    """Delete what writes a kill interrupted left: `ckpt-N_temp*` directories, and data files
    whose index was never written (TensorFlow renames the data into place before it writes the
    index, so a checkpoint without its index was never complete).

    Neither ever held a usable checkpoint. Call it after a successful restore, on the chief only.
    """
    if not tf.io.gfile.isdir(directory):
        return
    prefix = f"{directory.rstrip('/')}/{CHECKPOINT_NAME}-"
    abandoned_data = [path for path in tf.io.gfile.glob(f"{prefix}*.data-*")
                      if not tf.io.gfile.exists(path.rsplit(".data-", 1)[0] + ".index")]
    for abandoned in tf.io.gfile.glob(f"{prefix}*_temp*") + abandoned_data:
        log.info("removing %s, left by a checkpoint write that was interrupted", abandoned)
        if tf.io.gfile.isdir(abandoned):
            tf.io.gfile.rmtree(abandoned)
        else:
            tf.io.gfile.remove(abandoned)
