"""io.fileio.FileCopy: a file's bytes but the holes its caller writes, named before or
after the copy starts."""

import errno
import os
import threading

import pytest

from lora_deploy.errors import InternalError, OutputError
from lora_deploy.io import fileio


def source_file(tmp_path, size=1 << 20):
    data = os.urandom(size)
    (tmp_path / "src").write_bytes(data)
    return tmp_path / "src", data


def with_holes(data, holes, fill=0):
    want = bytearray(data)
    for offset, length in holes:
        want[offset : offset + length] = bytes([fill]) * length
    return bytes(want)


@pytest.mark.parametrize("kernel", [True, False], ids=["copy_file_range", "buffered"])
def test_copies_all_but_the_holes(tmp_path, monkeypatch, kernel):
    if not kernel:

        def refused(*args, **kwargs):
            raise OSError(errno.EXDEV, "cross-device")

        monkeypatch.setattr(os, "copy_file_range", refused)
    source, data = source_file(tmp_path)
    holes = [(4096, 100), (0, 10), (len(data) - 7, 7), (5000, 50), (6000, 0)]
    copy = fileio.FileCopy(source, tmp_path / "dst", holes)
    copy.join()
    assert (tmp_path / "dst").read_bytes() == with_holes(data, holes)


def test_holes_named_late_are_written_after_the_copy_passed_them(tmp_path, monkeypatch):
    """The copy runs before the holes are known: bytes it reached before are copied, and
    writable() holds the caller's write there until the copy cannot overwrite it."""
    monkeypatch.setattr(fileio, "COPY_STEP", 4096)
    source, data = source_file(tmp_path, 64 * 4096)
    in_step, go = threading.Event(), threading.Event()
    real = os.copy_file_range
    calls = []

    def slow_first_step(fd_in, fd_out, count, offset_in, offset_out):
        calls.append((offset_in, count))
        if len(calls) == 1:
            in_step.set()
            go.wait(5)
        return real(fd_in, fd_out, count, offset_in, offset_out)

    monkeypatch.setattr(os, "copy_file_range", slow_first_step)
    copy = fileio.FileCopy(source, tmp_path / "dst")
    assert in_step.wait(5)  # the first step (bytes 0-4095) is in flight
    holes = [(100, 50), (8192, 4096), (40000, 100)]
    copy.set_holes(holes)
    waited = threading.Event()

    def write_first_hole():
        copy.writable(100, 50)  # inside the step in flight: waits for it
        waited.set()

    writer = threading.Thread(target=write_first_hole)
    writer.start()
    assert not waited.wait(0.2)
    copy.writable(8192, 4096)  # past the step in flight: never copied, writable at once
    go.set()
    writer.join(5)
    assert waited.is_set()
    fd = os.open(tmp_path / "dst", os.O_WRONLY)
    for offset, length in holes:
        fileio.write_at(fd, tmp_path / "dst", b"\xff" * length, offset)
    os.close(fd)
    copy.join()
    assert (tmp_path / "dst").read_bytes() == with_holes(data, holes, fill=0xFF)
    assert all(not (offset < 8192 + 4096 and offset + count > 8192) for offset, count in calls)


def test_an_existing_destination_is_refused(tmp_path):
    (tmp_path / "src").write_bytes(b"x" * 10)
    (tmp_path / "dst").write_bytes(b"keep")
    with pytest.raises(OutputError, match="cannot write"):
        fileio.FileCopy(tmp_path / "src", tmp_path / "dst", [])
    assert (tmp_path / "dst").read_bytes() == b"keep"


def test_holes_are_named_once_and_before_writing(tmp_path):
    source, _ = source_file(tmp_path, 4096)
    copy = fileio.FileCopy(source, tmp_path / "dst")
    with pytest.raises(InternalError):
        copy.writable(0, 10)
    copy.set_holes([])
    with pytest.raises(InternalError):
        copy.set_holes([])
    copy.join()


def test_a_stopped_copy_returns_between_steps(tmp_path, monkeypatch):
    # merge --onnx-like stops the copy when the base graph is refused meanwhile
    monkeypatch.setattr(fileio, "COPY_STEP", 4096)
    source, data = source_file(tmp_path, 64 * 4096)
    calls = []
    real = os.copy_file_range
    copy = None
    started = threading.Event()

    def copy_then_stop(*args, **kwargs):
        calls.append(args[2])
        started.wait(5)
        copy.stop()  # asked to stop during the first step
        return real(*args, **kwargs)

    monkeypatch.setattr(os, "copy_file_range", copy_then_stop)
    copy = fileio.FileCopy(source, tmp_path / "dst", [])
    started.set()
    copy.join()
    assert calls == [4096]  # one step, then it returned
    got = (tmp_path / "dst").read_bytes()
    assert len(got) == len(data) and got[:4096] == data[:4096] and got[4096:] == bytes(len(data) - 4096)


def test_next_segment_steps_around_holes(monkeypatch):
    monkeypatch.setattr(fileio, "COPY_STEP", 100)
    holes = [(10, 20), (50, 60)]
    assert fileio.next_segment(0, None, 1000) == (0, 100)  # holes unknown: every byte
    assert fileio.next_segment(0, holes, 1000) == (0, 10)
    assert fileio.next_segment(10, holes, 1000) == (20, 20)  # inside a hole: skipped
    assert fileio.next_segment(20, holes, 1000) == (20, 50)
    assert fileio.next_segment(60, holes, 1000) == (60, 160)
    assert fileio.next_segment(60, holes, 70) == (60, 70)
