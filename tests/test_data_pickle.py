"""CIFAR-100 from generated files in the release's exact pickle layout, and the restricted
unpickler that reads them: plain data and numeric arrays load, anything else is refused
before it runs."""

from __future__ import annotations

import io
import os
import pickle
import re
import struct
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from sft_actors.data import load_dataset, load_image_dataset
from sft_actors.data.cifar import load_cifar100
from sft_actors.data.safe_pickle import load_plain_pickle, load_plain_pickle_file
from sft_actors.errors import DatasetCorrupt, DatasetNotFound, UnsafePickle

FINE = [f"fine{i}".encode() for i in range(100)]
COARSE = [f"coarse{i}".encode() for i in range(20)]


class _Py2StylePickler(pickle._Pickler):
    """Writes str and bytes as Python 2 ``str`` (BINSTRING opcodes), like the cPickle that
    produced the CIFAR release; loaded with encoding="bytes" they come back as bytes."""

    dispatch: ClassVar[dict[type, Any]] = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes | str) -> None:
        raw = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def py2_style_pickle(obj: object) -> bytes:
    buf = io.BytesIO()
    _Py2StylePickler(buf, protocol=2).dump(obj)
    # The release was written with numpy 1.x, whose module is numpy.core, not numpy._core.
    return buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def _records(n: int, seed: int) -> tuple[np.ndarray, list[int], list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    fine = [int(v) for v in rng.integers(0, 100, size=n)]
    return data, fine, [f // 5 for f in fine]


def write_cifar100(root: Path, *, style: str, n_train: int = 12, n_test: int = 5) -> dict[str, Any]:
    """A cifar-100-python folder; ``style``: "py2" (like the release), "py3-array", "py3-bytes"."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    dump = {
        "py2": py2_style_pickle,
        "py3-array": lambda o: pickle.dumps(o, protocol=2),
        "py3-bytes": lambda o: pickle.dumps(o, protocol=2),
    }[style]
    (folder / "meta").write_bytes(dump({b"fine_label_names": FINE, b"coarse_label_names": COARSE}))
    made: dict[str, Any] = {}
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        data, fine, coarse = _records(n, seed)
        record = {
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
            b"batch_label": f"{split} batch 1 of 1".encode(),
            b"fine_labels": fine,
            b"coarse_labels": coarse,
            b"data": data.tobytes() if style == "py3-bytes" else data,
        }
        (folder / split).write_bytes(dump(record))
        made[split] = (data, fine, coarse)
    return made


@pytest.mark.parametrize("style", ["py2", "py3-array", "py3-bytes"])
def test_cifar100_loads_every_pickle_flavour(tmp_path: Path, style: str) -> None:
    made = write_cifar100(tmp_path, style=style)
    train = load_cifar100(tmp_path, "train")
    data, fine, _ = made["train"]
    assert train.images.shape == (12, 3, 32, 32) and train.images.dtype == torch.uint8
    # rows are 1024 R, 1024 G, 1024 B values, each plane row-major
    assert torch.equal(train.images[3, 1].flatten(), torch.from_numpy(data[3, 1024:2048].copy()))
    assert train.labels.tolist() == fine and train.labels.dtype == torch.int64
    assert train.class_names[7] == "fine7" and len(train.class_names) == 100

    coarse = load_image_dataset("cifar100", str(tmp_path), "test", label_mode="coarse")
    assert coarse.labels.tolist() == made["test"][2] and len(coarse.class_names) == 20
    # root may also be the cifar-100-python folder itself
    assert len(load_cifar100(tmp_path / "cifar-100-python", "test")) == 5


def test_py2_style_fixture_really_uses_numpy_globals_and_py2_strings(tmp_path: Path) -> None:
    write_cifar100(tmp_path, style="py2")
    raw = (tmp_path / "cifar-100-python" / "train").read_bytes()
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw and b"cnumpy\ndtype\n" in raw
    assert b"_codecs" not in raw  # py2 strings need no encode call
    with pytest.raises(UnicodeDecodeError):  # why the loader must use encoding="bytes"
        pickle.loads(raw)


def test_missing_cifar_names_the_folder_and_what_to_put_there(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound, match=r"cifar-100-python.*train.*test.*meta"):
        load_cifar100(tmp_path, "train")
    write_cifar100(tmp_path, style="py2")
    (tmp_path / "cifar-100-python" / "test").unlink()
    with pytest.raises(DatasetNotFound, match=re.escape(str(tmp_path / "cifar-100-python" / "test"))):
        load_cifar100(tmp_path, "test")
    with pytest.raises(DatasetNotFound, match="no root folder given"):
        load_dataset("cifar100", None, "train")


def test_corrupt_cifar_files_raise_typed_errors_naming_the_file(tmp_path: Path) -> None:
    write_cifar100(tmp_path, style="py2")
    train = tmp_path / "cifar-100-python" / "train"
    good = train.read_bytes()
    train.write_bytes(good[: len(good) // 2])
    with pytest.raises(DatasetCorrupt, match=re.escape(str(train))):
        load_cifar100(tmp_path, "train")
    data, fine, coarse = _records(4, 0)
    wrong_count = {b"data": data, b"fine_labels": fine[:3], b"coarse_labels": coarse}
    train.write_bytes(pickle.dumps(wrong_count, protocol=2))
    with pytest.raises(DatasetCorrupt, match="4 labels"):
        load_cifar100(tmp_path, "train")
    train.write_bytes(pickle.dumps({b"fine_labels": fine}, protocol=2))
    with pytest.raises(DatasetCorrupt, match="b'data' is missing"):
        load_cifar100(tmp_path, "train")
    train.write_bytes(pickle.dumps({b"data": data, b"fine_labels": [100] * 4}, protocol=2))
    with pytest.raises(DatasetCorrupt, match="outside"):
        load_cifar100(tmp_path, "train")


class _RunsAShellCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code_and_never_runs_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = {b"data": b"\x00" * 3072, b"fine_labels": [_RunsAShellCommand(marker)]}
    malicious = pickle.dumps(payload, protocol=2)
    assert b"system" in malicious  # the class reference really is in the stream
    with pytest.raises(UnsafePickle, match=r"refusing to load global (posix|os|nt)\.system"):
        load_plain_pickle(malicious, source="evil")
    assert not marker.exists()

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": FINE}, protocol=2))
    (folder / "train").write_bytes(malicious)
    with pytest.raises(UnsafePickle, match=re.escape(str(folder / "train"))):
        load_cifar100(tmp_path, "train")
    assert not marker.exists()


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param(eval, id="builtin-function"),
        pytest.param(np.array([object(), 1], dtype=object), id="object-array"),
        pytest.param(np.zeros(2, dtype=[("a", "u1"), ("b", "f4")]), id="structured-array"),
        pytest.param(np.ma.masked_array([1, 2]), id="ndarray-subclass"),
    ],
)
def test_restricted_unpickler_refuses_non_plain_objects(obj: object) -> None:
    with pytest.raises(UnsafePickle):
        load_plain_pickle(pickle.dumps(obj, protocol=2), source="x")


def test_restricted_unpickler_round_trips_plain_data_and_arrays(tmp_path: Path) -> None:
    value = {
        b"k": [1, 2.5, None, True, "text", (b"t", -3)],
        b"a": np.arange(12, dtype="<i4").reshape(3, 4),
        b"f": np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
        b"be": np.arange(3, dtype=">u2"),
    }
    for blob in (pickle.dumps(value, protocol=2), py2_style_pickle(value)):
        out = load_plain_pickle(blob, source="x")
        assert out[b"k"][:4] == [1, 2.5, None, True]
        for key in (b"a", b"f", b"be"):
            np.testing.assert_array_equal(out[key], value[key])
    path = tmp_path / "p"
    path.write_bytes(pickle.dumps([b"x"], protocol=2))
    assert load_plain_pickle_file(path) == [b"x"]


def test_codecs_encode_only_as_latin1() -> None:
    # _codecs.encode("...", "rot13") would be a way to smuggle behaviour; only latin-1 is allowed
    blob = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    with pytest.raises(UnsafePickle, match="latin-1"):
        load_plain_pickle(blob, source="x")
