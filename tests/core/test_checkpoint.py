"""The checkpoint format (psvi.checkpoint): no pickle, atomic writes, corruption caught."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

from psvi import checkpoint


def _as_array(leaf):
    return (leaf, "numpy") if isinstance(leaf, np.ndarray) else None


def _write(path, value: float = 1.0, size: int = 8) -> None:
    tree = {"params": {"loc": np.full(size, value)}, "counters": {"calls": 4}}
    description, arrays = checkpoint.flatten(tree, _as_array)
    checkpoint.write(path, checkpoint.header("numpy", "Test", state=description), arrays)


def _read_loc(path) -> np.ndarray:
    header, arrays = checkpoint.read(path)
    return checkpoint.unflatten(header["state"], arrays, lambda a, tag: a)["params"]["loc"]


def test_flatten_round_trips_nested_state_with_int_keys_tuples_and_scalars():
    tree = {
        "optim": {"state": {0: {"step": np.float32(3.0).reshape(()), "m": np.arange(3.0)}},
                  "groups": [{"lr": 0.1, "betas": (0.9, 0.999), "fused": None, "amsgrad": False}]},
        "rng": ("MT19937", np.arange(4, dtype=np.uint32), 2, 0, 0.0),
        "name": "x",
    }  # fmt: skip
    description, arrays = checkpoint.flatten(tree, _as_array)
    back = checkpoint.unflatten(description, arrays, lambda a, tag: a)
    assert back["optim"]["groups"][0]["betas"] == (0.9, 0.999)
    assert list(back["optim"]["state"]) == [0]  # int keys stay ints
    assert back["optim"]["state"][0]["step"].shape == ()  # 0-dim arrays stay 0-dim
    np.testing.assert_array_equal(back["rng"][1], tree["rng"][1])
    assert back["rng"][1].dtype == np.uint32 and back["name"] == "x"


def test_flatten_refuses_objects_it_cannot_store_by_where_they_sit():
    with pytest.raises(TypeError, match=r"Cannot store a function \(at state\['fn'\]\)"):
        checkpoint.flatten({"fn": lambda: 0}, _as_array)


def test_round_trip_and_a_second_write_replaces_the_first(tmp_path):
    path = tmp_path / "ckpt"
    _write(path, 1.0)
    _write(path, 2.0)
    np.testing.assert_array_equal(_read_loc(path), np.full(8, 2.0))
    assert os.listdir(tmp_path) == ["ckpt"]  # no temp file left


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path):
    """A write cut off by the file-size limit (as on a full disk) in a subprocess."""
    path = tmp_path / "ckpt"
    _write(path, 1.0)
    script = textwrap.dedent(f"""
        import resource, signal
        import numpy as np
        from psvi import checkpoint
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit raises EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        description, arrays = checkpoint.flatten({{"loc": np.ones(100_000)}}, lambda a: (a, "numpy"))
        try:
            checkpoint.write({str(path)!r}, checkpoint.header("numpy", "Test", state=description), arrays)
        except OSError as error:
            print("failed:", error)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "failed:" in result.stdout
    np.testing.assert_array_equal(_read_loc(path), np.full(8, 1.0))
    assert os.listdir(tmp_path) == ["ckpt"]


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "empty", "text"])
def test_damaged_files_are_not_valid_checkpoints(tmp_path, damage):
    path = tmp_path / "ckpt"
    _write(path, 1.0, size=1000)
    data = bytearray(path.read_bytes())
    if damage == "flip_byte":  # inside the array's bytes, the middle of the file
        data[len(data) // 2] ^= 0x01
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(b"hello")
    path.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match=f"not a valid psvi checkpoint: {path}: "):
        _read_loc(path)


def test_a_flipped_byte_that_zip_does_not_check_is_caught_by_the_checksum(tmp_path):
    """Rewrite one member with a changed value and a fresh CRC: only the checksum sees it."""
    path, forged = tmp_path / "ckpt", tmp_path / "forged"
    _write(path, 1.0)
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(forged, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            if name == "a0.npy":
                data = data[:-8] + np.float64(9.7e37).tobytes()
            target.writestr(name, data)
    with pytest.raises(checkpoint.CheckpointError, match="checksum does not match"):
        _read_loc(forged)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates the marker file when unpickled


def test_a_crafted_pickle_is_refused_without_running_its_payload(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "ckpt"
    path.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(checkpoint.LegacyCheckpointError, match="a pickle file"):
        checkpoint.read(path)
    assert not marker.exists()


def test_an_npz_with_a_pickled_object_array_is_refused_without_running_it(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "ckpt.npz"
    payload = np.array([_Payload(str(marker))], dtype=object)
    np.savez(path, __psvi_header__=np.frombuffer(b"{}", np.uint8), a0=payload)
    with pytest.raises(checkpoint.CheckpointError, match="unreadable member"):
        checkpoint.read(path)
    assert not marker.exists()


def test_a_torch_style_pickle_archive_is_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"x": 1}))
    with pytest.raises(checkpoint.LegacyCheckpointError, match="torch.save pickle archive"):
        checkpoint.read(path)


def test_mismatch_names_both_sides():
    with pytest.raises(
        checkpoint.CheckpointMismatch, match=r"'w': \[3\] saved, \[2\] here; 'z': absent saved"
    ):
        checkpoint.check_match("p", "latent sites", {"w": [3]}, {"w": [2], "z": [1]}, "Fix.")
