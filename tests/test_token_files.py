"""Token files: windows read by position equal slices of the tokens, without the file entering the process's
memory; bad files give one DataError."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import pytest

from harness.data.token_files import TokenFile
from harness.errors import DataError


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32"])
def test_windows_are_the_tokens_at_each_start(tmp_path: Path, dtype: str) -> None:
    highest = min(np.iinfo(dtype).max, 2**31 - 1)  # ids are returned as int32
    tokens = np.random.default_rng(0).integers(0, highest, 10_000, endpoint=True, dtype=np.int64)
    tokens.astype(dtype).tofile(tmp_path / "train.bin")
    token_file = TokenFile(str(tmp_path / "train.bin"), dtype=dtype)
    assert token_file.num_tokens == len(token_file) == 10_000
    starts = np.array([0, 9_000 - 1, 17, 17, 10_000 - 65])
    windows = token_file.windows(starts, 65)
    assert windows.dtype == np.int32 and windows.shape == (5, 65)
    np.testing.assert_array_equal(windows, np.stack([tokens[start:start + 65] for start in starts]))
    assert token_file.windows(np.array([], dtype=np.int64), 65).shape == (0, 65)
    for outside in ([-1], [10_000 - 64]):
        with pytest.raises(IndexError, match="do not fit"):
            token_file.windows(np.array(outside), 65)


def test_a_uint32_id_past_int32_is_named_by_its_position(tmp_path: Path) -> None:
    tokens = np.arange(1_000, dtype=np.uint32)
    tokens[700] = 2**31 + 5  # would be trained on as -2147483643
    tokens.tofile(tmp_path / "train.bin")
    token_file = TokenFile(str(tmp_path / "train.bin"), dtype="uint32")
    np.testing.assert_array_equal(token_file.windows(np.array([0, 600]), 100), [tokens[:100], tokens[600:700]])
    with pytest.raises(DataError, match=r"Token file '.*train.bin' \(data.path\) holds token id 2147483653 at "
                                        r"token 700; expected ids below 2\*\*31"):
        token_file.windows(np.array([0, 650]), 100)


def test_windows_from_threads(tmp_path: Path) -> None:
    tokens = np.arange(50_000, dtype=np.uint16)
    tokens.tofile(tmp_path / "train.bin")
    token_file = TokenFile(str(tmp_path / "train.bin"), dtype="uint16")
    wrong: list[int] = []

    def check(seed: int) -> None:
        for _ in range(20):
            starts = np.random.default_rng(seed).integers(0, 50_000 - 128, 64)
            if not np.array_equal(token_file.windows(starts, 128), starts[:, None] + np.arange(128)):
                wrong.append(seed)

    workers = [threading.Thread(target=check, args=(seed,)) for seed in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not wrong


def _resident_file_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssFile:"))


def test_reading_every_window_leaves_the_file_out_of_the_process_memory(tmp_path: Path) -> None:
    """Pages read through a mapping would stay resident (RssFile) and grow with the file: peak RSS of a
    run on a file bigger than memory must not."""
    np.arange(16 << 20, dtype=np.uint16).tofile(tmp_path / "train.bin")  # 32 MB
    with TokenFile(str(tmp_path / "train.bin"), dtype="uint16") as token_file:
        token_file.windows(np.array([0]), 1024)
        before = _resident_file_kib()
        starts = np.random.default_rng(0).permutation(np.arange(0, token_file.num_tokens - 1024, 1024))
        for batch in np.array_split(starts, 64):
            windows = token_file.windows(batch, 1024)
            assert np.array_equal(windows[:, 0], batch % 65536)  # arange wraps at uint16
        assert _resident_file_kib() - before < 4 * 1024


def test_bad_token_files(tmp_path: Path) -> None:
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x00\x02\x00\x03")
    with pytest.raises(DataError, match=rf"Token file '{re.escape(str(odd))}' \(data.path\) has 5 bytes, not a "
                                        r"multiple of 4 \(the size of data.dtype = uint32\)") as raised:
        TokenFile(str(odd), dtype="uint32")
    assert "\n" not in str(raised.value)
    assert TokenFile(str(odd), dtype="uint8").num_tokens == 5
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.bin' \(data.eval_path\) is empty"):
        TokenFile(str(tmp_path / "empty.bin"), dtype="uint16", key="data.eval_path")
    with pytest.raises(DataError, match=r"Config key 'data.path' = '.*missing.bin': no such file"):
        TokenFile(str(tmp_path / "missing.bin"), dtype="uint16")
    with pytest.raises(DataError, match=r"'data.dtype' = 'int16' is invalid: expected one of \['uint8'"):
        TokenFile(str(odd), dtype="int16")


def test_a_file_cut_short_while_open_is_an_error_not_a_crash(tmp_path: Path) -> None:
    """A window past the new end of a truncated file is an error naming both sizes (a memmap would SIGBUS)."""
    np.arange(100_000, dtype=np.uint16).tofile(tmp_path / "train.bin")
    with TokenFile(str(tmp_path / "train.bin"), dtype="uint16") as token_file:
        with (tmp_path / "train.bin").open("r+b") as handle:
            handle.truncate(1000)
        with pytest.raises(DataError, match=r"train.bin' \(data.path\) shrank from 200000 to 1000 bytes"):
            token_file.windows(np.array([99_000]), 64)
        np.testing.assert_array_equal(token_file.windows(np.array([10]), 4)[0], [10, 11, 12, 13])
    with pytest.raises(ValueError, match="closed"):
        token_file.windows(np.array([10]), 4)
