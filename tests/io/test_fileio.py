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


def test_a_stopped_copy_returns_between_steps(tmp_path, monkeypatch):
    # merge --onnx-like stops the copy when the base graph is refused meanwhile
    import threading

    monkeypatch.setattr(stream, "COPY_STEP", 4096)
    source = tmp_path / "src"
    data = os.urandom(64 * 4096)
    source.write_bytes(data)
    stop = threading.Event()
    calls = []
    real = os.copy_file_range

    def copy_then_stop(*args, **kwargs):
        calls.append(args[2])
        stop.set()  # asked to stop during the first step
        return real(*args, **kwargs)

    monkeypatch.setattr(os, "copy_file_range", copy_then_stop)
    stream.copy_except(source, tmp_path / "dst", [], stop=stop)
    assert calls == [4096]  # one step, then it returned
    got = (tmp_path / "dst").read_bytes()
    assert len(got) == len(data) and got[:4096] == data[:4096] and got[4096:] == bytes(len(data) - 4096)
