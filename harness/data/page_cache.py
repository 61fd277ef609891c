"""Whether a file's pages are in the page cache, sampled with non-blocking reads.

Owns: one question for readers that choose how to read by whether reads will wait for the disk:
is (nearly) all of this file cached now? `mostly_cached` reads one byte at a few random offsets
with `preadv(..., RWF_NOWAIT)`, which returns only what is cached and fails instead of going to
the disk; the answer is refreshed every `refresh_every` questions per file, so it follows the page
cache as it fills or is evicted, at ~15 µs per sampled page. A reader that finds reads slow anyway
(a partly cached file) says so with `found_slow`, which holds until the next sample. Files on
tmpfs or ramfs are in memory by definition. Where RWF_NOWAIT does not exist (not Linux) or a
filesystem does not support it (network and FUSE mounts), the answer is no: reads may wait.
"""

from __future__ import annotations

import os
import random
import threading

SAMPLED_PAGES = 8
IN_MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


class PageCacheProbe:
    """`mostly_cached(i)`: whether every sampled page of `paths[i]` was in the page cache at the last sample."""

    def __init__(self, paths: list[str], *, refresh_every: int = 16, seed: int = 0) -> None:
        self.paths = paths
        self.refresh_every = refresh_every
        self._random = random.Random(seed)  # which pages are sampled; never what is read
        self._answers: list[bool | None] = [None] * len(paths)
        self._questions = [0] * len(paths)
        self._lock = threading.Lock()

    def mostly_cached(self, index: int) -> bool:
        with self._lock:
            self._questions[index] += 1
            answer = self._answers[index]
            if answer is not None and self._questions[index] % self.refresh_every:
                return answer
            offsets = self._offsets(index)
        answer = self._sample(self.paths[index], offsets)
        self._answers[index] = answer
        return answer

    def found_slow(self, index: int) -> None:
        """Reads of `paths[index]` waited after all: answer no until the next sample."""
        self._answers[index] = False

    def _offsets(self, index: int) -> list[int]:
        try:
            size = os.path.getsize(self.paths[index])
        except OSError:
            return []
        return [self._random.randrange(size) for _ in range(SAMPLED_PAGES)] if size else []

    @staticmethod
    def _sample(path: str, offsets: list[int]) -> bool:
        if not hasattr(os, "RWF_NOWAIT"):
            return False
        byte = bytearray(1)
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except OSError:
            return False  # the reader will report the file; read the safe way meanwhile
        try:
            for offset in offsets:
                os.preadv(descriptor, [byte], offset, os.RWF_NOWAIT)
            return True
        except BlockingIOError:
            return False  # that page is not cached: a read of it would wait for the disk
        except OSError:  # RWF_NOWAIT not supported here (tmpfs rejects it too, but holds its files in memory)
            return filesystem_type(path) in IN_MEMORY_FILESYSTEMS
        finally:
            os.close(descriptor)


def filesystem_type(path: str) -> str | None:
    """The type of the filesystem holding `path` ('ext4', 'tmpfs', ...), from /proc/mounts; None if unknown."""
    try:
        with open("/proc/mounts", encoding="utf-8") as mounts:
            entries = [line.split()[1:3] for line in mounts if len(line.split()) > 2]
    except OSError:
        return None
    real = os.path.realpath(path)
    matching = [(mount, kind) for mount, kind in entries
                if real == mount or real.startswith(mount.rstrip("/") + "/")]
    return max(matching, key=lambda entry: len(entry[0]))[1] if matching else None
