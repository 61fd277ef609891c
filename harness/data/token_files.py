"""Windows of tokens read by position from a flat binary token file, never loading the file.

Owns: checking a token file (exists, non-empty, a whole number of `dtype` tokens) and reading
windows of consecutive tokens at given start positions, one positional read (`os.preadv`) per
window straight into the batch array. Not `np.memmap`, the way nanoGPT reads such files: every
page touched through a mapping stays in the process's resident set (measured: reading random
windows of a 2 GB file through a memmap raised the RSS to 1.99 GB within 500 batches), so peak
RSS would grow with the file; positional reads leave the pages to the kernel's page cache and
keep the process's memory independent of the file's size. A file cut short while open is a
`DataError` at the next read that reaches past its end, never a crash (a mapping would SIGBUS).
"""

from __future__ import annotations

import os

import numpy as np

from harness.config.schema import TOKEN_DTYPES
from harness.errors import DataError


class TokenFile:
    """A file of `num_tokens` unsigned integers of `dtype`, native byte order, no header (`array.tofile`)."""

    def __init__(self, path: str, *, dtype: str, key: str = "data.path", expected: str | None = None) -> None:
        """`expected`: what the file should be, for messages (default: a token file)."""
        self.path, self.key = path, key
        expected = expected or (f"a flat binary file of {'/'.join(TOKEN_DTYPES)} token ids with no header, as "
                                "numpy.ndarray.tofile writes")
        if dtype not in TOKEN_DTYPES:
            raise DataError(f"Config key 'data.dtype' = {dtype!r} is invalid: expected one of {list(TOKEN_DTYPES)}, "
                            "the type the token file was written with.")
        self.dtype = np.dtype(dtype)
        if not os.path.isfile(path):
            raise DataError(f"Config key '{key}' = '{path}': no such file. Expected {expected}.")
        size = os.path.getsize(path)
        if size == 0:
            raise DataError(f"Token file '{path}' ({key}) is empty. Expected {expected}.")
        if size % self.dtype.itemsize:
            raise DataError(f"Token file '{path}' ({key}) has {size} bytes, not a multiple of {self.dtype.itemsize} "
                            f"(the size of data.dtype = {dtype}): it is truncated or was written with another dtype. "
                            f"Expected {expected}.")
        self.num_tokens, self._size = size // self.dtype.itemsize, size
        self._descriptor: int | None = os.open(path, os.O_RDONLY)

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Tokens [start, start + length) for each start, as int32 (len(starts), length); an id of 2**31 or more
        is a `DataError` naming its position.

        Every window must lie inside the file: 0 <= start <= num_tokens - length (IndexError
        otherwise: the caller chose the positions). Safe to call from many threads.
        """
        starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        if length < 1:
            raise ValueError(f"window length {length} must be positive")
        if len(starts) and (starts.min() < 0 or starts.max() > self.num_tokens - length):
            raise IndexError(f"windows of {length} tokens starting in [{starts.min()}, {starts.max()}] do not fit in "
                             f"'{self.path}', which holds {self.num_tokens} tokens")
        if self._descriptor is None:
            raise ValueError(f"TokenFile('{self.path}') is closed")
        descriptor, windows = self._descriptor, np.empty((len(starts), length), dtype=self.dtype)
        itemsize = self.dtype.itemsize
        try:
            for row, start in zip(windows, starts.tolist()):  # the GIL is released during each read
                if os.preadv(descriptor, [row], start * itemsize) != row.nbytes:
                    self._cut_short(descriptor)
        except OSError as error:
            raise DataError(f"Token file '{self.path}' ({self.key}) cannot be read: {error.strerror or error}. "
                            "Expected a readable file, unchanged during the run.") from None
        if self.dtype.itemsize == 4 and len(windows) and windows.max() >= 2**31:  # uint32 ids past int32's range
            row, column = np.argwhere(windows >= 2**31)[0]
            raise DataError(f"Token file '{self.path}' ({self.key}) holds token id {windows[row, column]} at token "
                            f"{starts[row] + column}; expected ids below 2**31 (they are trained on as int32).")
        return windows.astype(np.int32)

    def _cut_short(self, descriptor: int) -> None:
        size = os.fstat(descriptor).st_size
        raise DataError(f"Token file '{self.path}' ({self.key}) shrank from {self._size} to {size} bytes while "
                        "training read it: it was truncated or is being rewritten in place. Expected the file "
                        "unchanged during the run (write a new file and rename it over the old one).")

    def close(self) -> None:
        """Release the file; no windows afterwards (ValueError)."""
        if self._descriptor is not None:
            descriptor, self._descriptor = self._descriptor, None
            os.close(descriptor)

    def __enter__(self) -> TokenFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.num_tokens
