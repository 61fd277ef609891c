"""Whether a file's pages are in the page cache, sampled with non-blocking reads.

Owns: one question for readers that choose how to read by whether reads will wait for the disk:
is (nearly) all of this file cached now? `mostly_cached` reads one byte at a few random offsets
with `preadv(..., RWF_NOWAIT)`, which returns only what is cached and fails instead of going to
the disk; the answer is refreshed every `refresh_every` questions per file, so it follows the page
cache as it fills or is evicted, at ~15 µs per sampled page. Where RWF_NOWAIT does not exist
(not Linux) the answer is always yes; where a filesystem does not support it (network and FUSE
mounts), always no.
"""

from __future__ import annotations

import os
import random
import threading

SAMPLED_PAGES = 8


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

    def _offsets(self, index: int) -> list[int]:
        try:
            size = os.path.getsize(self.paths[index])
        except OSError:
            return []
        return [self._random.randrange(size) for _ in range(SAMPLED_PAGES)] if size else []

    @staticmethod
    def _sample(path: str, offsets: list[int]) -> bool:
        if not hasattr(os, "RWF_NOWAIT"):
            return True
        byte = bytearray(1)
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except OSError:
            return False  # the reader will report the file; read the safe way meanwhile
        try:
            for offset in offsets:
                os.preadv(descriptor, [byte], offset, os.RWF_NOWAIT)
            return True
        except OSError:  # EAGAIN: a page is not cached; EOPNOTSUPP: this filesystem cannot say
            return False  # either way, reads may wait for the disk
        finally:
            os.close(descriptor)
