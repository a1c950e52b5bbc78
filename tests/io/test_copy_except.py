"""io.stream.copy_except: a file's bytes but the ranges the caller writes itself."""

import errno
import os

import pytest

from lora_deploy.io import stream


@pytest.mark.parametrize("kernel", [True, False], ids=["copy_file_range", "buffered"])
def test_copies_all_but_the_skipped_ranges(tmp_path, monkeypatch, kernel):
    if not kernel:

        def refused(*args, **kwargs):
            raise OSError(errno.EXDEV, "cross-device")

        monkeypatch.setattr(os, "copy_file_range", refused)
    source = tmp_path / "src"
    data = os.urandom(1 << 20)
    source.write_bytes(data)
    skip = [(4096, 100), (0, 10), (len(data) - 7, 7), (5000, 50)]
    opened = []
    stream.copy_except(source, tmp_path / "dst", skip, on_open=lambda: opened.append(True))
    got = (tmp_path / "dst").read_bytes()
    assert len(got) == len(data) and opened == [True]
    want = bytearray(data)
    for offset, length in skip:
        want[offset : offset + length] = bytes(length)
    assert got == bytes(want)


def test_an_existing_destination_is_refused(tmp_path):
    (tmp_path / "src").write_bytes(b"x" * 10)
    (tmp_path / "dst").write_bytes(b"keep")
    with pytest.raises(stream.OutputError, match="cannot write"):
        stream.copy_except(tmp_path / "src", tmp_path / "dst", [])
    assert (tmp_path / "dst").read_bytes() == b"keep"
