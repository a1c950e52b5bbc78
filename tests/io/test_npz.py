"""The one .npz reader (verify, export and bench --inputs): numpy's own archives read back
exactly, and every bad file refused in one line that names it, nothing unpickled."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from lora_deploy.errors import BadInputError
from lora_deploy.io.npz import read_npz


def test_named_arrays_come_back_exactly(tmp_path):
    ids = np.arange(12, dtype=np.int32).reshape(3, 4)
    obs = np.asfortranarray(np.random.default_rng(0).standard_normal((2, 5)).astype(np.float16))
    np.savez(tmp_path / "in.npz", input_ids=ids, obs=obs, mask=np.ones(4, dtype=bool))
    got = read_npz(tmp_path / "in.npz")
    assert list(got) == ["input_ids", "obs", "mask"]
    assert got["input_ids"].dtype == np.int32 and np.array_equal(got["input_ids"], ids)
    assert got["obs"].dtype == np.float16 and np.array_equal(got["obs"], obs) and got["obs"].flags.c_contiguous
    assert got["mask"].dtype == bool and got["mask"].all()


class Payload:
    """Unpickling this would run code: the reader must never get that far."""

    def __reduce__(self):
        return (pytest.fail, ("the reader unpickled a file",))


def bad_files(tmp_path) -> dict[str, object]:
    ids = np.ones((2, 3), np.int64)
    np.save(tmp_path / "bare.npy", ids)
    np.savez(tmp_path / "object.npz", input_ids=np.array([Payload()], dtype=object))
    (tmp_path / "pickle.npz").write_bytes(pickle.dumps({"input_ids": Payload()}))
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    np.savez(tmp_path / "empty.npz")
    np.savez(tmp_path / "text.npz", input_ids=np.array(["a", "b"]))
    np.savez(tmp_path / "scalar.npz", input_ids=np.array(3))
    return {
        "missing.npz": "file not found",
        "bare.npy": r"not an \.npz archive of named arrays",
        "object.npz": "cannot be read without pickle",
        "pickle.npz": "cannot be read without pickle",
        "broken.npz": r"not a readable \.npz file \(BadZipFile: ",
        "empty.npz": "holds no arrays",
        "text.npz": "'input_ids' must be a numeric array of rank >= 1, got <U1",
        "scalar.npz": r"'input_ids' must be a numeric array of rank >= 1, got int64 \(\)",
    }


def test_bad_files_are_one_line_naming_the_file(tmp_path):
    for name, words in bad_files(tmp_path).items():
        path = tmp_path / name
        with pytest.raises(BadInputError, match=words) as caught:
            read_npz(path)
        message = str(caught.value)
        assert message.startswith(f"--inputs {path}: ") and "\n" not in message, message


def test_empty_and_non_finite_arrays_are_refused(tmp_path):
    """Nothing to run, or values no output check could compare: refused before any model
    sees them (verify crashed on NaN inputs, and compared nothing on an empty batch)."""
    obs = np.ones((2, 3), np.float32)
    cases = {
        "empty_batch.npz": ({"obs": obs[:0]}, r"'obs' is empty, shape \(0, 3\)"),
        "nan.npz": ({"obs": np.where(obs > 0, np.nan, obs)}, "'obs' holds NaN or Inf values"),
        "inf16.npz": ({"ids": np.ones(2, np.int64), "obs": np.array([1, np.inf], np.float16)}, "'obs' holds NaN"),
        "big_endian_inf.npz": ({"obs": np.array([1.0, -np.inf], ">f4")}, "'obs' holds NaN or Inf values"),
    }
    for name, (arrays, words) in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(BadInputError, match=words) as caught:
            read_npz(tmp_path / name)
        assert str(caught.value).startswith(f"--inputs {tmp_path / name}: ")
    (tmp_path / "folder.npz").mkdir()
    with pytest.raises(BadInputError, match="a directory, not a file"):
        read_npz(tmp_path / "folder.npz")
    np.savez(tmp_path / "big_endian.npz", obs=np.array([1.0, 2.0], ">f4"))
    assert np.array_equal(read_npz(tmp_path / "big_endian.npz")["obs"], [1.0, 2.0])
